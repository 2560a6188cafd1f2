"""The watchdog: a thread in every worker that finds lost work and sends it again; no extra service.

Every ``OMNIQ_WATCHDOG_INTERVAL_SECONDS`` (with jitter) each worker tries a short Redis lock; the one that
gets it sweeps: it loads every active job's units and leases, asks :func:`workers.reliability.recovery.decide` what
to do, and publishes the missing units (or fails a job whose unit killed its worker too often). It also
writes failed manifests that could not be written while the store was down, and rebuilds job state from
the store when it finds a Redis that lost its data. Every worker also registers itself (its queues) so
``omniq status`` can say when a job waits for a model that no live worker serves.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import redis

from pipeline.config import Settings
from pipeline.errors import OmniqError
from workers.reliability.deliveries import forget, in_flight, stale_deliveries
from workers.reliability.leases import Leases, holder_is_dead
from workers.reliability.recovery import Action, JobView, UnitView, decide, parse_units
from workers.state import FINISHED, PENDING_FAILURES, PREFIX, JobState

log = logging.getLogger(__name__)

LOCK = f"{PREFIX}:watchdog"
EPOCH = f"{PREFIX}:epoch"  # set by the first sweep of a Redis; missing again means Redis lost its data
WORKERS = f"{PREFIX}:worker:"
PRUNE_EVERY_SECONDS = 600.0  # how often a sweep also removes the producer's batch records that served


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def load_views(state: JobState, leases: Leases, job_ids: list[str]) -> list[tuple[JobView, dict[str, str]]]:
    """Each job's view for :func:`decide` and its raw hash, in two round trips."""
    with state.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(JobState.key(job_id))
            pipe.hgetall(JobState.key(job_id, "units"))
            pipe.smembers(JobState.key(job_id, "chunks"))
        raw = pipe.execute()
    rows = [(job_ids[i // 3], raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]
    pairs = [(job_id, field.rpartition(":")[0]) for job_id, _, units, _ in rows for field in units]
    pairs = sorted(set(pairs))
    holders: dict[str, dict[str, str | None]] = defaultdict(dict)  # job id -> unit -> live holder
    for (owner, unit), holder in zip(pairs, leases.alive(pairs) if pairs else [], strict=True):
        holders[owner][unit] = holder
    views = []
    for job_id, record, units, chunks in rows:
        if not record:
            continue
        view = JobView(
            job_id,
            record.get("status", ""),
            float(record.get("created_at") or 0),
            float(record.get("updated_at") or 0),
            int(record.get("chunks_total") or 0),
            {int(c) for c in chunks},
            parse_units(units, holders.get(job_id)),
        )
        views.append((view, record))
    return views


def is_stale(state: JobState, leases: Leases, job_id: str, settings: Settings, now: float | None = None) -> bool:
    """True when no worker holds any of the job's units and it made no progress for a lease period:
    ``enqueue --force`` may restart it. A job that is really running is never stale."""
    now = now or time.time()
    loaded = load_views(state, leases, [job_id])
    if not loaded:
        return True
    view = loaded[0][0]
    if any(unit.holder for unit in view.units.values()):
        return False
    return now - view.updated_at > settings.lease_seconds


class Overtaken:
    """Units whose message was lost after a worker fetched it (kombu moves a message out of the Redis queue a
    moment before it records it as unacknowledged; a worker killed in between, or a requeue that failed while
    the worker stopped, loses it). A queue is served in order, so a unit sent before another of the same queue
    and priority that has started, by more than a grace period, will not start; nor will one sent that long
    ago to a queue that is now empty. Collected over one sweep, then sent again."""

    def __init__(self) -> None:
        self.started: dict[tuple[str, str, int], float] = {}  # queue -> latest send time of a started unit
        self.waiting: list[tuple[JobView, dict[str, str], UnitView, tuple[str, str, int]]] = []

    def note(self, view: JobView, record: dict[str, str]) -> None:
        queue: tuple[str, int] | None = None
        for unit in view.units.values():
            if unit.sent is None or (unit.retry_at is not None and not unit.started):
                continue
            if queue is None:
                spec = json.loads(record.get("spec") or "{}")
                queue = (str(spec.get("config", {}).get("model", "")), int(spec.get("priority", 5)))
            key = (_kind(unit.name), *queue)
            if unit.started or unit.done or unit.holder:
                self.started[key] = max(self.started.get(key, 0.0), unit.sent)
            else:
                self.waiting.append((view, record, unit, key))

    def lost(
        self, margin: float, now: float = 0.0, empty: frozenset[tuple[str, str]] = frozenset()
    ) -> list[tuple[JobView, dict[str, str], UnitView]]:
        """The waiting units overtaken by more than ``margin``, or sent more than ``margin`` before ``now`` to
        a queue that is ``empty`` (kind, model): their message is neither waiting nor started."""
        return [
            (view, record, unit)
            for view, record, unit, key in self.waiting
            if unit.sent is not None
            and (unit.sent < self.started.get(key, 0.0) - margin or (key[:2] in empty and unit.sent < now - margin))
        ]

    def queues(self) -> set[tuple[str, str]]:
        return {key[:2] for _, _, _, key in self.waiting}


def empty_queues(client: redis.Redis, queues: set[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """The (kind, model) queues with no message waiting in any of their priority lists."""
    from workers.app import gpu_queue_for

    empty = set()
    for kind, model in queues:
        name = gpu_queue_for(model) if kind == "gpu" else "media"
        with client.pipeline(transaction=False) as pipe:
            for key in [name] + [f"{name}:{step}" for step in range(1, 10)]:
                pipe.llen(key)
            if not any(pipe.execute()):
                empty.add((kind, model))
    return frozenset(empty)


class Watchdog:
    """One sweep over the active jobs; :func:`start` runs it in a thread."""

    def __init__(self, state: JobState, leases: Leases, settings: Settings) -> None:
        self.state = state
        self.leases = leases
        self.settings = settings
        self.last_redis_error = 0.0
        self.last_prune = 0.0

    def sweep(self, now: float | None = None, force: bool = False) -> Counter[str] | None:
        """Run one sweep if this worker gets the lock (``force``: regardless); returns what it did."""
        from workers import tasks  # the publishers (Celery) are needed only here

        now = now or time.time()
        lock_ms = max(1000, int(self.settings.watchdog_interval_seconds * 900))
        if not force and not self.state.redis.set(LOCK, socket.gethostname(), nx=True, px=lock_ms):
            return None
        report: Counter[str] = Counter()
        if self.state.redis.set(EPOCH, str(now), nx=True):
            from workers.reliability.restore import restore_from_store

            restored = restore_from_store(tasks.storage(), self.state, self.settings)
            report.update({f"restored_{k}": v for k, v in restored.items()})
        # right after a Redis outage, give the lease renewers a moment to re-take leases that expired
        settled = now - self.last_redis_error > 2 * self.leases.renew_seconds
        overtaken = Overtaken()
        for batch in _batched(self.state.active_ids(), 200):
            for view, record in load_views(self.state, self.leases, batch):
                actions = decide(
                    view,
                    now,
                    max_deaths=self.settings.max_worker_deaths,
                    lease_seconds=self.settings.lease_seconds,
                    publish_grace_seconds=self.settings.publish_grace_seconds,
                )
                for action in actions:
                    if action.kind == "abandon" and not settled:
                        continue
                    report[self.apply(view, record, action, tasks)] += 1
                if not actions:
                    overtaken.note(view, record)
        if settled:
            resent = self.resend_stranded(now, tasks)
            report["resent_stranded"] += len(resent)
            empty = empty_queues(self.state.redis, overtaken.queues())
            grace = max(self.settings.lease_seconds, self.settings.publish_grace_seconds)
            lost = overtaken.lost(grace, now, empty)
            # a message a worker holds is not lost: it runs, or is on its way back to its queue (a stopping
            # worker hands its units back a moment before their messages; stranded ones are resent above)
            held = {(d.job_id, tasks.unit_of(d.task, d.kwargs)) for d in in_flight(self.state.redis)} if lost else set()
            for view, record, unit in lost:
                if (view.job_id, unit.name) in resent or (view.job_id, unit.name) in held:
                    continue
                action = Action("publish", unit.name, unit.chunks, why="its message is neither queued nor started")
                report[self.apply(view, record, action, tasks)] += 1
        for job_id in self.state.redis.smembers(PENDING_FAILURES):
            report["failure_manifests" if tasks.write_failure_manifest(job_id) else "failure_manifests_waiting"] += 1
        if now - self.last_prune > PRUNE_EVERY_SECONDS:
            self.last_prune = now
            from workers.reliability.restore import prune_batch_records

            try:
                report["batch_records_pruned"] = prune_batch_records(tasks.storage(), self.state)
            except OmniqError as error:
                log.warning("could not prune the producer's batch records (will try again): %s", error)
        return report

    def resend_stranded(self, now: float, tasks: Any) -> set[tuple[str, str]]:
        """Send again the units whose message a dead worker fetched but never started
        (``workers.reliability.deliveries``); returns the (job id, unit) pairs sent."""
        resent: set[tuple[str, str]] = set()
        for delivery in stale_deliveries(self.state.redis, now - self.settings.lease_seconds):
            unit = tasks.unit_of(delivery.task, delivery.kwargs)
            record = self.state.redis.hgetall(JobState.key(delivery.job_id))
            if record.get("status") in FINISHED:
                forget(self.state.redis, delivery.tag)  # it would only be dropped when delivered
                continue
            units = self.state.units(delivery.job_id)
            if float(units.get(f"{unit}:sent") or 0) > delivery.delivered_at:
                forget(self.state.redis, delivery.tag)  # sent again since: the newer message stands for it
                continue
            waiting = any(f"{unit}:{field}" in units for field in ("done", "started", "retry_at"))
            if waiting or not record.get("spec") or self.leases.holder_of(delivery.job_id, unit):
                continue  # done, running, due to retry, or its state is being rebuilt: not stranded
            why = "its worker died before starting it"
            self.resend(delivery.job_id, record, unit, delivery.kwargs.get("chunks"), "stranded", why, tasks)
            forget(self.state.redis, delivery.tag)
            resent.add((delivery.job_id, unit))
        return resent

    def apply(self, view: JobView, record: dict[str, str], action: Action, tasks: Any) -> str:
        if action.kind == "abandon":
            stale = self.leases.holder_of(view.job_id, action.unit)  # '' if expired, else a dead local process
            deaths = self.leases.abandon(
                view.job_id, action.unit, action.started, stale if holder_is_dead(stale) else ""
            )
            if deaths < 0:
                return "skipped"  # it moved on meanwhile
            model = json.loads(record.get("spec") or "{}").get("config", {}).get("model", "")
            tasks.metrics.WORKER_DEATHS.labels(queue=_kind(action.unit), model=model).inc()
            if action.fail_reason:  # its rows fail (an infer or summarize unit), else the job
                tasks.give_up(view.job_id, action.unit, action.chunks, action.fail_reason)
                return "gave_up"
        return self.resend(view.job_id, record, action.unit, action.chunks, action.kind, action.why, tasks)

    def resend(
        self,
        job_id: str,
        record: dict[str, str],
        unit: str,
        chunks: list[int] | None,
        reason: str,
        why: str,
        tasks: Any,
    ) -> str:
        """Publish a unit again (counted in the job's ``recovered`` and the metrics under ``reason``)."""
        from pipeline.errors import MalformedMessage
        from pipeline.spec import JobSpec

        if not record.get("spec"):
            log.warning("job %s has no spec in Redis; cannot send %s again", job_id, unit)
            return "skipped"
        try:
            spec = JobSpec.from_dict(json.loads(record["spec"]))
        except MalformedMessage as error:  # not a record omniq wrote: the job cannot run
            tasks.fail_job(job_id, f"its record in Redis is malformed: {error}")
            return "failed"
        attempt = self.state.incr(job_id, "recovered")
        tasks.publish_unit(spec, unit, chunks, suffix=f"-r{attempt}")
        tasks.metrics.RECOVERED.labels(queue=_kind(unit), model=str(spec.config.get("model")), reason=reason).inc()
        log.warning("job %s: sent %s again (%s)", job_id, unit, why)
        return "resent"


def _kind(unit: str) -> str:
    return "gpu" if unit.startswith("infer-") or unit == "summarize" else "media"


def register_worker(client: redis.Redis, name: str, queues: list[str], ttl_seconds: float) -> None:
    """Say that worker ``name`` is alive and serves ``queues`` (expires unless renewed)."""
    document = json.dumps({"queues": queues, "seen": time.time()})
    client.set(f"{WORKERS}{name}", document, px=int(ttl_seconds * 1000))


def live_queues(client: redis.Redis) -> dict[str, list[str]]:
    """Queue name → the live workers that consume it."""
    served: dict[str, list[str]] = {}
    keys = list(client.scan_iter(f"{WORKERS}*", count=500))
    for key, raw in zip(keys, client.mget(keys) if keys else [], strict=True):
        if raw:
            for queue in json.loads(raw).get("queues", []):
                served.setdefault(queue, []).append(key[len(WORKERS) :])
    return served


def start(name: str, queues: list[str], settings: Settings) -> threading.Event:
    """Start the watchdog and registry thread of a worker; set the returned event to stop it."""
    stop = threading.Event()
    state = JobState.from_url(settings.broker_url, retry_seconds=0)
    watchdog = Watchdog(state, Leases(state, settings.lease_seconds, settings.lease_renew_seconds), settings)
    interval = settings.watchdog_interval_seconds
    beat = min(interval, 5.0) if interval else 5.0

    def loop() -> None:
        last_sweep = 0.0
        while not stop.wait(beat * random.uniform(0.8, 1.0)):
            try:
                register_worker(state.redis, name, queues, beat * 4)
                if interval and time.monotonic() - last_sweep >= interval * random.uniform(0.8, 1.0):
                    last_sweep = time.monotonic()
                    report = watchdog.sweep()
                    if report:
                        log.info("watchdog sweep: %s", dict(report))
            except redis.exceptions.RedisError as error:
                watchdog.last_redis_error = time.time()
                log.warning("watchdog: Redis is unavailable (%s); trying again", error)
            except Exception:
                log.exception("watchdog sweep failed; trying again")

    threading.Thread(target=loop, name="omniq-watchdog", daemon=True).start()
    return stop
