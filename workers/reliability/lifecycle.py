"""Worker lifecycle hooks: start the watchdog (and the notifier) when a worker is ready, hand work back when it
stops."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from celery import signals

from pipeline import deadlines as step_deadlines
from pipeline import failpoints
from workers import notify, runtime, tasks
from workers.app import GPU_TASKS
from workers.reliability import deadlines, watchdog


@signals.worker_init.connect
def _enforce_deadlines(**_: Any) -> None:
    """A step past its deadline is stopped for real in workers (``workers.reliability.deadlines``); the pool's processes
    inherit this."""
    step_deadlines.install(deadlines.deadline_passed)


@signals.worker_ready.connect
def _start_watchdog(sender: Any = None, **_: Any) -> None:
    """Every worker runs the watchdog thread (one sweeps at a time) and registers the queues it serves."""
    queues = sorted(sender.app.amqp.queues.consume_from) if sender is not None else []
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    watchdog.start(name, queues, runtime.settings())
    notify.start(name, runtime.settings())  # when OMNIQ_NOTIFY_URL is set (checked when the worker started)


@signals.task_received.connect
def _lease_on_receipt(request: Any = None, **_: Any) -> None:
    """A GPU worker's messages take their units' leases on arrival (see ``tasks.lease_on_receipt``); a
    delayed retry (an ETA) is not started yet and takes its lease when it runs."""
    if request is None or request.name not in GPU_TASKS or getattr(request, "eta", None):
        return
    tasks.lease_on_receipt(request.id, request.name, request.kwargs or {})


_shutdown_requested = threading.Event()


def shutdown_requested() -> bool:
    """Whether this worker was asked to stop (a signal); any other exit of the worker is unexpected."""
    return _shutdown_requested.is_set()


def restart_requested() -> bool:
    """Whether this worker stops in order to start again (a model call passed its deadline)."""
    return deadlines.RESTART.is_set()


def start_again(code: int, why: str) -> None:
    """Replace this process with a fresh ``omniq worker`` (same arguments), after a pause that grows with each
    restart: what supervises a worker whose Celery gave up (e.g. kombu failing to requeue while Redis restarts)
    or whose model hung. Its leases expire or were let go, and the watchdog sends their units again, as for any
    dead worker. A failpoint hang that fired is not armed again (``pipeline.failpoints``)."""
    restarts = int(os.environ.get("OMNIQ_WORKER_RESTARTS", "0")) + 1
    delay = min(30.0, 2.0**restarts)
    print(f"omniq worker: {why}; starting it again in {delay:.0f} s", file=sys.stderr, flush=True)
    logging.shutdown()
    time.sleep(delay)
    os.environ["OMNIQ_WORKER_RESTARTS"] = str(restarts)
    if os.environ.get("OMNIQ_FAILPOINTS"):
        os.environ["OMNIQ_FAILPOINTS"] = failpoints.unfired()
    os.execv(sys.executable, [sys.executable, "-m", "workers.cli", *sys.argv[1:]])  # noqa: S606 - no shell


@signals.worker_shutting_down.connect
def _hand_back_leases(how: str = "", **_: Any) -> None:
    """Cold shutdown (SIGTERM via ``omniq worker``): the running tasks were cancelled after the soft-shutdown
    wait and their messages go back to the queue as the connection closes; give their units back too, so
    another worker starts them at once instead of waiting for the leases to expire. (A warm shutdown lets
    the tasks finish, so it keeps the leases.)"""
    _shutdown_requested.set()
    if how == "Cold":
        runtime.leases().release_all()


@signals.worker_process_shutdown.connect
def _release_child_leases(**_: Any) -> None:
    runtime.leases().release_all()
