"""Job state in Redis: a hash per job, a set of finished chunks, and once-only transitions.

Chunk completion is a set add, so a redelivered task changes nothing; the move to "all chunks
done" happens in one Lua script that lets exactly one caller win. No Celery chords, no result backend.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

PREFIX = "omniq"
JOBS_INDEX = f"{PREFIX}:jobs"
ACTIVE = ("queued", "ingesting", "running", "summarizing", "finalizing")

# KEYS: done-set, trigger; ARGV: total, claimant, indices...
_COMPLETE = """
for i = 3, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
local n = redis.call('SCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then
  if redis.call('SET', KEYS[2], ARGV[2], 'NX') then return {n, 1} end
end
return {n, 0}
"""
# KEYS: claim; ARGV: token — delete only if we still hold it
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobState:
    """Read and change job state; every method is safe to call twice."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str) -> JobState:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=30, health_check_interval=30))

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}:job:{job_id}" + (f":{part}" if part else "")

    def create(self, job_id: str, source: str, media_id: str, spec: dict[str, Any]) -> None:
        """(Re)start a job's state: forget chunks, triggers and claims of an earlier run."""
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.delete(
                self.key(job_id), self.key(job_id, "chunks"), self.key(job_id, "trigger"), self.key(job_id, "finalize")
            )
            pipe.hset(
                self.key(job_id),
                mapping={
                    "job_id": job_id,
                    "source": source,
                    "media_id": media_id,
                    "status": "queued",
                    "chunks_total": 0,
                    "error": "",
                    "created_at": now,
                    "updated_at": now,
                    "spec": json.dumps(spec),
                },
            )
            pipe.zadd(JOBS_INDEX, {job_id: now})
            pipe.execute()

    def set_status(self, job_id: str, status: str, **fields: Any) -> None:
        mapping = {"status": status, "updated_at": time.time(), **{k: _text(v) for k, v in fields.items()}}
        self.redis.hset(self.key(job_id), mapping=mapping)

    def add_timings(self, job_id: str, timings: dict[str, float]) -> None:
        self.redis.hset(self.key(job_id), mapping={f"t_{k}": v for k, v in timings.items()})

    def timings(self, job_id: str) -> dict[str, float]:
        data = self.redis.hgetall(self.key(job_id))
        return {k[2:]: float(v) for k, v in data.items() if k.startswith("t_")}

    def incr(self, job_id: str, counter: str) -> int:
        return int(self.redis.hincrby(self.key(job_id), counter, 1))

    def complete_chunks(self, job_id: str, indices: list[int], total: int) -> tuple[int, bool]:
        """Mark chunks done; return (chunks done, whether this call is the one that completed the job)."""
        token = uuid.uuid4().hex
        done, fired = self._complete(
            keys=[self.key(job_id, "chunks"), self.key(job_id, "trigger")], args=[total, token, *indices]
        )
        self.redis.hset(self.key(job_id), "updated_at", time.time())
        return int(done), bool(fired)

    def claim(self, job_id: str, step: str, ttl_seconds: int) -> str | None:
        """Hold a step exclusively; returns a token to release it, or None when someone else holds it."""
        token = uuid.uuid4().hex
        if self.redis.set(self.key(job_id, step), token, nx=True, ex=ttl_seconds):
            return token
        return None

    def release(self, job_id: str, step: str, token: str) -> None:
        self._release(keys=[self.key(job_id, step)], args=[token])

    def get(self, job_id: str) -> dict[str, Any] | None:
        data = self.redis.hgetall(self.key(job_id))
        if not data:
            return None
        return {
            "job_id": data.get("job_id", job_id),
            "source": data.get("source", ""),
            "media_id": data.get("media_id", ""),
            "status": data.get("status", "unknown"),
            "chunks_total": int(data.get("chunks_total", 0) or 0),
            "chunks_done": int(self.redis.scard(self.key(job_id, "chunks"))),
            "error": data.get("error") or None,
            "updated_at": float(data.get("updated_at", 0) or 0),
        }

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        job_ids = self.redis.zrevrange(JOBS_INDEX, 0, limit - 1)
        jobs = [self.get(job_id) for job_id in job_ids]
        return [job for job in jobs if job is not None]


def _text(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value)
