"""What every step's task shares (:class:`OmniqTask`): the unit's lease, duplicate drops, the deadline's and the
transient errors' retries, and what ends a unit for good (``workers.steps.failures``)."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Retry
from kombu.exceptions import OperationalError

from pipeline import deadlines
from pipeline.errors import MalformedMessage, OmniqError, TransientError, error_text
from workers import metrics, runtime
from workers.app import GPU_QUEUE, GPU_TASKS, MEDIA_QUEUE, gpu_queue_for
from workers.messages import JOB_ID, check_message
from workers.reliability.leases import Acquired, holder_name
from workers.reliability.recovery import describe
from workers.state import JobState
from workers.steps import failures

log = logging.getLogger(__name__)


def task_repr(job_id: str, source: str, **extra: object) -> str:
    """What Flower shows as a task's kwargs: the job, the source and a few numbers, never the whole spec."""
    parts = [f"job_id={job_id!r}", f"source={source!r}", *(f"{k}={v!r}" for k, v in extra.items())]
    return "{" + ", ".join(parts) + "}"


def broker_priority(priority: int) -> int:
    """omniq's priority (9 = most urgent) as the Redis transport's (0 is served first)."""
    return 9 - max(0, min(9, priority))


# The job statuses in which each task may run; a message that finds its job in another is a late duplicate.
RUNS_IN = {
    "omniq.ingest": ("queued", "ingesting", "running"),
    "omniq.infer": ("running",),
    "omniq.summarize": ("running", "summarizing"),
    "omniq.finalize": ("summarizing", "finalizing"),
}

# What a transient failure looks like from inside a task: retried on the time budget, never a job failure.
TRANSIENT = (TransientError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)


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
        labels = {"queue": self.queue_name, "model": runtime.settings().model, "task": self.name}
        sent_at = getattr(self.request, "omniq_sent_at", None) or (self.request.headers or {}).get("omniq_sent_at")
        if sent_at:
            metrics.QUEUE_WAIT.labels(**labels).observe(max(0.0, time.time() - float(sent_at)))
        started = time.monotonic()
        try:
            check_message(self.name, args, kwargs, runtime.settings(), runtime.storage())
            return self._run_unit(args, kwargs)
        except MalformedMessage as error:
            return _refuse_message(self.name, self.request.id, kwargs, error)
        finally:
            metrics.TASK_SECONDS.labels(**labels).observe(time.monotonic() - started)

    def _run_unit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        job_id, unit = kwargs["job_id"], unit_of(self.name, kwargs)
        received = _take_received(self.request.id)  # the lease taken when the message arrived, if any
        status = runtime.state().status(job_id)
        run = runtime.state().run_of(job_id)
        # a late duplicate (the job ended or moved past this step), a unit already done, or a job whose state
        # was lost (``omniq recover`` and the watchdog send its work again): nothing to do
        if status not in RUNS_IN[self.name]:
            log.info("dropping %s of job %s: the job is %s", unit, job_id, status or "unknown to Redis")
            return _hand_back(job_id, unit, received)
        if runtime.state().is_unit_done(job_id, unit):
            log.info("dropping %s of job %s: that unit is done", unit, job_id)
            return _hand_back(job_id, unit, received)
        shared = runs_shared(self.name)
        lease = received or runtime.leases().acquire(job_id, unit, shared=shared)
        if not lease.held:
            holder = holder_name(lease.other)
            log.info("dropping a duplicate %s of job %s: %s is held by %s", self.name, job_id, unit, holder)
            return None
        chunks = kwargs.get("chunks")
        try:
            if lease.died_now:
                metrics.WORKER_DEATHS.labels(queue=self.queue_name, model=runtime.settings().model).inc()
            # (deaths counted when a model call hung are on the unit before it starts again)
            if lease.deaths >= runtime.settings().max_worker_deaths:
                failures.give_up(job_id, unit, chunks, _death_reason(job_id, unit, chunks, lease.deaths))
                return None
            deadlines.set_owner((job_id, unit))  # work it hands to the model is watched for this unit
            with _gate_for(job_id, unit, lease) if shared else nullcontext():
                result = super().__call__(*args, **kwargs)
            runtime.state().unit_done(job_id, unit, run)
            failures.clean_if_ended(job_id, unit)
            return result
        except TRANSIENT as error:
            raise self._retry_later(job_id, unit, error) from error
        except deadlines.DeadlineExceeded as error:  # stopped at its deadline: counted like a death, sent again
            raise self._after_deadline(job_id, unit, chunks, lease, error) from error
        finally:
            deadlines.set_owner(None)
            runtime.leases().release(job_id, unit, lease.holder)

    def _after_deadline(
        self, job_id: str, unit: str, chunks: list[int] | None, lease: Acquired, error: deadlines.DeadlineExceeded
    ) -> BaseException:
        """Count a step stopped at its deadline like a death of its unit; run it again later, or give it up."""
        deaths = runtime.leases().time_out(job_id, unit, lease.holder)
        metrics.WORKER_DEATHS.labels(queue=self.queue_name, model=runtime.settings().model).inc()
        if deaths >= runtime.settings().max_worker_deaths:
            failures.give_up(job_id, unit, chunks, _death_reason(job_id, unit, chunks, deaths))
            return Ignore()
        config = runtime.settings()
        delay = retry_delay(self.request.retries, config.retry_min_seconds, config.retry_max_seconds)
        reason = f"{describe(unit, chunks)} was stopped at its deadline: {error}"
        log.error("%s of job %s: %s; next attempt in %.0f s", unit, job_id, reason, delay)
        try:
            runtime.state().unit_retrying(job_id, unit, reason, time.time() + delay)
            return self.retry(exc=error, countdown=delay)
        except Retry as retry:
            return retry
        except Exception as unsent:  # Redis is down: the watchdog sends the unit again once it is back
            log.warning("%s of job %s: cannot schedule its retry (%s); the watchdog resends it", unit, job_id, unsent)
            return Ignore()

    def _retry_later(self, job_id: str, unit: str, error: BaseException) -> BaseException:
        """Retry with backoff until the budget is spent; then the error becomes the job's failure."""
        config = runtime.settings()
        reason = str(error) or type(error).__name__
        since = runtime.state().retry_since(job_id, unit) or time.time()
        if time.time() - since >= config.retry_budget_seconds:
            minutes = config.retry_budget_seconds / 60
            return _GaveUp(f"{error_text(error)} (still failing after {minutes:g} min of retries)")
        delay = retry_delay(self.request.retries, config.retry_min_seconds, config.retry_max_seconds)
        try:
            runtime.state().unit_retrying(job_id, unit, reason, time.time() + delay)
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
            queue=gpu_queue_for(model or runtime.settings().model) if self.name in GPU_TASKS else MEDIA_QUEUE,
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
            failures.give_up(
                job_id, unit_of(self.name, kwargs), kwargs.get("chunks"), error_text(exc), kwargs.get("spec")
            )
        elif job_id:
            failures.fail_job(job_id, error_text(exc), kwargs.get("spec"))


