"""The GPU worker's pool: Celery's thread pool, made to hand work back at shutdown instead of waiting; and the
gate that lets a unit suspected of killing its worker run alone.

Each message runs in a pool thread (several at once, their rows batched together by the pipelined engine), so
the worker's main thread keeps sending heartbeats and answering ``celery inspect`` during a long batch (Flower
shows the worker online). A running ``generate`` cannot be
interrupted from another thread: on a cold shutdown (SIGTERM after ``OMNIQ_SOFT_SHUTDOWN_SECONDS``) the task
is only marked cancelled, Redis gets its message back (kombu restores unacknowledged messages when the
consumer closes), the leases are released, and ``omniq worker`` exits without waiting for the call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.concurrency.thread import TaskPool

log = logging.getLogger(__name__)


class HandBackThreadPool(TaskPool):
    """Thread pool whose running jobs are handed back, not waited for, when the worker stops."""

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        log.warning("a running model call cannot be stopped; its message goes back to the queue")

    def on_stop(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def on_terminate(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class SoloGate:
    """Units run side by side (``shared``) unless one was in a worker that died: that one runs ``solo``, after
    the running units finish and before new ones start, so if it kills the worker again the death is its own.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._solo = False
        self._waiting_solo = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._solo and not self._waiting_solo)
            self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextmanager
    def solo(self) -> Iterator[None]:
        with self._condition:
            self._waiting_solo += 1
            self._condition.wait_for(lambda: not self._solo and self._shared == 0)
            self._waiting_solo -= 1
            self._solo = True
        try:
            yield
        finally:
            with self._condition:
                self._solo = False
                self._condition.notify_all()
