"""Thin Celery tasks: decode ids, call a ``pipeline.job`` step, record state, hand on to the next step.

Every message is one *unit* of a job (``ingest``, ``infer-<first chunk>``, ``summarize``, ``finalize``).
:class:`OmniqTask` holds the unit's lease while it runs (``workers.leases``), drops duplicates of units that
are done or held by a live worker, retries transient errors on a time budget, and fails the job with the
reason in its manifest and state for permanent errors, or when the unit has killed its worker too often.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import cache, wraps
from typing import Any, TypeVar

import redis
from celery import Task
from celery.exceptions import Ignore, Retry
from kombu.exceptions import OperationalError

from pipeline import deadlines, job
from pipeline.config import Settings
from pipeline.engines.base import Engine
from pipeline.errors import MalformedMessage, OmniqError, SourceNotFound, TransientError
from pipeline.results.finalize import error_text, job_manifest
from pipeline.storage import Storage, open_storage
from workers import metrics
from workers.app import GPU_QUEUE, GPU_TASKS, MEDIA_QUEUE, app, gpu_queue_for
from workers.leases import Acquired, Leases, holder_name
from workers.messages import JOB_ID, check_message
from workers.recovery import FINALIZE, INGEST, SUMMARIZE, describe
from workers.state import FINISHED, PENDING_FAILURES, JobState
from workers.threads import SoloGate


def task_repr(job_id: str, source: str, **extra: object) -> str:
    """What Flower shows as a task's kwargs: the job, the source and a few numbers, never the whole spec."""
    parts = [f"job_id={job_id!r}", f"source={source!r}", *(f"{k}={v!r}" for k, v in extra.items())]
    return "{" + ", ".join(parts) + "}"


def broker_priority(priority: int) -> int:
    """omniq's priority (9 = most urgent) as the Redis transport's (0 is served first)."""
    return 9 - max(0, min(9, priority))


log = logging.getLogger(__name__)
T = TypeVar("T")


def once(factory: Callable[[], T]) -> Callable[[], T]:
    """``functools.cache`` for a no-argument factory, safe when the GPU worker's threads first call it at the
    same moment (two engines would load the model twice, and transformers' lazy imports race)."""
    cached = cache(factory)
    lock = threading.Lock()

    @wraps(factory)
    def get() -> T:
        with lock:
            return cached()

    return get


# The job statuses in which each task may run; a message that finds its job in another is a late duplicate.
RUNS_IN = {
    "omniq.ingest": ("queued", "ingesting", "running"),
    "omniq.infer": ("running",),
    "omniq.summarize": ("running", "summarizing"),
    "omniq.finalize": ("summarizing", "finalizing"),
}

# What a transient failure looks like from inside a task: retried on the time budget, never a job failure.
TRANSIENT = (TransientError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)


@once
def settings() -> Settings:
    return Settings()


@once
def storage() -> Storage:
    return open_storage(settings().storage_url, settings())


@once
def state() -> JobState:
    return JobState.from_url(settings().broker_url, retry_seconds=settings().redis_retry_seconds)


@once
def leases() -> Leases:
    return Leases(state(), settings().lease_seconds, settings().lease_renew_seconds)


@once
def search_index():  # type: ignore[no-untyped-def]
    """The search index finished jobs are added to (opened lazily in the worker process, after the fork)."""
    from pipeline.search import open_index

    return open_index(settings().index_url, settings())


@once
def engine() -> Engine:
    """One model per worker process, loaded on first use (not in worker_process_init).

    Pipelined: the GPU worker runs several messages at once (``gpu_slots``) and their rows share batches, while
    the next batch is prepared beside the running one (``pipeline.engines.pipelined``).
    """
    from pipeline.engines import whisper
    from pipeline.engines.omni import OmniEngine
    from pipeline.engines.pipelined import PipelinedEngine

    model = OmniEngine(settings())
    model.batch_observers.append(_observe_batch)
    whisper.OBSERVERS.append(_observe_asr)
    return PipelinedEngine(model, settings())


@once
def chunk_budget() -> job.ChunkBudget:
    """How many chunks this worker holds decoded at once, across the messages it works on."""
    return job.ChunkBudget(2 * settings().batch_size)


