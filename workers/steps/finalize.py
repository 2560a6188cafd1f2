"""``omniq.finalize`` (media queue): the result files and the manifest, written last; the job ends."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from pipeline import deadlines, job
from pipeline.errors import SourceNotFound
from pipeline.results.finalize import job_manifest
from workers import metrics, runtime
from workers.app import MEDIA_QUEUE, app
from workers.state import JobState
from workers.steps.base import RUNS_IN, OmniqTask

log = logging.getLogger(__name__)


@app.task(name="omniq.finalize", base=OmniqTask, bind=True)
def finalize(self: Task, job_id: str, source: str) -> None:
    """Write the result files and the manifest; the unit's lease makes it run alone."""
    if not runtime.state().advance(job_id, "finalizing", from_=RUNS_IN["omniq.finalize"]):
        return
    runtime.state().incr(job_id, "finalize_runs")
    try:
        plan = job.load_plan(runtime.storage(), job_id)
    except SourceNotFound:
        # an earlier run wrote the manifest and removed the work files, then died before saying so
        media_id = runtime.state().redis.hget(JobState.key(job_id), "media_id") or ""
        manifest = job_manifest(runtime.storage(), media_id, job_id)
        if manifest is None or manifest.get("status") not in ("done", "failed"):
            raise
        _finish(job_id, manifest)
        return
    created = float((runtime.state().redis.hget(JobState.key(job_id), "created_at")) or time.time())
    timings = runtime.state().timings(job_id) | {"total_s": round(time.time() - created, 3)}
    # reads every chunk's result and writes the result files: the floor plus the media's duration
    seconds = runtime.settings().deadline_min_seconds + deadlines.ingest_seconds(
        runtime.settings(), plan.info.duration_s
    )
    with deadlines.watch(f"finalize of job {job_id}", seconds):
        manifest = job.finalize(plan, runtime.storage(), job.settings_for(plan.spec, runtime.settings()), timings)
    # indexed (and embedded) before the job ends: a job that is done can be found
    job.update_index(runtime.index_or_none(), runtime.storage(), plan.spec.media_id)
    _finish(job_id, manifest)


def _finish(job_id: str, manifest: dict[str, Any]) -> None:
    """End the job as its manifest says: done, partial (with its count of failed rows), or failed (every row)."""
    status = manifest["status"]
    fields: dict[str, Any] = {}
    if status != "done":
        fields = {"error": manifest.get("error") or "", "failed_rows": (manifest.get("rows") or {}).get("failed", 0)}
    if runtime.state().finish(job_id, status, **fields):
        runtime.state().incr(job_id, "finalized")
        metrics.JOBS.labels(queue=MEDIA_QUEUE, model=runtime.settings().model, status=status).inc()
        if status == "partial":
            log.warning("job %s ended partial: %s", job_id, manifest.get("error"))
