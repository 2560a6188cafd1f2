"""Rebuild job state from the store after Redis lost its data (``omniq recover``; the watchdog runs it too).

Nothing about a job lives only in Redis. Before the producer creates job state and sends messages it writes
the specs of the batch (up to 500 jobs, one request) to ``work/_enqueued/<batch>.json``; ingest writes
``work/<job>/plan.json``, each chunk its ``result.json``, summarize ``summary.json``, finalize the manifest
last. A job whose run has no manifest yet is unfinished: this module recreates its state and sends what is
missing (the ingest, the infer batches of chunks without results, the summarize, or the finalize). Jobs that
Redis still knows are left to the watchdog. Batch records whose jobs have all started or ended are pruned.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

from pipeline import job
from pipeline.config import Settings
from pipeline.errors import OmniqError, SourceNotFound
from pipeline.results.finalize import job_manifest, now_iso
from pipeline.spec import JobSpec, get_json, put_json
from pipeline.storage import Storage
from workers.reliability.recovery import FINALIZE, INGEST, SUMMARIZE
from workers.state import JobState

log = logging.getLogger(__name__)

ENQUEUED = "work/_enqueued"  # one record per producer batch
CANCELLED = f"{ENQUEUED}/cancelled"  # one marker per cancelled run, so a rebuild does not bring it back
PRUNE_AFTER_SECONDS = 3600.0  # a batch record is kept at least this long


def record_batch(storage: Storage, specs: list[dict[str, Any]]) -> str:
    """Write a producer batch's specs to the store (one request); returns the record's key."""
    key = f"{ENQUEUED}/{int(time.time())}-{uuid.uuid4().hex[:8]}.json"
    put_json(storage, key, {"enqueued_at": now_iso(), "specs": specs})
    return key


def record_cancelled(storage: Storage, job_id: str, run_id: str | None) -> None:
    """Remember in the store that this run of a job was cancelled (its batch record still lists it)."""
    put_json(storage, f"{CANCELLED}/{int(time.time())}-{job_id}.json", {"job_id": job_id, "run_id": run_id})


def _cancelled(storage: Storage) -> set[tuple[str, str | None]]:
    runs = set()
    for key in storage.list_keys(CANCELLED):
        try:
            marker = get_json(storage, key)
        except (SourceNotFound, ValueError):
            continue
        runs.add((marker.get("job_id"), marker.get("run_id")))
    return runs


def _enqueued(storage: Storage) -> dict[str, tuple[str, dict[str, Any]]]:
    """The latest enqueued spec of every job in the batch records: job id → (enqueued_at, spec)."""
    latest: dict[str, tuple[str, dict[str, Any]]] = {}
    keys = [key for key in storage.list_keys(ENQUEUED) if not key.startswith(f"{CANCELLED}/")]
    for key in keys:
        try:
            record = get_json(storage, key)
        except (SourceNotFound, ValueError):
            continue  # pruned meanwhile, or not ours
        for spec in record.get("specs", []):
            when = str(record.get("enqueued_at", ""))
            if spec["job_id"] not in latest or latest[spec["job_id"]][0] <= when:
                latest[spec["job_id"]] = (when, spec)
    return latest


def restore_from_store(storage: Storage, state: JobState, settings: Settings) -> Counter[str]:
    """Recreate the state of every unfinished job in the store that Redis does not know; returns counts
    (``ingest``, ``infer``, ``summarize``, ``finalize``: jobs sent to that step; ``known``, ``finished``,
    ``cancelled``, ``orphaned``: jobs left alone)."""
    files: dict[str, set[str]] = defaultdict(set)
    for key in storage.list_keys("work"):
        parts = key.split("/", 2)
        if len(parts) == 3 and not key.startswith(f"{ENQUEUED}/"):
            files[parts[1]].add(parts[2])
    enqueued = _enqueued(storage)
    cancelled = _cancelled(storage)
    job_ids = sorted(set(files) | set(enqueued))
    report: Counter[str] = Counter()
    for job_id, status in zip(job_ids, state.statuses(job_ids), strict=True):
        if status is not None and state.redis.hexists(JobState.key(job_id), "spec"):
            report["known"] += 1
            continue
        latest = enqueued.get(job_id)
        if latest is not None and (job_id, latest[1].get("run_id")) in cancelled:
            report["cancelled"] += 1  # a rebuild must not bring back what a user cancelled
            continue
        try:
            step = _restore_job(storage, state, settings, job_id, files.get(job_id, set()), latest)
        except OmniqError as error:
            log.warning("cannot restore job %s from the store: %s", job_id, error)
            step = "orphaned"
        report[step] += 1
    if job_ids:
        log.warning("restored job state from the store: %s", dict(report))
    return report


def _restore_job(  # type: ignore[no-untyped-def]
    storage: Storage,
    state: JobState,
    settings: Settings,
    job_id: str,
    names: set[str],
    enqueued: tuple[str, dict[str, Any]] | None,
) -> str:
    from workers.tasks import publish_unit as publish

    plan = job.load_plan(storage, job_id) if "plan.json" in names else None
    if plan is not None:
        spec = plan.spec
    elif enqueued is not None:
        spec = JobSpec.from_dict(enqueued[1])
    else:
        return "orphaned"  # e.g. an upload cut short, or a cancelled job's leftovers
    manifest = job_manifest(storage, spec.media_id, job_id)
    if manifest is not None and spec.run_id and manifest.get("run_id"):
        ended = manifest["run_id"] == spec.run_id
    else:  # written before runs had ids: compare times
        ended = manifest is not None and str(manifest.get("finished_at", "")) >= (enqueued or ("", {}))[0]
    state.create(job_id, spec.source, spec.media_id, spec.to_dict(), force=True)
    if manifest is not None and ended:
        # this run ended (its work files were kept, or finalize died before removing them)
        failed_rows = (manifest.get("rows") or {}).get("failed", 0)
        state.finish(
            job_id, manifest.get("status") or "failed", error=manifest.get("error") or "", failed_rows=failed_rows
        )
        return "finished"
    if plan is None:
        publish(spec, INGEST)
        return INGEST
    total = len(plan.chunks)
    done = [c.index for c in plan.chunks if f"chunks/{c.index:05d}/result.json" in names]
    state.advance(job_id, "running", chunks_total=total)
    state.unit_done(job_id, INGEST)
    if done:
        state.complete_chunks(job_id, done, total)
    if "summary.json" in names:
        state.advance(job_id, "summarizing")
        state.unit_done(job_id, SUMMARIZE)
        publish(spec, FINALIZE)
        return FINALIZE
    if len(done) == total:
        publish(spec, SUMMARIZE)
        return SUMMARIZE
    missing = [c.index for c in plan.chunks if c.index not in set(done)]
    size = settings.batch_size
    for first in range(0, len(missing), size):
        group = missing[first : first + size]
        publish(spec, f"infer-{group[0]}", group, new_unit=True)
    return "infer"


def prune_batch_records(storage: Storage, state: JobState, older_than: float = PRUNE_AFTER_SECONDS) -> int:
    """Delete batch records and cancel markers (older than ``older_than`` seconds) whose every job has left the
    queue: started or ended, as Redis knows it. A job Redis does not know keeps its record (Redis may have lost
    it)."""
    removed = 0
    for key in list(storage.list_keys(ENQUEUED)):
        stamp = key.rsplit("/", 1)[1].split("-", 1)[0]
        if not stamp.isdigit() or time.time() - int(stamp) < older_than:
            continue
        try:
            document = get_json(storage, key)
        except (SourceNotFound, ValueError):
            continue
        job_ids = [spec["job_id"] for spec in document.get("specs", [])] or [document.get("job_id", "")]
        statuses = state.statuses(job_ids) if job_ids else []
        if all(status not in (None, "queued") for status in statuses):
            storage.delete(key)
            removed += 1
    return removed
