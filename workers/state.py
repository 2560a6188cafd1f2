"""Job state in Redis: a hash per job, a set of finished chunks, the job's units of work, once-only transitions.

Chunk completion is a set add, so a redelivered task changes nothing; the move to "all chunks done"
happens in one Lua script that lets exactly one caller win. No Celery chords, no result backend.

A job is done in *units*, one message each: ``ingest``, ``infer-<first chunk>`` (a batch), ``summarize`` and
``finalize``. For each unit the hash ``omniq:job:<id>:units`` records when it was sent, started (a worker
took its lease, see ``workers.reliability.leases``), finished, retried, and how often its worker died. The watchdog
(``workers.reliability.watchdog``) reads these fields to find work that a dead worker or producer left behind.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

PREFIX = "omniq"
JOBS_INDEX = f"{PREFIX}:jobs"  # every job, scored by creation time (for `omniq status`)
ACTIVE_SET = f"{PREFIX}:active"  # what the watchdog looks at: jobs at work, and queued jobs not yet sent
PENDING_FAILURES = f"{PREFIX}:pending-failures"  # failed jobs whose manifest could not be written yet
EVENTS = f"{PREFIX}:events"  # a Redis stream of job events (README "Job events"), appended by the scripts below
EVENTS_MAX_LENGTH = 100_000  # the stream is capped near this many entries (XADD MAXLEN ~)
ACTIVE = ("queued", "ingesting", "running", "summarizing", "finalizing")
FINISHED = ("done", "partial", "failed", "cancelled")  # partial: some rows failed for good, the rest is published
RETRYABLE = ("failed", "partial")  # what ``omniq retry --failed`` runs again

T = TypeVar("T")

# KEYS: done-set, trigger, job hash, events; ARGV: total, claimant, events cap, now, job_id, indices...
# A call that adds chunks appends one "progress" event; a redelivered batch adds nothing and says nothing.
_COMPLETE = """
local added = 0
for i = 6, #ARGV do added = added + redis.call('SADD', KEYS[1], ARGV[i]) end
local n = redis.call('SCARD', KEYS[1])
if added > 0 then
  local job = redis.call('HMGET', KEYS[3], 'media_id', 'source', 'tag', 'status')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'event', 'progress', 'job_id', ARGV[5],
             'media_id', job[1] or '', 'source', job[2] or '', 'tag', job[3] or '', 'status', job[4] or '',
             'error', '', 'chunks_done', n, 'chunks_total', ARGV[1], 'at', ARGV[4])
end
if n >= tonumber(ARGV[1]) then
  if redis.call('SET', KEYS[2], ARGV[2], 'NX') then return {n, 1} end
end
return {n, 0}
"""
# KEYS: job hash, chunks set, trigger, units, jobs index, active set, events;
# ARGV: job_id, source, media_id, spec, now, tag, force, lease key prefix, events cap
# (Re)creates a job unless it is queued or running (or ``force``, which the caller gives only for a job whose
# leases are all stale): two producers racing on one file enqueue it once.
_CREATE = """
local status = redis.call('HGET', KEYS[1], 'status')
if ARGV[7] ~= '1' and (status == 'queued' or status == 'ingesting' or status == 'running'
   or status == 'summarizing' or status == 'finalizing') then
  return status
end
for _, field in ipairs(redis.call('HKEYS', KEYS[4])) do  -- an earlier run's leases go with its units
  local unit = string.match(field, '^(.*):sent$') or string.match(field, '^(.*):started$')
  if unit then redis.call('DEL', ARGV[8] .. unit) end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'source', ARGV[2], 'media_id', ARGV[3], 'spec', ARGV[4],
           'status', 'queued', 'chunks_total', 0, 'error', '', 'failed_rows', 0, 'created_at', ARGV[5],
           'updated_at', ARGV[5], 'tag', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[9], '*', 'event', 'queued', 'job_id', ARGV[1], 'media_id', ARGV[3],
           'source', ARGV[2], 'tag', ARGV[6], 'status', 'queued', 'error', '', 'chunks_done', 0, 'chunks_total', 0,
           'at', ARGV[5])