def gpu_slots(config: Settings) -> int:
    """How many messages a GPU worker works on at once: twice the chunk budget of one-chunk messages, so that
    the next ones are fetched and prepared while the model runs the last ones' rows (``bench_gpu_worker``:
    with 2 x batch the model waited at each turn of the messages)."""
    return config.gpu_slots or 4 * config.batch_size


def _observe_asr(audio_seconds: float, seconds: float) -> None:
    labels = {"queue": GPU_QUEUE, "model": settings().model}
    metrics.ASR_AUDIO_SECONDS.labels(**labels).inc(audio_seconds)
    metrics.ASR_SECONDS.labels(**labels).inc(seconds)


def _observe_batch(rows: int, new_tokens: int, seconds: float) -> None:
    labels = {"queue": GPU_QUEUE, "model": settings().model}
    metrics.BATCH_SIZE.labels(**labels).observe(rows)
    metrics.MODEL_SECONDS.labels(**labels).inc(seconds)
    metrics.GENERATED_TOKENS.labels(**labels).inc(new_tokens)
    if seconds > 0:
        metrics.TOKENS_PER_SECOND.labels(**labels).observe(new_tokens / seconds)


def unit_of(task_name: str, kwargs: dict[str, Any]) -> str:
    """The unit a message carries (see ``workers.state``)."""
    if task_name == "omniq.infer":
        return str(kwargs.get("unit") or f"infer-{kwargs['chunks'][0]}")
    return task_name.removeprefix("omniq.")


def retry_delay(attempt: int, floor: float, ceiling: float) -> float:
    """Exponential backoff with jitter, never under ``floor``: 5 s, ~10 s, ~20 s ... up to ``ceiling``."""
    exponential = min(ceiling, floor * 2**attempt)
    return max(floor, exponential * random.uniform(0.5, 1.0))


