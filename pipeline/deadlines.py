"""Step deadlines: how long a piece of work may take, derived from the work, and a monitor that acts on the ones
that pass (README "Deadlines").

A deadline is ``OMNIQ_DEADLINE_MIN_SECONDS`` (the floor of every deadline) plus ``OMNIQ_DEADLINE_FACTOR``
seconds per second of the work's media (a file's duration at ingest, the audio and video of a batch's rows)
plus, for a model call, ``OMNIQ_DEADLINE_TOKEN_SECONDS`` per token it may write, and for a download
``1 / OMNIQ_DEADLINE_BYTES_PER_SECOND`` per byte. Work runs inside :func:`watch`; code that learns how big
the work is (the probe, a HEAD) calls :func:`allow`, and a subprocess takes :func:`timeout_for` as its timeout,
so an ffmpeg past the deadline is killed. A deadline that passes is handed to the callback the process
installed (:func:`install`; the workers stop the step for real, see ``workers.reliability.deadlines``); without
one it is only logged, since a call that hangs inside the model cannot be interrupted from Python.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.errors import OmniqError

if TYPE_CHECKING:
    from pipeline.config import Settings

log = logging.getLogger(__name__)

STEP, MODEL = "step", "model"  # interruptible work (its subprocesses can be killed), or a call into a model
Owner = tuple[str, str]  # (job id, unit) the work is done for


class DeadlineExceeded(OmniqError):
    """A step was stopped at its deadline (e.g. its ffmpeg killed). A worker counts it like a death of the unit."""


def ingest_seconds(settings: Settings, duration_s: float) -> float:
    """What the decode of ``duration_s`` of media may take beyond the floor."""
    return settings.deadline_factor * max(0.0, duration_s)


def download_seconds(settings: Settings, size_bytes: int) -> float:
    """What a download of ``size_bytes`` may take beyond the floor (a trickle slower than this is hung work)."""
    return max(0, size_bytes) / settings.deadline_bytes_per_second


def model_seconds(settings: Settings, media_seconds: float, new_tokens: int) -> float:
    """A model call's whole deadline: the floor, its rows' media and the tokens it may write."""
    return (
        settings.deadline_min_seconds
        + settings.deadline_factor * max(0.0, media_seconds)
        + settings.deadline_token_seconds * max(0, new_tokens)
    )


@dataclass
class Deadline:
    """One piece of work being watched: what it is, for whom, and when it must be done (monotonic clock)."""

    what: str
    kind: str
    owners: tuple[Owner, ...]
    seconds: float
    ends: float = 0.0
    expired: bool = False
    id: int = field(default_factory=itertools.count().__next__)

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def extend(self, seconds: float) -> None:
        self.seconds += seconds
        self.ends += seconds


Callback = Callable[[Deadline], None]


def _log_only(deadline: Deadline) -> None:
    log.error(
        "%s has run past its deadline of %.0f s; it cannot be interrupted from here", deadline.what, deadline.seconds
    )


class Monitor:
    """A thread (started lazily, one per process: a forked child starts its own) that checks the watched work
    every ``interval`` seconds and calls the callback once for each deadline that passes."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.callback: Callback = _log_only
        self._watched: dict[int, Deadline] = {}
        self._lock = threading.Lock()
        self._pid = 0

    def add(self, deadline: Deadline) -> None:
        with self._lock:
            self._watched[deadline.id] = deadline
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._loop, name="omniq-deadlines", daemon=True).start()

    def remove(self, deadline: Deadline) -> None:
        with self._lock:
            self._watched.pop(deadline.id, None)

    def watching(self, deadline: Deadline) -> bool:
        """Whether the work of ``deadline`` is still running."""
        with self._lock:
            return deadline.id in self._watched

    def check(self, now: float | None = None) -> list[Deadline]:
        """Mark and hand over the deadlines passed by ``now``; returns them (the thread calls this)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            passed = [d for d in self._watched.values() if not d.expired and now >= d.ends]
            for deadline in passed:
                deadline.expired = True
        for deadline in passed:
            try:
                self.callback(deadline)
            except Exception:  # the monitor must keep watching the rest
                log.exception("acting on the passed deadline of %s failed", deadline.what)
        return passed

    def _loop(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            self.check()


MONITOR = Monitor()
_local = threading.local()


def install(callback: Callback) -> None:
    """What this process does with a deadline that passes (a worker stops the step; default: log it)."""
    MONITOR.callback = callback


def set_owner(owner: Owner | None) -> None:
    """The (job, unit) this thread works for, so that work it hands to other threads is watched for it."""
    _local.owner = owner


def current_owner() -> Owner | None:
    return getattr(_local, "owner", None)


def current() -> Deadline | None:
    """The innermost deadline this thread works under."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextmanager
def watch(what: str, seconds: float, kind: str = STEP, owners: tuple[Owner, ...] | None = None) -> Iterator[Deadline]:
    """Run the block under a deadline of ``seconds`` (for ``owners``, default this thread's owner)."""
    if owners is None:
        owner = current_owner()
        owners = (owner,) if owner else ()
    deadline = Deadline(what, kind, owners, seconds, time.monotonic() + seconds)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(deadline)
    MONITOR.add(deadline)
    try:
        yield deadline
    finally:
        MONITOR.remove(deadline)
        stack.remove(deadline)


def allow(seconds: float) -> None:
    """Extend the current deadline by ``seconds`` (the work turned out bigger: a long file, a large download)."""
    deadline = current()
    if deadline is not None and seconds > 0:
        deadline.extend(seconds)


def timeout_for(limit: float) -> float:
    """A subprocess's timeout: ``limit``, or less when the current deadline comes sooner."""
    deadline = current()
    return limit if deadline is None else max(0.0, min(limit, deadline.remaining()))


def passed() -> bool:
    """Whether the current deadline has passed (a subprocess that timed out was stopped by it)."""
    deadline = current()
    return deadline is not None and (deadline.expired or deadline.remaining() <= 0)