return 'created'
"""
# KEYS: job hash, active set, chunks set, events; ARGV: job_id, new status, now, allowed statuses (space
# separated), events cap, fields... Changes the status only from one of the allowed ones: a late step cannot
# revive a finished job. A change of status appends one event named after the new status.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if not string.find(' ' .. ARGV[4] .. ' ', ' ' .. status .. ' ', 1, true) then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'updated_at', ARGV[3])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] == 'done' or ARGV[2] == 'partial' or ARGV[2] == 'failed' or ARGV[2] == 'cancelled' then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], 'retry_at', 'retry_reason')
elseif ARGV[2] ~= 'queued' then
  redis.call('SADD', KEYS[2], ARGV[1])
end
if ARGV[2] ~= status then
  local job = redis.call('HMGET', KEYS[1], 'media_id', 'source', 'tag', 'error', 'chunks_total', 'failed_rows')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'job_id', ARGV[1],
             'media_id', job[1] or '', 'source', job[2] or '', 'tag', job[3] or '', 'status', ARGV[2],
             'error', job[4] or '', 'chunks_done', redis.call('SCARD', KEYS[3]), 'chunks_total', job[5] or 0,
             'at', ARGV[3], 'failed_rows', job[6] or 0)
end
return 'ok'
"""
# KEYS: job hash, units; ARGV: unit, now, run (the job's created_at when the unit started; '' for any). Marks the
# unit done unless the job was created again since (a new run's units are its own).
_UNIT_DONE = """
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'created_at') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1] .. ':done', ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1] .. ':started', ARGV[1] .. ':retry_at', ARGV[1] .. ':retry_since',
           ARGV[1] .. ':retry_reason')
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'retry_at', 'retry_reason')
return 1
"""
# KEYS: job hash, active set; ARGV: job_id. A job whose ingest message is sent and that is still queued waits in
# the queue: nothing for the watchdog to watch until a worker starts it (a library of 100,000 queued files
# costs the sweeps nothing).
_WAITING = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""


class BudgetRetry(Retry):
    """redis-py's retry with a time budget instead of a count: a worker rides out a Redis restart.

    Connection and timeout errors are retried with exponential backoff (0.2 s doubling to 5 s) until
    ``seconds`` have passed since the first failure; then the last error is raised.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(
            ExponentialBackoff(cap=5.0, base=0.2),
            retries=-1,
            supported_errors=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError),
        )
        self.seconds = seconds

    def call_with_retry(  # type: ignore[override]
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        self._backoff.reset()
        failures = 0
        deadline = time.monotonic() + self.seconds
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                pause = self._backoff.compute(failures)
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)


def redis_client(url: str, retry_seconds: float) -> redis.Redis:
    """A client that retries connection errors for ``retry_seconds`` (0: fail on the first error)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=BudgetRetry(retry_seconds),
    )


