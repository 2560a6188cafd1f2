"""How a job moves on: the infer unit that completes the last chunk sends the summary; units sent by the watchdog
and ``omniq recover``."""

from __future__ import annotations

import time

from pipeline import job
from workers import runtime
from workers.reliability.recovery import FINALIZE, INGEST, SUMMARIZE
from workers.state import JobState


def chunks_done(plan: job.JobPlan, chunks: list[int]) -> None:
    """Count ``chunks`` as done; the call that completes the job (or a unit sent again after its worker died
    between the last chunk and sending summarize) sends ``omniq.summarize``."""
    from workers.steps.summarize import summarize

    job_id = plan.spec.job_id
    done, completed_job = runtime.state().complete_chunks(job_id, chunks, len(plan.chunks))
    if completed_job:  # the job's model time, as a local run records it: from the first batch to the last
        first = float(runtime.state().redis.hget(JobState.key(job_id), "infer_started_at") or time.time())
        runtime.state().add_timings(job_id, {"infer_s": round(time.time() - first, 3)})
    if completed_job or (done >= len(plan.chunks) and not runtime.state().was_sent(job_id, SUMMARIZE)):
        runtime.state().incr(job_id, "summarize_sent")
        model, source = plan.spec.config.get("model"), plan.spec.source
        summarize.publish(plan.spec.priority, f"{job_id}-summarize", model=model, job_id=job_id, source=source)
        runtime.state().mark_sent([(job_id, SUMMARIZE, None)])


def publish_unit(
    spec: job.JobSpec, unit: str, chunks: list[int] | None = None, suffix: str = "", new_unit: bool = False
) -> None:
    """Send one unit of a job (the watchdog and ``omniq recover`` use this) and record it as sent.

    ``new_unit`` records ``chunks`` as the unit's batch (a unit sent again keeps its original batch)."""
    from workers.steps.finalize import finalize
    from workers.steps.infer import infer
    from workers.steps.ingest import ingest
    from workers.steps.summarize import summarize

    common = {"job_id": spec.job_id, "source": spec.source}
    task_id = f"{spec.job_id}-{unit}{suffix}"
    model = spec.config.get("model")
    if unit == INGEST:
        ingest.publish(spec.priority, task_id, spec=spec.to_dict(), **common)
    elif unit == SUMMARIZE:
        summarize.publish(spec.priority, task_id, model=model, **common)
    elif unit == FINALIZE:
        finalize.publish(spec.priority, task_id, **common)
    else:
        infer.publish(spec.priority, task_id, model=model, chunks=chunks, unit=unit, **common)
    runtime.state().mark_sent([(spec.job_id, unit, chunks if new_unit else None)])
