"""``omniq.ingest`` (media queue): probe, plan and decode a file, then send its infer units."""

from __future__ import annotations

from typing import Any

from celery import Task

from pipeline import job
from workers import metrics, runtime
from workers.app import MEDIA_QUEUE, app
from workers.steps.base import RUNS_IN, OmniqTask
from workers.steps.infer import infer


@app.task(name="omniq.ingest", base=OmniqTask, bind=True)
def ingest(self: Task, job_id: str, source: str, spec: dict[str, Any]) -> None:
    """Probe, plan and extract a file, then send one ``omniq.infer`` per batch of chunks."""
    job_spec = job.JobSpec.from_dict(spec)  # checked with the message (workers.messages)
    job_settings = job.settings_for(job_spec, runtime.settings())
    job.check_input(job_spec, runtime.settings(), runtime.storage())
    runtime.state().advance(job_id, "ingesting", from_=("queued",))
    plan = job.ingest(job_spec, job_settings, runtime.storage())
    runtime.state().add_timings(job_id, plan.timings)
    labels = {"queue": MEDIA_QUEUE, "model": runtime.settings().model}
    metrics.MEDIA_SECONDS.labels(**labels).inc(plan.info.duration_s)
    metrics.FFMPEG_SECONDS.labels(**labels).observe(plan.timings.get("ffmpeg_s", 0.0))
    indices = [c.index for c in plan.chunks]
    size = job_settings.batch_size
    groups = [indices[first : first + size] for first in range(0, len(indices), size)]
    if not runtime.state().advance(job_id, "running", from_=RUNS_IN["omniq.ingest"], chunks_total=len(plan.chunks)):
        return  # cancelled, or a later step runs: this was a late duplicate
    self.send_event("task-progress", job_id=job_id, step="ingested", chunks=len(plan.chunks))
    for group in groups:
        infer.publish(
            job_spec.priority, f"{job_id}-infer-{group[0]}", model=job_spec.config.get("model"),
            job_id=job_id, source=source, chunks=group,
        )  # fmt: skip
    runtime.state().mark_sent([(job_id, f"infer-{group[0]}", group) for group in groups])
