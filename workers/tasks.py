"""Thin Celery tasks: decode ids, call a ``pipeline.job`` step, record state, hand on to the next step.

Retry policy lives in :class:`OmniqTask`: transient errors retry with backoff and jitter; permanent
errors (corrupt media, limits, bad config) fail the job at once with the reason in its manifest and
state, and the worker goes on serving other jobs.
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any

import redis
from celery import Task

from pipeline import job
from pipeline.config import Settings
from pipeline.engines.base import Engine
from pipeline.errors import OmniqError, TransientError
from pipeline.storage import Storage, open_storage
from workers import metrics
from workers.app import GPU_QUEUE, MEDIA_QUEUE, TASK_ROUTES, app
from workers.state import JobState


def task_repr(job_id: str, source: str, **extra: object) -> str:
    """What Flower shows as a task's kwargs: the job, the source and a few numbers, never the whole spec."""
    parts = [f"job_id={job_id!r}", f"source={source!r}", *(f"{k}={v!r}" for k, v in extra.items())]
    return "{" + ", ".join(parts) + "}"


def broker_priority(priority: int) -> int:
    """omniq's priority (9 = most urgent) as the Redis transport's (0 is served first)."""
    return 9 - max(0, min(9, priority))


log = logging.getLogger(__name__)

FINALIZE_CLAIM_SECONDS = 900


@cache
def settings() -> Settings:
    return Settings()


@cache
def storage() -> Storage:
    return open_storage(settings().storage_url, settings())


@cache
def state() -> JobState:
    return JobState.from_url(settings().broker_url)


@cache
def search_index():  # type: ignore[no-untyped-def]
    """The search index finished jobs are added to (opened lazily in the worker process, after the fork)."""
    from pipeline.search import open_index

    return open_index(settings().index_url, settings())


@cache
def engine() -> Engine:
    """One model per worker process, loaded on first use (not in worker_process_init)."""
    from pipeline.engines.omni import OmniEngine

    model = OmniEngine(settings())
    model.batch_observers.append(_observe_batch)
    return model


def _observe_batch(rows: int, new_tokens: int, seconds: float) -> None:
    labels = {"queue": GPU_QUEUE, "model": settings().model}
    metrics.BATCH_SIZE.labels(**labels).observe(rows)
    metrics.MODEL_SECONDS.labels(**labels).inc(seconds)
    metrics.GENERATED_TOKENS.labels(**labels).inc(new_tokens)
    if seconds > 0:
        metrics.TOKENS_PER_SECOND.labels(**labels).observe(new_tokens / seconds)


