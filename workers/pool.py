"""The GPU worker's pool: Celery's thread pool, made to hand work back at shutdown instead of waiting.

The model runs in the pool's one thread, so the worker's main thread keeps sending heartbeats and answering
``celery inspect`` during a long batch (Flower shows the worker online). A running ``generate`` cannot be
interrupted from another thread: on a cold shutdown (SIGTERM after ``OMNIQ_SOFT_SHUTDOWN_SECONDS``) the task
is only marked cancelled, Redis gets its message back (kombu restores unacknowledged messages when the
consumer closes), the leases are released, and ``omniq worker`` exits without waiting for the call.
"""

from __future__ import annotations

import logging
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
