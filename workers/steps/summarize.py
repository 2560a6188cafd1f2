"""``omniq.summarize`` (a model's GPU queue): the file summary, then the finalize."""

from __future__ import annotations

import time

from celery import Task

from pipeline import job
from workers import runtime
from workers.app import app
from workers.reliability.recovery import FINALIZE
from workers.steps.base import RUNS_IN, OmniqTask
from workers.steps.finalize import finalize


@app.task(name="omniq.summarize", base=OmniqTask, bind=True)
def summarize(self: Task, job_id: str, source: str) -> None:
    """Write the file summary from the chunk summaries, then send ``omniq.finalize``."""
    if not runtime.state().advance(job_id, "summarizing", from_=RUNS_IN["omniq.summarize"]):
        return
    runtime.state().incr(job_id, "summarize_runs")
    plan = job.load_plan(runtime.storage(), job_id)
    started = time.monotonic()
    job.summarize(
        plan, runtime.engine(), runtime.storage(), job.settings_for(plan.spec, runtime.settings(), runs_model=True)
    )
    # again: Redis may have lost the first advance meanwhile (and been rebuilt from the store as "running"),
    # and a finalize sent to a job that is not "summarizing" would be dropped
    if not runtime.state().advance(job_id, "summarizing", from_=RUNS_IN["omniq.summarize"]):
        return
    runtime.state().add_timings(job_id, {"summarize_s": round(time.monotonic() - started, 3)})
    finalize.publish(plan.spec.priority, f"{job_id}-finalize", job_id=job_id, source=source)
    runtime.state().mark_sent([(job_id, FINALIZE, None)])