def _death_reason(job_id: str, unit: str, chunks: list[int] | None, deaths: int) -> str:
    """Why a unit is given up at the death limit: ``worker died 3 times while ingesting (2 of them at the step's
    deadline)``."""
    reason = f"worker died {deaths} times while {describe(unit, chunks)}"
    timeouts = int(runtime.state().units(job_id).get(f"{unit}:timeouts") or 0)
    return reason + (f" ({min(timeouts, deaths)} of them at its deadline)" if timeouts else "")


def _refuse_message(task: str, task_id: str | None, kwargs: dict[str, Any], error: MalformedMessage) -> None:
    """Drop a message omniq did not write; but a job whose own spec (as its record holds it) cannot run fails."""
    metrics.MALFORMED_MESSAGES.labels(queue=MEDIA_QUEUE if task not in GPU_TASKS else GPU_QUEUE, task=task).inc()
    job_id = kwargs.get("job_id")
    if task == "omniq.ingest" and isinstance(job_id, str) and JOB_ID.fullmatch(job_id):
        stored = runtime.state().redis.hget(JobState.key(job_id), "spec")
        if stored and json.loads(stored) == kwargs.get("spec"):
            failures.fail_job(job_id, f"its spec cannot run here: {error}")
            return
    log.error("dropping a malformed %s message (task %s): %s", task, task_id, error)


def runs_shared(task_name: str) -> bool:
    """In a GPU worker with several slots, units share the process: a death there may be another's fault."""
    return task_name in GPU_TASKS and runtime.gpu_slots(runtime.settings()) > 1


_received: dict[str, Acquired] = {}  # task id -> the lease its unit got when the message arrived
_received_lock = threading.Lock()


def lease_on_receipt(task_id: str, task_name: str, kwargs: dict[str, Any]) -> None:
    """Take a unit's lease as soon as a GPU worker receives its message (``workers.reliability.lifecycle``).

    A GPU worker holds several messages at once; one killed before a message's thread started it would
    otherwise leave a message that Redis returns only after its visibility timeout. With the lease taken
    here, the lease expires with the worker and the watchdog sends the unit again. Never raises: the task
    takes its lease when it runs if this could not."""
    try:
        check_message(task_name, (), kwargs, runtime.settings(), runtime.storage())  # a malformed message gets no lease
        job_id, unit = kwargs["job_id"], unit_of(task_name, kwargs)
        if runtime.state().is_unit_done(job_id, unit):
            return
        lease = runtime.leases().acquire(job_id, unit, shared=runs_shared(task_name))
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
        runtime.leases().hand_back(job_id, unit, received.holder)


@contextmanager
def _gate_for(job_id: str, unit: str, lease: Acquired) -> Iterator[None]:
    """Run beside the other slots, or alone when the unit was in a worker that died (then a death is its own)."""
    if not lease.suspect:
        with runtime.solo_gate().shared():
            yield
        return
    log.warning("%s of job %s was in a worker that died: running it alone", unit, job_id)
    with runtime.solo_gate().solo():
        runtime.leases().run_alone(job_id, unit)
        yield


class _GaveUp(TransientError):
    """A transient error that outlived the retry budget: raised so that on_failure gives the unit up."""
