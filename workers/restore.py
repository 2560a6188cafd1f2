"""Rebuild job state from the store after Redis lost its data (``omniq recover``; the watchdog runs it too).

Nothing about a job lives only in Redis: the producer writes ``work/<job>/spec.json`` before it sends a job,
ingest writes ``plan.json``, each chunk its ``result.json``, summarize ``summary.json``, and finalize the
manifest last. A job directory under ``work/`` without its run's manifest is unfinished; this module recreates
its state and sends what is missing: the ingest, the infer batches of chunks without results, the
summarize, or the finalize. Jobs that Redis still knows are left to the watchdog.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

from pipeline import job
from pipeline.config import Settings
from pipeline.errors import OmniqError
from pipeline.finalize import job_manifest
from pipeline.spec import JobSpec, get_json, work_prefix
from pipeline.storage import Storage
from workers.recovery import FINALIZE, INGEST, SUMMARIZE
from workers.state import JobState

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"


def restore_from_store(storage: Storage, state: JobState, settings: Settings) -> Counter[str]:
    """Recreate the state of every unfinished job in the store that Redis does not know; returns counts
    (``ingest``, ``infer``, ``summarize``, ``finalize``: jobs sent to that step; ``known``, ``finished``,
    ``orphaned``: jobs left alone)."""
    from workers.tasks import publish_unit

    files: dict[str, set[str]] = defaultdict(set)
    for key in storage.list_keys("work"):
        parts = key.split("/", 2)
        if len(parts) == 3:
            files[parts[1]].add(parts[2])
    report: Counter[str] = Counter()
    known = state.statuses(list(files))
    for (job_id, names), status in zip(files.items(), known, strict=True):
        if status is not None and state.redis.hexists(JobState.key(job_id), "spec"):
            report["known"] += 1
            continue
        try:
            step = _restore_job(storage, state, settings, job_id, names, publish_unit)
        except OmniqError as error:
            log.warning("cannot restore job %s from the store: %s", job_id, error)
            step = "orphaned"
        report[step] += 1
    if files:
        log.warning("restored job state from the store: %s", dict(report))
    return report


def _restore_job(storage: Storage, state: JobState, settings: Settings, job_id: str, names: set[str], publish) -> str:  # type: ignore[no-untyped-def]
    prefix = work_prefix(job_id)
    enqueued_at = ""
    if SPEC_FILE in names:
        document = get_json(storage, f"{prefix}/{SPEC_FILE}")
        enqueued_at = str(document.pop("enqueued_at", ""))
        spec = JobSpec.from_dict(document)
    plan = job.load_plan(storage, job_id) if "plan.json" in names else None
    if plan is not None:
        spec = plan.spec
    elif SPEC_FILE not in names:
        return "orphaned"  # e.g. an upload cut short, or a cancelled job's leftovers
    manifest = job_manifest(storage, spec.media_id, job_id)
    if manifest is not None and spec.run_id and manifest.get("run_id"):
        ended = manifest["run_id"] == spec.run_id
    else:  # written before runs had ids: compare times
        ended = manifest is not None and str(manifest.get("finished_at", "")) >= enqueued_at
    if manifest is not None and ended:
        # this run ended (its work files were kept, or finalize died before removing them)
        state.create(job_id, spec.source, spec.media_id, spec.to_dict(), force=True)
        state.finish(job_id, manifest.get("status") or "failed", error=manifest.get("error") or "")
        return "finished"
    state.create(job_id, spec.source, spec.media_id, spec.to_dict(), force=True)
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
