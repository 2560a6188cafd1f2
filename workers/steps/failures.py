"""What ends a unit for good: its rows fail (:func:`give_up`, README "Partial results"), or its job fails
(:func:`fail_job`, whose manifest the watchdog writes when the store is down)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pipeline import job
from pipeline.errors import MalformedMessage, OmniqError
from workers import metrics, runtime
from workers.app import MEDIA_QUEUE
from workers.reliability.recovery import FINALIZE, SUMMARIZE
from workers.state import FINISHED, PENDING_FAILURES, JobState

log = logging.getLogger(__name__)


def give_up(job_id: str, unit: str, chunks: list[int] | None, reason: str, spec: dict[str, Any] | None = None) -> None:
    """A unit that will not succeed (its retries are spent, or it took its worker down too often). An infer unit's
    rows fail (every row of its chunks not stored yet) and so does a summarize's file summary: the job goes on to
    a ``partial`` result (README "Partial results"). Any other unit, or ``OMNIQ_PARTIAL=false``, fails the job.
    Never raises."""
    from workers.steps.base import RUNS_IN
    from workers.steps.finalize import finalize
    from workers.steps.flow import chunks_done

    if not runtime.settings().partial or not (unit.startswith("infer-") or unit == SUMMARIZE):
        fail_job(job_id, reason, spec)
        return
    try:
        plan = job.load_plan(runtime.storage(), job_id)
        if unit == SUMMARIZE:
            job.fail_file_summary(plan, runtime.storage(), reason)
            runtime.state().unit_done(job_id, SUMMARIZE)
            if runtime.state().advance(job_id, "summarizing", from_=RUNS_IN["omniq.summarize"]):
                finalize.publish(plan.spec.priority, f"{job_id}-finalize", job_id=job_id, source=plan.spec.source)
                runtime.state().mark_sent([(job_id, FINALIZE, None)])
        else:
            chunks = chunks or [
                int(c) for c in (runtime.state().units(job_id).get(f"{unit}:chunks") or "").split(",") if c
            ]
            written = job.fail_chunks(plan, chunks, reason, runtime.storage())
            log.error("job %s: %s gave up (%s); its rows are recorded as failed: chunks %s", job_id, unit, reason,
                      written)  # fmt: skip
            runtime.state().unit_done(job_id, unit)
            chunks_done(plan, chunks)
    except Exception:  # e.g. the store is what keeps failing: then the job fails, as without partial results
        log.exception("job %s: could not record the failed rows of %s; failing the job", job_id, unit)
        fail_job(job_id, reason, spec)


def fail_job(job_id: str, reason: str, spec: dict[str, Any] | None = None) -> None:
    """End a job as failed with ``reason`` in its state and manifest. Never raises.

    The manifest is written now if the store answers, else the watchdog writes it once the store is back
    (the job is kept in ``omniq:pending-failures`` until then).
    """
    try:
        if not runtime.state().finish(job_id, "failed", error=reason):
            log.warning("job %s has already ended; not recording this failure: %s", job_id, reason)
            return
        log.error("job %s failed: %s", job_id, reason)
        metrics.JOBS.labels(queue=MEDIA_QUEUE, model=runtime.settings().model, status="failed").inc()
        runtime.state().redis.sadd(PENDING_FAILURES, job_id)
        if spec is not None and not runtime.state().redis.hexists(JobState.key(job_id), "spec"):
            runtime.state().touch(job_id, spec=spec)
        write_failure_manifest(job_id)
    except Exception:  # a failure handler must never fail: the job's state or manifest waits for the watchdog
        log.exception("could not record the failure of job %s (the watchdog will try again)", job_id)


def write_failure_manifest(job_id: str) -> bool:
    """Write a failed job's manifest (and drop it from the index); True when written or not needed."""
    record = runtime.state().redis.hgetall(JobState.key(job_id))
    if record.get("status") != "failed" or not record.get("spec"):
        runtime.state().redis.srem(PENDING_FAILURES, job_id)
        return True
    try:
        spec = job.JobSpec.from_dict(json.loads(record["spec"]))
    except MalformedMessage as error:  # a record omniq did not write names no media to write a manifest for
        log.error("job %s failed; no manifest is written, its record in Redis is malformed: %s", job_id, error)
        runtime.state().redis.srem(PENDING_FAILURES, job_id)
        return True
    timings = runtime.state().timings(job_id)
    if record.get("created_at"):  # as long as it ran, like a done job's total
        timings["total_s"] = round(float(record.get("updated_at") or time.time()) - float(record["created_at"]), 3)
    try:
        job.write_failure(spec, runtime.storage(), runtime.settings(), record.get("error") or "failed", timings)
    except OmniqError as error:
        log.warning("the failed manifest of job %s is not written yet (will try again): %s", job_id, error)
        return False
    job.update_index(runtime.index_or_none(), runtime.storage(), spec.media_id)
    runtime.state().redis.srem(PENDING_FAILURES, job_id)
    return True


def clean_if_ended(job_id: str, unit: str) -> None:
    """A step that ran while its job was cancelled (or a late duplicate that wrote files after the job ended)
    removes what it wrote."""
    status = runtime.state().status(job_id)
    # a partial job keeps its work files for a retry
    if unit != FINALIZE and status in FINISHED and status != "partial" and not runtime.settings().keep_work:
        runtime.storage().delete_prefix(job.work_prefix(job_id))
