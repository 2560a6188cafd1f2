"""``omniq.infer`` (a model's GPU queue): the transcript, captions and summaries of a batch of chunks."""

from __future__ import annotations

import time

from celery import Task

from pipeline import job
from workers import metrics, runtime
from workers.app import app
from workers.state import JobState
from workers.steps.base import OmniqTask
from workers.steps.flow import chunks_done


@app.task(name="omniq.infer", base=OmniqTask, bind=True)
def infer(self: Task, job_id: str, source: str, chunks: list[int], unit: str | None = None) -> None:
    """Run the model on a batch of chunks; the task that completes the last chunk sends ``omniq.summarize``."""
    plan = job.load_plan(runtime.storage(), job_id)
    job_settings = job.settings_for(plan.spec, runtime.settings(), runs_model=True)
    started = time.monotonic()
    runtime.state().redis.hsetnx(
        JobState.key(job_id), "infer_started_at", time.time()
    )  # infer_s runs from the first batch
    job.infer_chunks(plan, chunks, runtime.engine(), runtime.storage(), job_settings, runtime.chunk_budget())
    metrics.CHUNKS.labels(queue=self.queue_name, model=runtime.settings().model).inc(len(chunks))
    self.send_event("task-progress", job_id=job_id, chunks=chunks, seconds=round(time.monotonic() - started, 3))
    chunks_done(plan, chunks)
