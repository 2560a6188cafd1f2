"""What a worker does when work passes its deadline (``pipeline.deadlines`` measures it; this stops it for real).

- **A step** (ingest, finalize: media workers, prefork) is stopped by killing its ffmpeg: the step's thread then
  raises ``DeadlineExceeded``, and the task counts it like a death of the unit and sends it again (``OmniqTask``),
  so a unit that is stopped every time ends as failed rows or a failed job at ``OMNIQ_MAX_WORKER_DEATHS``. A
  step still running ``GRACE_SECONDS`` later (stuck outside ffmpeg) takes its process down: Celery gives the
  message back at once and the pool starts a new process.
- **A model call** (``generate``, Whisper: the GPU worker, threads) cannot be interrupted from Python. The units
  whose rows it runs are counted a death now and their leases let go; then the worker hands the other slots' work
  back (Celery's cold shutdown: their messages return to the queue, their leases are handed back) and starts
  again in place (``lifecycle.start_again``). Their messages come back and run again, alone, since a death is on
  them. If the shutdown itself hangs, the process restarts after ``RESTART_BACKSTOP_SECONDS`` regardless.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import ModuleType

from pipeline import deadlines
from pipeline.media import extract

log = logging.getLogger(__name__)

GRACE_SECONDS = 10.0  # a step whose ffmpeg was killed has this long to stop before its process exits
RESTART_BACKSTOP_SECONDS = 60.0  # a GPU worker whose cold shutdown hangs restarts after this long anyway
EXIT_DEADLINE = 75  # a media worker process that a step held past its deadline exits with this status
RESTART = threading.Event()  # set when this worker stops in order to start again


def deadline_passed(deadline: deadlines.Deadline) -> None:
    """The monitor's callback in workers (installed by ``workers.reliability.lifecycle``)."""
    from workers import metrics, runtime

    queue = "gpu" if deadline.kind == deadlines.MODEL else "media"
    metrics.DEADLINES.labels(queue=queue, kind=deadline.kind).inc()
    if deadline.kind == deadlines.MODEL:
        _model_hung(deadline, runtime)
    else:
        _step_overdue(deadline, runtime)


def _step_overdue(deadline: deadlines.Deadline, runtime: ModuleType) -> None:
    killed = extract.kill_children()
    log.error("%s passed its deadline of %.0f s: %d ffmpeg stopped", deadline.what, deadline.seconds, killed)
    timer = threading.Timer(GRACE_SECONDS, _exit_if_still_running, args=(deadline, runtime))
    timer.daemon = True
    timer.start()


def _exit_if_still_running(deadline: deadlines.Deadline, runtime: ModuleType) -> None:
    if not deadlines.MONITOR.watching(deadline):
        return  # it stopped (and was counted by its task)
    for job_id, unit in deadline.owners:
        runtime.leases().time_out_held(job_id, unit)
    log.error("%s is still running %.0f s after its deadline: this process exits", deadline.what, GRACE_SECONDS)
    extract.kill_children()
    logging.shutdown()
    os._exit(EXIT_DEADLINE)


_restarting = threading.Lock()


def _model_hung(deadline: deadlines.Deadline, runtime: ModuleType) -> None:
    for job_id, unit in deadline.owners:
        runtime.leases().time_out_held(job_id, unit)
    units = ", ".join(f"{unit} of job {job_id}" for job_id, unit in deadline.owners) or "no unit"
    log.error(
        "%s passed its deadline of %.0f s (for %s); a model call cannot be interrupted: this worker hands its "
        "other work back and starts again",
        deadline.what,
        deadline.seconds,
        units,
    )
    if not _restarting.acquire(blocking=False):
        return  # already on its way
    RESTART.set()
    timer = threading.Timer(RESTART_BACKSTOP_SECONDS, _restart_now)
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGQUIT)  # Celery's cold shutdown: messages and leases handed back


def _restart_now() -> None:
    from workers.reliability.lifecycle import start_again

    start_again(0, "the worker did not stop after a model call passed its deadline")
