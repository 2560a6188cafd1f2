"""Worker lifecycle hooks: start the watchdog (and the notifier) when a worker is ready, hand work back when it
stops."""

from __future__ import annotations

import os
import threading
from typing import Any

from celery import signals

from workers import notify, tasks, watchdog
from workers.app import GPU_TASKS


@signals.worker_ready.connect
def _start_watchdog(sender: Any = None, **_: Any) -> None:
    """Every worker runs the watchdog thread (one sweeps at a time) and registers the queues it serves."""
    queues = sorted(sender.app.amqp.queues.consume_from) if sender is not None else []
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    watchdog.start(name, queues, tasks.settings())
    notify.start(name, tasks.settings())  # when OMNIQ_NOTIFY_URL is set (checked when the worker started)


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


@signals.worker_shutting_down.connect
def _hand_back_leases(how: str = "", **_: Any) -> None:
    """Cold shutdown (SIGTERM via ``omniq worker``): the running tasks were cancelled after the soft-shutdown
    wait and their messages go back to the queue as the connection closes; give their units back too, so
    another worker starts them at once instead of waiting for the leases to expire. (A warm shutdown lets
    the tasks finish, so it keeps the leases.)"""
    _shutdown_requested.set()
    if how == "Cold":
        tasks.leases().release_all()


@signals.worker_process_shutdown.connect
def _release_child_leases(**_: Any) -> None:
    tasks.leases().release_all()