class JobState:
    """Read and change job state; every method is safe to call twice."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._complete = client.register_script(_COMPLETE)
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._waiting = client.register_script(_WAITING)
        self._unit_done = client.register_script(_UNIT_DONE)

    @classmethod
    def from_url(cls, url: str, retry_seconds: float = 2.0) -> JobState:
        """Job state at ``url``. Commands (the CLI, triggers) keep the default: a down Redis is reported at
        once. Workers pass ``OMNIQ_REDIS_RETRY_SECONDS`` so a task survives a Redis restart."""
        return cls(redis_client(url, retry_seconds))

    @staticmethod
    def key(job_id: str, part: str = "") -> str:
        return f"{PREFIX}:job:{job_id}" + (f":{part}" if part else "")

    # -- creating jobs ----------------------------------------------------------------------------------

    def create(self, job_id: str, source: str, media_id: str, spec: dict[str, Any], force: bool = False) -> str:
        """(Re)start a job's state, forgetting an earlier run's chunks, trigger and units.

        Returns "created", or the current status when the job is already queued or running (then nothing
        changes: a second producer must not restart a running job) unless ``force``.
        """
        spec = {**spec, "job_id": job_id, "source": source, "media_id": media_id}
        return self.create_many([spec], forced={job_id} if force else set())[0]

    def create_many(self, specs: list[dict[str, Any]], forced: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """:meth:`create` for many jobs in one round trip (specs are ``JobSpec.to_dict()`` values).

        Jobs in ``forced`` are recreated even when active: the caller checked that no worker holds them.
        """
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for spec in specs:
                job_id = spec["job_id"]
                keys = [
                    self.key(job_id),
                    self.key(job_id, "chunks"),
                    self.key(job_id, "trigger"),
                    self.key(job_id, "units"),
                    JOBS_INDEX,
                    ACTIVE_SET,
                    EVENTS,
                ]
                force = "1" if job_id in forced else "0"
                args = [job_id, spec["source"], spec["media_id"], json.dumps(spec), now, spec.get("tag") or "", force]
                args += [f"{PREFIX}:lease:{job_id}:", EVENTS_MAX_LENGTH]  # workers.reliability.leases.lease_key
                self._create(keys=keys, args=args, client=pipe)
            return [str(result) for result in pipe.execute()]

    # -- status -----------------------------------------------------------------------------------------

    def status(self, job_id: str) -> str | None:
        """A job's status alone (one field read), None for an unknown job."""
        return self.redis.hget(self.key(job_id), "status")

    def statuses(self, job_ids: list[str]) -> list[str | None]:
        """The status of many jobs in one round trip (None for unknown jobs)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "status")
            return pipe.execute()

    def advance(self, job_id: str, status: str, from_: tuple[str, ...] = ACTIVE, **fields: Any) -> bool:
        """Move a job to another active status (e.g. ``running``) if it is in one of ``from_`` (default: any
        active status); False when it has ended or moved past them (a late duplicate must not move it back)."""
        return self._set(job_id, status, from_, fields) == "ok"

    def finish(self, job_id: str, status: str, **fields: Any) -> bool:
        """End a job (``done``, ``partial``, ``failed`` or ``cancelled``). Only an active job can end: a late failure
        cannot turn a done job into a failed one, and a cancelled job stays cancelled."""
        assert status in FINISHED, status
        return self._set(job_id, status, ACTIVE, fields) == "ok"

    def _set(self, job_id: str, status: str, allowed: tuple[str, ...], fields: dict[str, Any]) -> str | None:
        flat: list[Any] = []
        for name, value in fields.items():
            flat += [name, _text(value)]
        keys = [self.key(job_id), ACTIVE_SET, self.key(job_id, "chunks"), EVENTS]
        args = [job_id, status, time.time(), " ".join(allowed), EVENTS_MAX_LENGTH, *flat]
        return self._transition(keys=keys, args=args)

    def touch(self, job_id: str, **fields: Any) -> None:
        """Record progress (``updated_at``) and optional fields without changing the status."""
        mapping = {"updated_at": time.time(), **{k: _text(v) for k, v in fields.items()}}
        self.redis.hset(self.key(job_id), mapping=mapping)

    def add_timings(self, job_id: str, timings: dict[str, float]) -> None:
        self.redis.hset(self.key(job_id), mapping={f"t_{k}": v for k, v in timings.items()})

    def timings(self, job_id: str) -> dict[str, float]:
        data = self.redis.hgetall(self.key(job_id))
        return {k[2:]: float(v) for k, v in data.items() if k.startswith("t_")}

    def incr(self, job_id: str, counter: str) -> int:
        return int(self.redis.hincrby(self.key(job_id), counter, 1))

    def spec(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hget(self.key(job_id), "spec")
        return json.loads(raw) if raw else None

    # -- chunks and units -------------------------------------------------------------------------------

    def complete_chunks(self, job_id: str, indices: list[int], total: int) -> tuple[int, bool]:
        """Mark chunks done; return (chunks done, whether this call is the one that completed the job)."""
        token = uuid.uuid4().hex
        done, fired = self._complete(
            keys=[self.key(job_id, "chunks"), self.key(job_id, "trigger"), self.key(job_id), EVENTS],
            args=[total, token, EVENTS_MAX_LENGTH, time.time(), job_id, *indices],
        )
        self.redis.hset(self.key(job_id), "updated_at", time.time())
        return int(done), bool(fired)

    def units(self, job_id: str) -> dict[str, str]:
        """The raw unit fields (``<unit>:sent``, ``:started``, ``:done``, ``:deaths``, ``:chunks`` ...)."""
        return self.redis.hgetall(self.key(job_id, "units"))

    def mark_sent(self, entries: list[tuple[str, str, list[int] | None]]) -> None:
        """Record that units were published: (job id, unit, its chunks or None), in one round trip."""
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, unit, chunks in entries:
                mapping: dict[str, Any] = {f"{unit}:sent": now}
                if chunks is not None:
                    mapping[f"{unit}:chunks"] = ",".join(str(c) for c in chunks)
                pipe.hset(self.key(job_id, "units"), mapping=mapping)
                if unit == "ingest":
                    self._waiting(keys=[self.key(job_id), ACTIVE_SET], args=[job_id], client=pipe)
            pipe.execute()

    def was_sent(self, job_id: str, unit: str) -> bool:
        return bool(self.redis.hexists(self.key(job_id, "units"), f"{unit}:sent"))

    def run_of(self, job_id: str) -> str | None:
        """Which run of the job this is: its ``created_at``, which a new run (``enqueue``, ``retry``) sets anew."""
        return self.redis.hget(self.key(job_id), "created_at")

    def unit_done(self, job_id: str, unit: str, run: str | None = None) -> None:
        """A unit finished, successors published: it never needs to run again. ``run`` (from ``run_of`` when the
        unit started): only if the job is still that run, so a step that ends after its job was enqueued again
        cannot mark the new run's unit done."""
        keys = [self.key(job_id), self.key(job_id, "units")]
        if not self._unit_done(keys=keys, args=[unit, time.time(), run or ""]):
            log.info("not marking %s of job %s done: the job was enqueued again meanwhile", unit, job_id)

    def is_unit_done(self, job_id: str, unit: str) -> bool:
        return bool(self.redis.hexists(self.key(job_id, "units"), f"{unit}:done"))

    def unit_retrying(self, job_id: str, unit: str, reason: str, at: float) -> float:
        """Record that a unit waits to retry until ``at``; returns when its retrying began (for the budget)."""
        units = self.key(job_id, "units")
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(units, f"{unit}:retry_since", now)
            pipe.hset(units, mapping={f"{unit}:retry_at": at, f"{unit}:retry_reason": reason})
            pipe.hdel(units, f"{unit}:started")
            pipe.hget(units, f"{unit}:retry_since")
            pipe.hset(self.key(job_id), mapping={"retry_at": at, "retry_reason": reason, "updated_at": now})
            since = pipe.execute()[3]
        return float(since or now)

    def retry_since(self, job_id: str, unit: str) -> float | None:
        value = self.redis.hget(self.key(job_id, "units"), f"{unit}:retry_since")
        return float(value) if value else None

    # -- reading ----------------------------------------------------------------------------------------

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
            "failed_rows": int(data.get("failed_rows", 0) or 0),
            "created_at": float(data.get("created_at", 0) or 0),
            "updated_at": float(data.get("updated_at", 0) or 0),
            "retry_at": float(data["retry_at"]) if data.get("retry_at") else None,
            "retry_reason": data.get("retry_reason") or None,
            "model": (json.loads(data["spec"]).get("config", {}).get("model") if data.get("spec") else None),
        }

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        job_ids = self.redis.zrevrange(JOBS_INDEX, 0, limit - 1)
        jobs = [self.get(job_id) for job_id in job_ids]
        return [job for job in jobs if job is not None]

    def jobs_of_media(self, media_id: str) -> dict[str, str]:
        """The jobs Redis knows for a media (job ids start with the media id) and their statuses."""
        job_ids = [job_id for job_id, _ in self.redis.zscan_iter(JOBS_INDEX, match=f"{media_id}-*", count=1000)]
        return {job_id: status or "unknown" for job_id, status in zip(job_ids, self.statuses(job_ids), strict=True)}

    def forget(self, job_ids: list[str], media_id: str, source: str) -> None:
        """Remove ended jobs' records (``omniq delete``) and append a ``deleted`` event for their media."""
        now = time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            for job_id in job_ids:
                pipe.delete(*(self.key(job_id, part) for part in ("", "chunks", "trigger", "units")))
                pipe.zrem(JOBS_INDEX, job_id)
                pipe.srem(ACTIVE_SET, job_id)
            fields = {"event": "deleted", "job_id": job_ids[-1] if job_ids else "", "media_id": media_id}
            fields |= {"source": source, "tag": "", "status": "deleted", "error": "", "chunks_done": 0}
            pipe.xadd(EVENTS, fields | {"chunks_total": 0, "at": now}, maxlen=EVENTS_MAX_LENGTH, approximate=True)
            pipe.execute()

    def active_ids(self) -> Iterator[str]:
        yield from self.redis.sscan_iter(ACTIVE_SET, count=500)

    def failed_ids(self, limit: int = 100_000) -> list[str]:
        """Failed and partial jobs, newest first (for ``omniq retry --failed``)."""
        job_ids = self.redis.zrevrange(JOBS_INDEX, 0, limit - 1)
        return [j for j, s in zip(job_ids, self.statuses(job_ids), strict=True) if s in RETRYABLE]


def _text(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value)
