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
# KEYS: job hash, chunks set, trigger, finalize claim, jobs index; ARGV: job_id, source, media_id, spec, now, tag
# (Re)creates a job unless it is queued or running: two producers racing on one file enqueue it once.
_CREATE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'ingesting' or status == 'running' or status == 'summarizing'
   or status == 'finalizing' then
  return status
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'source', ARGV[2], 'media_id', ARGV[3], 'spec', ARGV[4],
           'status', 'queued', 'chunks_total', 0, 'error', '', 'created_at', ARGV[5], 'updated_at', ARGV[5],
           'tag', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
return 'created'
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
        self._create = client.register_script(_CREATE)

    @classmethod
    def from_url(cls, url: str) -> JobState:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=30, health_check_interval=30))

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}:job:{job_id}" + (f":{part}" if part else "")

    def create(self, job_id: str, source: str, media_id: str, spec: dict[str, Any]) -> str:
        """(Re)start a job's state, forgetting an earlier run's chunks, trigger and claims.

        Returns "created", or the current status when the job is already queued or running (then nothing
        changes: a second producer must not restart a running job).
        """
        return self.create_many([{**spec, "job_id": job_id, "source": source, "media_id": media_id}])[0]

    def create_many(self, specs: list[dict[str, Any]]) -> list[str]:
        """:meth:`create` for many jobs in one round trip (specs are ``JobSpec.to_dict()`` values)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for spec in specs:
                job_id = spec["job_id"]
                keys = [
                    self.key(job_id),
                    self.key(job_id, "chunks"),
                    self.key(job_id, "trigger"),
                    self.key(job_id, "finalize"),
                    JOBS_INDEX,
                ]
                args = [job_id, spec["source"], spec["media_id"], json.dumps(spec), time.time(), spec.get("tag") or ""]
                self._create(keys=keys, args=args, client=pipe)
            return [str(result) for result in pipe.execute()]

    def status(self, job_id: str) -> str | None:
        """A job's status alone (one field read), None for an unknown job."""
        return self.redis.hget(self.key(job_id), "status")

    def statuses(self, job_ids: list[str]) -> list[str | None]:
        """The status of many jobs in one round trip (None for unknown jobs)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "status")
            return pipe.execute()

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