class OmniqTask(Task):
    """Shared behaviour: retry transient errors; record permanent failures on the job."""

    autoretry_for = (TransientError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
    retry_backoff = 5
    retry_jitter = True
    acks_late = True
    reject_on_worker_lost = True
    max_retries = settings().max_retries
    retry_backoff_max = settings().retry_backoff_max_seconds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Time every task and how long it waited in its queue: one place for all tasks."""
        labels = {"queue": self.queue_name, "model": settings().model, "task": self.name}
        sent_at = getattr(self.request, "omniq_sent_at", None) or (self.request.headers or {}).get("omniq_sent_at")
        if sent_at:
            metrics.QUEUE_WAIT.labels(**labels).observe(max(0.0, time.time() - float(sent_at)))
        started = time.monotonic()
        try:
            return super().__call__(*args, **kwargs)
        finally:
            metrics.TASK_SECONDS.labels(**labels).observe(time.monotonic() - started)

    @property
    def queue_name(self) -> str:
        return TASK_ROUTES.get(self.name, {}).get("queue", MEDIA_QUEUE)

    def publish(self, priority: int, task_id: str | None = None, *, connection: Any = None, **kwargs: Any) -> None:
        """Publish this task with readable kwargs for Flower, the job's priority and the send time.

        ``connection`` reuses an open broker connection (the producer sends many messages over one).
        """
        readable = {k: v for k, v in kwargs.items() if k not in ("job_id", "source", "spec")}
        self.apply_async(
            kwargs=kwargs,
            task_id=task_id,
            priority=broker_priority(priority),
            kwargsrepr=task_repr(kwargs["job_id"], kwargs["source"], **readable),
            headers={"omniq_sent_at": time.time()},
            connection=connection,
        )

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        metrics.RETRIES.labels(queue=self.queue_name, model=settings().model, task=self.name).inc()
        log.warning("%s for job %s will be retried: %s", self.name, kwargs.get("job_id"), exc)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = kwargs.get("job_id")
        log.error("%s failed for job %s: %s", self.name, job_id, exc)
        if not job_id:
            return
        if state().status(job_id) == "done":  # a late duplicate must not turn a finished job into a failure
            log.warning("ignoring failure of a late %s for finished job %s", self.name, job_id)
            return
        try:
            spec = job.JobSpec.from_dict(kwargs["spec"]) if "spec" in kwargs else _spec(job_id)
            job.write_failure(spec, storage(), settings(), exc, state().timings(job_id))
            job.update_index(_index_or_none(), storage(), spec.media_id)
        finally:
            state().set_status(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            metrics.JOBS.labels(queue=self.queue_name, model=settings().model, status="failed").inc()


def _index_or_none():  # type: ignore[no-untyped-def]
    try:
        return search_index()
    except OmniqError as error:  # a broken index must not fail jobs; 'omniq index rebuild' repairs it
        log.warning("search index unavailable: %s", error)
        return None


def _spec(job_id: str) -> job.JobSpec:
    import json

    raw = state().redis.hget(JobState.key(job_id), "spec")
    if not raw:
        raise OmniqError(f"job {job_id}: no state in Redis; re-enqueue the file")
    return job.JobSpec.from_dict(json.loads(raw))


def _finished(job_id: str, *also: str) -> bool:
    """True when a (late or duplicate) message arrives for a job that has ended; it is then dropped."""
    return state().status(job_id) in ("done", "failed", *also)


def _is_redelivery(task: Task) -> bool:
    return bool((task.request.delivery_info or {}).get("redelivered"))


@app.task(name="omniq.ingest", base=OmniqTask, bind=True)
def ingest(self: Task, job_id: str, source: str, spec: dict[str, Any]) -> None:
    """Probe, plan and extract a file, then send one ``omniq.infer`` per batch of chunks."""
    if _finished(job_id):
        return
    job_spec = job.JobSpec.from_dict(spec)
    job_settings = job.settings_for(job_spec, settings())
    state().set_status(job_id, "ingesting")
    plan = job.ingest(job_spec, job_settings, storage())
    state().add_timings(job_id, plan.timings)
    state().set_status(job_id, "running", chunks_total=len(plan.chunks))
    labels = {"queue": MEDIA_QUEUE, "model": settings().model}
    metrics.MEDIA_SECONDS.labels(**labels).inc(plan.info.duration_s)
    metrics.FFMPEG_SECONDS.labels(**labels).observe(plan.timings.get("ffmpeg_s", 0.0))
    self.send_event("task-progress", job_id=job_id, step="ingested", chunks=len(plan.chunks))
    indices = [c.index for c in plan.chunks]
    size = job_settings.batch_size
    for first in range(0, len(indices), size):
        group = indices[first : first + size]
        infer.publish(job_spec.priority, f"{job_id}-infer-{group[0]}", job_id=job_id, source=source, chunks=group)


@app.task(name="omniq.infer", base=OmniqTask, bind=True)
def infer(self: Task, job_id: str, source: str, chunks: list[int]) -> None:
    """Run the model on a batch of chunks; the task that completes the last chunk sends ``omniq.summarize``."""
    if _finished(job_id):
        return
    plan = job.load_plan(storage(), job_id)
    job_settings = job.settings_for(plan.spec, settings())
    started = time.monotonic()
    job.infer_chunks(plan, chunks, engine(), storage(), job_settings)
    metrics.CHUNKS.labels(queue=GPU_QUEUE, model=settings().model).inc(len(chunks))
    self.send_event("task-progress", job_id=job_id, chunks=chunks, seconds=round(time.monotonic() - started, 3))
    done, completed_job = state().complete_chunks(job_id, chunks, len(plan.chunks))
    # a redelivered task whose first delivery died before publishing summarize sends it now
    resend = _is_redelivery(self) and done >= len(plan.chunks) and state().status(job_id) == "running"
    if completed_job or resend:
        state().incr(job_id, "summarize_sent")
        summarize.publish(plan.spec.priority, f"{job_id}-summarize", job_id=job_id, source=source)


@app.task(name="omniq.summarize", base=OmniqTask, bind=True)
def summarize(self: Task, job_id: str, source: str) -> None:
    """Write the file summary from the chunk summaries, then send ``omniq.finalize``."""
    if _finished(job_id, "finalizing"):
        return
    state().set_status(job_id, "summarizing")
    state().incr(job_id, "summarize_runs")
    plan = job.load_plan(storage(), job_id)
    started = time.monotonic()
    job.summarize(plan, engine(), storage(), job.settings_for(plan.spec, settings()))
    state().add_timings(job_id, {"summarize_s": round(time.monotonic() - started, 3)})
    finalize.publish(plan.spec.priority, f"{job_id}-finalize", job_id=job_id, source=source)


@app.task(name="omniq.finalize", base=OmniqTask, bind=True)
def finalize(self: Task, job_id: str, source: str) -> None:
    """Write the result files and the manifest, exactly once per job run."""
    if _finished(job_id):
        return
    token = state().claim(job_id, "finalize", FINALIZE_CLAIM_SECONDS)
    if token is None:
        if _is_redelivery(self):  # the holder died mid-way; wait for its claim to expire
            raise self.retry(countdown=60, max_retries=FINALIZE_CLAIM_SECONDS // 60 + 2)
        return  # a duplicate message: the holder finishes the job
    try:
        state().set_status(job_id, "finalizing")
        state().incr(job_id, "finalize_runs")
        plan = job.load_plan(storage(), job_id)
        created = float((state().redis.hget(JobState.key(job_id), "created_at")) or time.time())
        timings = state().timings(job_id) | {"total_s": round(time.time() - created, 3)}
        job.finalize(plan, storage(), job.settings_for(plan.spec, settings()), timings)
        state().set_status(job_id, "done")
        metrics.JOBS.labels(queue=MEDIA_QUEUE, model=settings().model, status="done").inc()
        job.update_index(_index_or_none(), storage(), plan.spec.media_id)
    finally:
        state().release(job_id, "finalize", token)