class OmniqTask(Task):
    """Shared behaviour: leases, duplicate drops, budgeted retries, failures recorded on the job."""

    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # retries end on a time budget (_retry_later), not on a count
    # omniq's own errors are expected outcomes: Celery logs them in one INFO line, no traceback ("raised
    # expected"); fail_job logs the one ERROR line; tracebacks are for the unexpected
    throws = (OmniqError,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Time every task and how long it waited in its queue: one place for all tasks."""
        labels = {"queue": self.queue_name, "model": settings().model, "task": self.name}
        sent_at = getattr(self.request, "omniq_sent_at", None) or (self.request.headers or {}).get("omniq_sent_at")
        if sent_at:
            metrics.QUEUE_WAIT.labels(**labels).observe(max(0.0, time.time() - float(sent_at)))
        started = time.monotonic()
        try:
            check_message(self.name, args, kwargs, settings(), storage())
            return self._run_unit(args, kwargs)
        except MalformedMessage as error:
            return _refuse_message(self.name, self.request.id, kwargs, error)
        finally:
            metrics.TASK_SECONDS.labels(**labels).observe(time.monotonic() - started)

    def _run_unit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        job_id, unit = kwargs["job_id"], unit_of(self.name, kwargs)
        received = _take_received(self.request.id)  # the lease taken when the message arrived, if any
        status = state().status(job_id)
        # a late duplicate (the job ended or moved past this step), a unit already done, or a job whose state
        # was lost (``omniq recover`` and the watchdog send its work again): nothing to do
        if status not in RUNS_IN[self.name]:
            log.info("dropping %s of job %s: the job is %s", unit, job_id, status or "unknown to Redis")
            return _hand_back(job_id, unit, received)
        if state().is_unit_done(job_id, unit):
            log.info("dropping %s of job %s: that unit is done", unit, job_id)
            return _hand_back(job_id, unit, received)
        shared = runs_shared(self.name)
        lease = received or leases().acquire(job_id, unit, shared=shared)
        if not lease.held:
            holder = holder_name(lease.other)
            log.info("dropping a duplicate %s of job %s: %s is held by %s", self.name, job_id, unit, holder)
            return None
        chunks = kwargs.get("chunks")
        try:
            if lease.died_now:
                metrics.WORKER_DEATHS.labels(queue=self.queue_name, model=settings().model).inc()
            # (deaths counted when a model call hung are on the unit before it starts again)
            if lease.deaths >= settings().max_worker_deaths:
                give_up(job_id, unit, chunks, _death_reason(job_id, unit, chunks, lease.deaths))
                return None
            deadlines.set_owner((job_id, unit))  # work it hands to the model is watched for this unit
            with _gate_for(job_id, unit, lease) if shared else nullcontext():
                result = super().__call__(*args, **kwargs)
            state().unit_done(job_id, unit)
            _clean_if_ended(job_id, unit)
            return result
        except TRANSIENT as error:
            raise self._retry_later(job_id, unit, error) from error
        except deadlines.DeadlineExceeded as error:  # stopped at its deadline: counted like a death, sent again
            raise self._after_deadline(job_id, unit, chunks, lease, error) from error
        finally:
            deadlines.set_owner(None)
            leases().release(job_id, unit, lease.holder)

    def _after_deadline(
        self, job_id: str, unit: str, chunks: list[int] | None, lease: Acquired, error: deadlines.DeadlineExceeded
    ) -> BaseException:
        """Count a step stopped at its deadline like a death of its unit; run it again later, or give it up."""
        deaths = leases().time_out(job_id, unit, lease.holder)
        metrics.WORKER_DEATHS.labels(queue=self.queue_name, model=settings().model).inc()
        if deaths >= settings().max_worker_deaths:
            give_up(job_id, unit, chunks, _death_reason(job_id, unit, chunks, deaths))
            return Ignore()
        config = settings()
        delay = retry_delay(self.request.retries, config.retry_min_seconds, config.retry_max_seconds)
        reason = f"{describe(unit, chunks)} was stopped at its deadline: {error}"
        log.error("%s of job %s: %s; next attempt in %.0f s", unit, job_id, reason, delay)
        try:
            state().unit_retrying(job_id, unit, reason, time.time() + delay)
            return self.retry(exc=error, countdown=delay)
        except Retry as retry:
            return retry
        except Exception as unsent:  # Redis is down: the watchdog sends the unit again once it is back
            log.warning("%s of job %s: cannot schedule its retry (%s); the watchdog resends it", unit, job_id, unsent)
            return Ignore()

    def _retry_later(self, job_id: str, unit: str, error: BaseException) -> BaseException:
        """Retry with backoff until the budget is spent; then the error becomes the job's failure."""
        config = settings()
        reason = str(error) or type(error).__name__
        since = state().retry_since(job_id, unit) or time.time()
        if time.time() - since >= config.retry_budget_seconds:
            minutes = config.retry_budget_seconds / 60
            return _GaveUp(f"{error_text(error)} (still failing after {minutes:g} min of retries)")
        delay = retry_delay(self.request.retries, config.retry_min_seconds, config.retry_max_seconds)
        try:
            state().unit_retrying(job_id, unit, reason, time.time() + delay)
            metrics.RETRIES.labels(queue=self.queue_name, model=config.model, task=self.name).inc()
            log.warning("%s of job %s: %s; next attempt in %.0f s", unit, job_id, reason, delay)
            return self.retry(exc=error, countdown=delay)
        except Retry as retry:
            return retry
        except Exception as unsent:  # Redis itself is down: the watchdog sends the unit again once it is back
            log.warning("%s of job %s: cannot schedule its retry (%s); the watchdog resends it", unit, job_id, unsent)
            return Ignore()

    @property
    def queue_name(self) -> str:
        """The kind of queue (``media`` or ``gpu``) this task runs on, as metrics label it."""
        return GPU_QUEUE if self.name in GPU_TASKS else MEDIA_QUEUE

    def publish(
        self,
        priority: int,
        task_id: str | None = None,
        *,
        model: str | None = None,
        connection: Any = None,
        **kwargs: Any,
    ) -> None:
        """Publish this task with readable kwargs for Flower, the job's priority and the send time.

        GPU tasks go to the queue of the job's ``model``; ``connection`` reuses an open broker connection
        (the producer sends many messages over one).
        """
        readable = {k: v for k, v in kwargs.items() if k not in ("job_id", "source", "spec")}
        self.apply_async(
            kwargs=kwargs,
            task_id=task_id,
            queue=gpu_queue_for(model or settings().model) if self.name in GPU_TASKS else MEDIA_QUEUE,
            priority=broker_priority(priority),
            kwargsrepr=task_repr(kwargs["job_id"], kwargs["source"], **readable),
            headers={"omniq_sent_at": time.time()},
            connection=connection,
        )

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        pass  # counted and logged in _retry_later, where the delay is known

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A permanent error (or a spent retry budget) fails the job; never raises."""
        job_id = kwargs.get("job_id")
        if isinstance(exc, Retry):
            return
        if not isinstance(exc, OmniqError):
            log.error("%s of job %s raised an unexpected error", self.name, job_id, exc_info=exc)
        if job_id and isinstance(exc, _GaveUp):  # its rows fail; the job goes on without them
            give_up(job_id, unit_of(self.name, kwargs), kwargs.get("chunks"), error_text(exc), kwargs.get("spec"))
        elif job_id:
            fail_job(job_id, error_text(exc), kwargs.get("spec"))


def _death_reason(job_id: str, unit: str, chunks: list[int] | None, deaths: int) -> str:
    """Why a unit is given up at the death limit: ``worker died 3 times while ingesting (2 of them at the step's
    deadline)``."""
    reason = f"worker died {deaths} times while {describe(unit, chunks)}"
    timeouts = int(state().units(job_id).get(f"{unit}:timeouts") or 0)
    return reason + (f" ({min(timeouts, deaths)} of them at its deadline)" if timeouts else "")


def _refuse_message(task: str, task_id: str | None, kwargs: dict[str, Any], error: MalformedMessage) -> None:
    """Drop a message omniq did not write; but a job whose own spec (as its record holds it) cannot run fails."""
    metrics.MALFORMED_MESSAGES.labels(queue=MEDIA_QUEUE if task not in GPU_TASKS else GPU_QUEUE, task=task).inc()
    job_id = kwargs.get("job_id")
    if task == "omniq.ingest" and isinstance(job_id, str) and JOB_ID.fullmatch(job_id):
        import json

        stored = state().redis.hget(JobState.key(job_id), "spec")
        if stored and json.loads(stored) == kwargs.get("spec"):
            fail_job(job_id, f"its spec cannot run here: {error}")
            return
    log.error("dropping a malformed %s message (task %s): %s", task, task_id, error)


def runs_shared(task_name: str) -> bool:
    """In a GPU worker with several slots, units share the process: a death there may be another's fault."""
    return task_name in GPU_TASKS and gpu_slots(settings()) > 1


_received: dict[str, Acquired] = {}  # task id -> the lease its unit got when the message arrived
_received_lock = threading.Lock()


def lease_on_receipt(task_id: str, task_name: str, kwargs: dict[str, Any]) -> None:
    """Take a unit's lease as soon as a GPU worker receives its message (``workers.lifecycle``).

    A GPU worker holds several messages at once; one killed before a message's thread started it would
    otherwise leave a message that Redis returns only after its visibility timeout. With the lease taken
    here, the lease expires with the worker and the watchdog sends the unit again. Never raises: the task
    takes its lease when it runs if this could not."""
    try:
        check_message(task_name, (), kwargs, settings(), storage())  # a malformed message gets no lease
        job_id, unit = kwargs["job_id"], unit_of(task_name, kwargs)
        if state().is_unit_done(job_id, unit):
            return
        lease = leases().acquire(job_id, unit, shared=runs_shared(task_name))
    except Exception as error:
        log.warning("could not take the lease of %s on receipt (taken when it runs): %s", task_id, error)
        return
    if lease.held:
        with _received_lock:
            _received[task_id] = lease


def _take_received(task_id: str | None) -> Acquired | None:
    with _received_lock:
        return _received.pop(task_id or "", None)


def _hand_back(job_id: str, unit: str, received: Acquired | None) -> None:
    if received is not None:
        leases().hand_back(job_id, unit, received.holder)


@once
def solo_gate() -> SoloGate:
    return SoloGate()


@contextmanager
def _gate_for(job_id: str, unit: str, lease: Acquired) -> Iterator[None]:
    """Run beside the other slots, or alone when the unit was in a worker that died (then a death is its own)."""
    if not lease.suspect:
        with solo_gate().shared():
            yield
        return
    log.warning("%s of job %s was in a worker that died: running it alone", unit, job_id)
    with solo_gate().solo():
        leases().run_alone(job_id, unit)
        yield


class _GaveUp(TransientError):
    """A transient error that outlived the retry budget: raised so that on_failure gives the unit up."""


def give_up(job_id: str, unit: str, chunks: list[int] | None, reason: str, spec: dict[str, Any] | None = None) -> None:
    """A unit that will not succeed (its retries are spent, or it took its worker down too often). An infer unit's
    rows fail (every row of its chunks not stored yet) and so does a summarize's file summary: the job goes on to
    a ``partial`` result (README "Partial results"). Any other unit, or ``OMNIQ_PARTIAL=false``, fails the job.
    Never raises."""
    if not settings().partial or not (unit.startswith("infer-") or unit == SUMMARIZE):
        fail_job(job_id, reason, spec)
        return
    try:
        plan = job.load_plan(storage(), job_id)
        if unit == SUMMARIZE:
            job.fail_file_summary(plan, storage(), reason)
            state().unit_done(job_id, SUMMARIZE)
            if state().advance(job_id, "summarizing", from_=RUNS_IN["omniq.summarize"]):
                finalize.publish(plan.spec.priority, f"{job_id}-finalize", job_id=job_id, source=plan.spec.source)
                state().mark_sent([(job_id, FINALIZE, None)])
        else:
            chunks = chunks or [int(c) for c in (state().units(job_id).get(f"{unit}:chunks") or "").split(",") if c]
            written = job.fail_chunks(plan, chunks, reason, storage())
            log.error("job %s: %s gave up (%s); its rows are recorded as failed: chunks %s", job_id, unit, reason,
                      written)  # fmt: skip
            state().unit_done(job_id, unit)
            _chunks_done(plan, chunks)
    except Exception:  # e.g. the store is what keeps failing: then the job fails, as without partial results
        log.exception("job %s: could not record the failed rows of %s; failing the job", job_id, unit)
        fail_job(job_id, reason, spec)


def _chunks_done(plan: job.JobPlan, chunks: list[int]) -> None:
    """Count ``chunks`` as done; the call that completes the job (or a unit sent again after its worker died
    between the last chunk and sending summarize) sends ``omniq.summarize``."""
    job_id = plan.spec.job_id
    done, completed_job = state().complete_chunks(job_id, chunks, len(plan.chunks))
    if completed_job:  # the job's model time, as a local run records it: from the first batch to the last
        first = float(state().redis.hget(JobState.key(job_id), "infer_started_at") or time.time())
        state().add_timings(job_id, {"infer_s": round(time.time() - first, 3)})
    if completed_job or (done >= len(plan.chunks) and not state().was_sent(job_id, SUMMARIZE)):
        state().incr(job_id, "summarize_sent")
        model, source = plan.spec.config.get("model"), plan.spec.source
        summarize.publish(plan.spec.priority, f"{job_id}-summarize", model=model, job_id=job_id, source=source)
        state().mark_sent([(job_id, SUMMARIZE, None)])


def fail_job(job_id: str, reason: str, spec: dict[str, Any] | None = None) -> None:
    """End a job as failed with ``reason`` in its state and manifest. Never raises.

    The manifest is written now if the store answers, else the watchdog writes it once the store is back
    (the job is kept in ``omniq:pending-failures`` until then).
    """
    try:
        if not state().finish(job_id, "failed", error=reason):
            log.warning("job %s has already ended; not recording this failure: %s", job_id, reason)
            return
        log.error("job %s failed: %s", job_id, reason)
        metrics.JOBS.labels(queue=MEDIA_QUEUE, model=settings().model, status="failed").inc()
        state().redis.sadd(PENDING_FAILURES, job_id)
        if spec is not None and not state().redis.hexists(JobState.key(job_id), "spec"):
            state().touch(job_id, spec=spec)
        write_failure_manifest(job_id)
    except Exception:  # a failure handler must never fail: the job's state or manifest waits for the watchdog
        log.exception("could not record the failure of job %s (the watchdog will try again)", job_id)


def write_failure_manifest(job_id: str) -> bool:
    """Write a failed job's manifest (and drop it from the index); True when written or not needed."""
    record = state().redis.hgetall(JobState.key(job_id))
    if record.get("status") != "failed" or not record.get("spec"):
        state().redis.srem(PENDING_FAILURES, job_id)
        return True
    import json

    try:
        spec = job.JobSpec.from_dict(json.loads(record["spec"]))
    except MalformedMessage as error:  # a record omniq did not write names no media to write a manifest for
        log.error("job %s failed; no manifest is written, its record in Redis is malformed: %s", job_id, error)
        state().redis.srem(PENDING_FAILURES, job_id)
        return True
    timings = state().timings(job_id)
    if record.get("created_at"):  # as long as it ran, like a done job's total
        timings["total_s"] = round(float(record.get("updated_at") or time.time()) - float(record["created_at"]), 3)
    try:
        job.write_failure(spec, storage(), settings(), record.get("error") or "failed", timings)
    except OmniqError as error:
        log.warning("the failed manifest of job %s is not written yet (will try again): %s", job_id, error)
        return False
    job.update_index(_index_or_none(), storage(), spec.media_id)
    state().redis.srem(PENDING_FAILURES, job_id)
    return True


def _clean_if_ended(job_id: str, unit: str) -> None:
    """A step that ran while its job was cancelled (or a late duplicate that wrote files after the job ended)
    removes what it wrote."""
    status = state().status(job_id)
    # a partial job keeps its work files for a retry
    if unit != FINALIZE and status in FINISHED and status != "partial" and not settings().keep_work:
        storage().delete_prefix(job.work_prefix(job_id))


def _index_or_none():  # type: ignore[no-untyped-def]
    try:
        return search_index()
    except OmniqError as error:  # a broken index must not fail jobs; 'omniq index rebuild' repairs it
        log.warning("search index unavailable: %s", error)
        return None


def publish_unit(
    spec: job.JobSpec, unit: str, chunks: list[int] | None = None, suffix: str = "", new_unit: bool = False
) -> None:
    """Send one unit of a job (the watchdog and ``omniq recover`` use this) and record it as sent.

    ``new_unit`` records ``chunks`` as the unit's batch (a unit sent again keeps its original batch)."""
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
    state().mark_sent([(spec.job_id, unit, chunks if new_unit else None)])


@app.task(name="omniq.ingest", base=OmniqTask, bind=True)
def ingest(self: Task, job_id: str, source: str, spec: dict[str, Any]) -> None:
    """Probe, plan and extract a file, then send one ``omniq.infer`` per batch of chunks."""
    job_spec = job.JobSpec.from_dict(spec)  # checked with the message (workers.messages)
    job_settings = job.settings_for(job_spec, settings())
    job.check_input(job_spec, settings(), storage())
    state().advance(job_id, "ingesting", from_=("queued",))
    plan = job.ingest(job_spec, job_settings, storage())
    state().add_timings(job_id, plan.timings)
    labels = {"queue": MEDIA_QUEUE, "model": settings().model}
    metrics.MEDIA_SECONDS.labels(**labels).inc(plan.info.duration_s)
    metrics.FFMPEG_SECONDS.labels(**labels).observe(plan.timings.get("ffmpeg_s", 0.0))
    indices = [c.index for c in plan.chunks]
    size = job_settings.batch_size
    groups = [indices[first : first + size] for first in range(0, len(indices), size)]
    if not state().advance(job_id, "running", from_=RUNS_IN["omniq.ingest"], chunks_total=len(plan.chunks)):
        return  # cancelled, or a later step runs: this was a late duplicate
    self.send_event("task-progress", job_id=job_id, step="ingested", chunks=len(plan.chunks))
    for group in groups:
        infer.publish(
            job_spec.priority, f"{job_id}-infer-{group[0]}", model=job_spec.config.get("model"),
            job_id=job_id, source=source, chunks=group,
        )  # fmt: skip
    state().mark_sent([(job_id, f"infer-{group[0]}", group) for group in groups])


@app.task(name="omniq.infer", base=OmniqTask, bind=True)
def infer(self: Task, job_id: str, source: str, chunks: list[int], unit: str | None = None) -> None:
    """Run the model on a batch of chunks; the task that completes the last chunk sends ``omniq.summarize``."""
    plan = job.load_plan(storage(), job_id)
    job_settings = job.settings_for(plan.spec, settings(), runs_model=True)
    started = time.monotonic()
    state().redis.hsetnx(JobState.key(job_id), "infer_started_at", time.time())  # infer_s runs from the first batch
    job.infer_chunks(plan, chunks, engine(), storage(), job_settings, chunk_budget())
    metrics.CHUNKS.labels(queue=self.queue_name, model=settings().model).inc(len(chunks))
    self.send_event("task-progress", job_id=job_id, chunks=chunks, seconds=round(time.monotonic() - started, 3))
    _chunks_done(plan, chunks)


@app.task(name="omniq.summarize", base=OmniqTask, bind=True)
def summarize(self: Task, job_id: str, source: str) -> None:
    """Write the file summary from the chunk summaries, then send ``omniq.finalize``."""
    if not state().advance(job_id, "summarizing", from_=RUNS_IN["omniq.summarize"]):
        return
    state().incr(job_id, "summarize_runs")
    plan = job.load_plan(storage(), job_id)
    started = time.monotonic()
    job.summarize(plan, engine(), storage(), job.settings_for(plan.spec, settings(), runs_model=True))
    # again: Redis may have lost the first advance meanwhile (and been rebuilt from the store as "running"),
    # and a finalize sent to a job that is not "summarizing" would be dropped
    if not state().advance(job_id, "summarizing", from_=RUNS_IN["omniq.summarize"]):
        return
    state().add_timings(job_id, {"summarize_s": round(time.monotonic() - started, 3)})
    finalize.publish(plan.spec.priority, f"{job_id}-finalize", job_id=job_id, source=source)
    state().mark_sent([(job_id, FINALIZE, None)])


@app.task(name="omniq.finalize", base=OmniqTask, bind=True)
def finalize(self: Task, job_id: str, source: str) -> None:
    """Write the result files and the manifest; the unit's lease makes it run alone."""
    if not state().advance(job_id, "finalizing", from_=RUNS_IN["omniq.finalize"]):
        return
    state().incr(job_id, "finalize_runs")
    try:
        plan = job.load_plan(storage(), job_id)
    except SourceNotFound:
        # an earlier run wrote the manifest and removed the work files, then died before saying so
        media_id = state().redis.hget(JobState.key(job_id), "media_id") or ""
        manifest = job_manifest(storage(), media_id, job_id)
        if manifest is None or manifest.get("status") not in ("done", "failed"):
            raise
        _finish(job_id, manifest)
        return
    created = float((state().redis.hget(JobState.key(job_id), "created_at")) or time.time())
    timings = state().timings(job_id) | {"total_s": round(time.time() - created, 3)}
    # reads every chunk's result and writes the result files: the floor plus the media's duration
    seconds = settings().deadline_min_seconds + deadlines.ingest_seconds(settings(), plan.info.duration_s)
    with deadlines.watch(f"finalize of job {job_id}", seconds):
        manifest = job.finalize(plan, storage(), job.settings_for(plan.spec, settings()), timings)
    _finish(job_id, manifest)
    job.update_index(_index_or_none(), storage(), plan.spec.media_id)


def _finish(job_id: str, manifest: dict[str, Any]) -> None:
    """End the job as its manifest says: done, partial (with its count of failed rows), or failed (every row)."""
    status = manifest["status"]
    fields: dict[str, Any] = {}
    if status != "done":
        fields = {"error": manifest.get("error") or "", "failed_rows": (manifest.get("rows") or {}).get("failed", 0)}
    if state().finish(job_id, status, **fields):
        state().incr(job_id, "finalized")
        metrics.JOBS.labels(queue=MEDIA_QUEUE, model=settings().model, status=status).inc()
        if status == "partial":
            log.warning("job %s ended partial: %s", job_id, manifest.get("error"))
