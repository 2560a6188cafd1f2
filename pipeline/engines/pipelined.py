"""A pipelined engine that batches across callers: the GPU is fed while the CPU prepares the next batch.

Any number of threads call :meth:`PipelinedEngine.generate` (one per message or file being worked on). Their
requests wait in one pool; a *preparing* thread gathers them for a short window into batches of compatible
requests (same video fps and soundtrack use, same kind of output, similar lengths; capped by rows and by media
tokens), runs the processor on each, and puts it into a queue; the *model* thread takes batches from that
queue and runs ``generate``. So the processor work for batch k+1 runs while batch k generates, and rows from
different jobs share one ``generate`` call. A batch is formed only when there is room for it in the queue
(at most ``ahead`` prepared batches wait, which keeps memory flat), and one that is not full only when no
prepared batch waits: the rows that arrive while the model is busy fill it instead of waiting behind a
half-full one, and a cheap batch waiting never keeps the next expensive one from being prepared. An exception
reaches the callers whose rows it concerns: a batch that raises (not a transient error) is run again in halves,
down to the row that raises alone, so one bad row does not fail the rows batched with it (README "Partial
results").
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pipeline import deadlines
from pipeline.config import Settings
from pipeline.engines.base import SAMPLE_RATE, GenerationRequest, GenerationResult
from pipeline.engines.omni import OmniEngine, batch_key
from pipeline.errors import TransientError

log = logging.getLogger(__name__)

AUDIO_TOKENS_PER_SECOND = 12.5  # Qwen3-Omni's audio encoder: 100 mel frames/s, downsampled 8x
PATCH_PIXELS = 32 * 32  # a merged 2x2 group of 16-pixel patches is one token, per pair of frames
_STOP = object()
# formed batches without video (audio features, text: small) that may wait beside the ``ahead`` ones with video,
# so that short cheap batches in the queue never keep the next expensive one from being prepared
_EXTRA_LIGHT_BATCHES = 2


def media_tokens(request: GenerationRequest, max_pixels: int) -> int:
    """About how many audio and video tokens ``request`` puts into the prompt (for batch limits)."""
    tokens = 0.0
    if request.audio is not None:
        tokens += len(request.audio) / SAMPLE_RATE * AUDIO_TOKENS_PER_SECOND
    if request.video is not None:
        frames, height, width = request.video.shape[:3]
        pixels = min(height * width, max_pixels)
        tokens += max(1, frames // 2) * max(1, pixels // PATCH_PIXELS)
    return math.ceil(tokens)


def group_of(request: GenerationRequest, default_fps: float) -> tuple[Any, ...]:
    """Requests that may share a batch: same processor/model flags and same kind of output (similar prompts)."""
    return (batch_key(request, default_fps), request.kind)


@dataclass
class _Row:
    request: GenerationRequest
    future: Future[GenerationResult]
    group: tuple[Any, ...]
    tokens: int
    prepared: _Countdown | None = None
    arrived: float = field(default_factory=time.monotonic)
    owner: deadlines.Owner | None = None  # the (job, unit) of the caller, whose work a hung call holds up


@dataclass
class PipelineStats:
    """What the pipeline did, for benches and logs: compare ``prepare_s`` and ``model_s`` with wall time."""

    batches: int = 0
    rows: int = 0
    prepare_s: float = 0.0  # processor + copy to the device, in the preparing thread
    model_s: float = 0.0  # generate, in the model thread

    @property
    def mean_batch(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class PipelinedEngine:
    """The :class:`~pipeline.engines.base.Engine` protocol over an :class:`OmniEngine`, for many caller threads.

    ``batch_rows`` and ``max_media_tokens`` cap a batch; a batch is started once it is full, or once its oldest
    row has waited ``gather_seconds`` and the model has nothing else waiting; at most ``ahead`` prepared
    batches wait for the model.
    """

    def __init__(
        self,
        engine: OmniEngine,
        settings: Settings | None = None,
        *,
        ahead: int = 1,
    ) -> None:
        settings = settings or engine.settings
        self.engine = engine
        self.model_id = engine.model_id
        self.random_weights = engine.random_weights
        self.batch_rows = settings.batch_size
        self.max_media_tokens = settings.batch_max_media_tokens
        self.gather_seconds = settings.batch_gather_ms / 1000.0
        self.max_pixels = settings.frame_max_pixels
        self.default_fps = settings.fps
        self.settings = settings
        self.stats = PipelineStats()
        self._pending: list[_Row] = []
        self._condition = threading.Condition()
        self._ready: queue.Queue[Any] = queue.Queue()
        self.ahead = max(1, ahead)
        self._waiting = [0, 0]  # batches formed and not yet taken by the model: [all, those with video]
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    @property
    def batch_observers(self) -> list[Any]:
        return self.engine.batch_observers

    def load(self) -> None:
        self.engine.load()

    def generate(
        self, requests: list[GenerationRequest], prepared: Callable[[], None] | None = None
    ) -> list[GenerationResult]:
        """Answer ``requests`` in order; they are batched with whatever other callers submit meanwhile.

        ``prepared`` is called (from the preparing thread) once every one of them has become model inputs or
        failed: the caller may then let go of the media, e.g. fetch the next chunks while these generate.
        """
        return [unwrap(outcome) for outcome in self.generate_each(requests, prepared)]

    def generate_each(
        self, requests: list[GenerationRequest], prepared: Callable[[], None] | None = None
    ) -> list[GenerationResult | BaseException]:
        """:meth:`generate`, with each row's exception in its place instead of raised."""
        countdown = _Countdown(len(requests), prepared) if prepared is not None else None
        futures = [self.submit(request, countdown) for request in requests]
        outcomes: list[GenerationResult | BaseException] = []
        for future in futures:
            error = future.exception()
            outcomes.append(error if error is not None else future.result())
        return outcomes

    def submit(self, request: GenerationRequest, prepared: _Countdown | None = None) -> Future[GenerationResult]:
        """Queue one request; its future gets the result (or the exception that stopped its batch)."""
        self._start()
        row = _Row(request, Future(), group_of(request, self.default_fps), media_tokens(request, self.max_pixels))
        row.prepared, row.owner = prepared, deadlines.current_owner()
        with self._condition:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._pending.append(row)
            self._condition.notify_all()
        return row.future

    def close(self) -> None:
        """Finish what is queued, then stop both threads."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)

    # -- the two loops ------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._threads:
            return
        with self._start_lock:
            if self._threads:
                return
            self.engine.load()
            threads = [
                threading.Thread(target=self._prepare_loop, name="omniq-prepare", daemon=True),
                threading.Thread(target=self._model_loop, name="omniq-model", daemon=True),
            ]
            for thread in threads:
                thread.start()
            self._threads = threads

    def _prepare_loop(self) -> None:
        while True:
            rows = self._next_batch()
            if rows is None:
                self._ready.put(_STOP)
                return
            requests = [row.request for row in rows]
            started = time.perf_counter()
            try:
                encoded = self.engine.encode(requests)
            except Exception as error:
                if len(rows) > 1 and not isinstance(error, TransientError):
                    # one row may be at fault: the model thread runs the batch again in halves
                    self._ready.put((rows, error))
                    _tell_prepared(rows)
                    continue
                _fail(rows, error)  # handed to the callers, who raise it
                _tell_prepared(rows)
                self._taken(rows)
                continue
            self.stats.prepare_s += time.perf_counter() - started
            self._ready.put((rows, encoded))  # at most ``ahead`` wait: memory stays flat
            _tell_prepared(rows)

    def _model_loop(self) -> None:
        import torch

        while True:
            item = self._ready.get()
            if item is _STOP:
                return
            rows, encoded = item
            self._taken(rows)
            requests = [row.request for row in rows]
            started = time.perf_counter()
            if isinstance(encoded, BaseException):  # the batch could not be prepared
                with self._watch(rows):
                    self._run_apart(rows, encoded)
                continue
            try:
                try:
                    with self._watch(rows):
                        results = self.engine.run_encoded(requests, encoded)
                except torch.cuda.OutOfMemoryError:
                    del encoded
                    log.warning("CUDA out of memory for a batch of %d; retrying in halves", len(rows))
                    torch.cuda.empty_cache()
                    with self._watch(rows):
                        results = self.engine.generate_shrinking(requests)
            except Exception as error:
                if len(rows) > 1 and not isinstance(error, TransientError):
                    with self._watch(rows):
                        self._run_apart(rows, error)
                else:
                    _fail(rows, error)  # handed to the callers, who raise it
                continue
            except BaseException as error:
                _fail(rows, error)
                continue
            self.stats.model_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.rows += len(rows)
            for row, result in zip(rows, results, strict=True):
                row.future.set_result(result)

    def _watch(self, rows: list[_Row]) -> AbstractContextManager[deadlines.Deadline]:
        """A model call's deadline; its owners are the units whose rows it runs."""
        owners = tuple(sorted({row.owner for row in rows if row.owner is not None}))
        return watch_model_call(self.settings, [row.request for row in rows], owners)

    def _run_apart(self, rows: list[_Row], error: Exception) -> None:
        """A batch raised ``error``: run it again in halves until the rows at fault raise alone (each gets its own
        exception) and the others get their answers. Costs about two calls per halving, only when a batch fails."""
        if len(rows) == 1:
            _fail(rows, error)
            return
        log.warning("a batch of %d rows raised %s: running it again in halves", len(rows), type(error).__name__)
        half = (len(rows) + 1) // 2
        for part in (rows[:half], rows[half:]):
            try:
                results = self.engine.generate_shrinking([row.request for row in part])
            except TransientError as transient:
                _fail(part, transient)
                continue
            except Exception as again:
                self._run_apart(part, again)
                continue
            self.stats.batches += 1
            self.stats.rows += len(part)
            for row, result in zip(part, results, strict=True):
                row.future.set_result(result)

    # -- gathering ----------------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Row] | None:
        """Wait until a batch may be formed; take it out of the pool and count it as waiting for the model.

        A full batch goes as soon as there is room for it (:meth:`_fits`); one that is not full only once its
        oldest row has waited ``gather_seconds`` and no formed batch waits for the model (until then the model
        has work, and rows that arrive meanwhile fill it).
        """
        with self._condition:
            while True:
                if not self._pending:
                    if self._closed:
                        return None
                    self._condition.wait()
                    continue
                batch = self._full_batch()
                waited = time.monotonic() - self._pending[0].arrived
                if batch is None and self._waiting[0] == 0 and (waited >= self.gather_seconds or self._closed):
                    batch = self._fill(self._pending[0])
                if batch is not None:
                    taken = {id(row) for row in batch}
                    self._pending = [row for row in self._pending if id(row) not in taken]
                    self._waiting[0] += 1
                    self._waiting[1] += _has_video(batch)
                    return batch
                # woken by new rows, by the model taking a batch, or by the end of the window
                self._condition.wait(timeout=self.gather_seconds - waited if waited < self.gather_seconds else None)

    def _fits(self, batch: list[_Row]) -> bool:
        """Room for one more formed batch: ``ahead`` with video (large inputs), a few more without."""
        if self._waiting[0] >= self.ahead + _EXTRA_LIGHT_BATCHES:
            return False
        return not _has_video(batch) or self._waiting[1] < self.ahead

    def _taken(self, rows: list[_Row]) -> None:
        """A formed batch left the queue (the model took it, or it failed to prepare): room for another."""
        with self._condition:
            self._waiting[0] -= 1
            self._waiting[1] -= _has_video(rows)
            self._condition.notify_all()

    def _is_full(self, batch: list[_Row]) -> bool:
        return len(batch) >= self.batch_rows or sum(r.tokens for r in batch) >= self.max_media_tokens

    def _full_batch(self) -> list[_Row] | None:
        """A full batch of any group that has room (oldest group first), so one slow-to-fill group or one
        kind of batch that waits for room never holds up the rest."""
        seen: set[tuple[Any, ...]] = set()
        for row in self._pending:
            if row.group not in seen:
                seen.add(row.group)
                batch = self._fill(row)
                if self._is_full(batch) and self._fits(batch):
                    return batch
        return None

    def _fill(self, oldest: _Row) -> list[_Row]:
        """The oldest row plus the rows of its group closest to it in length, within the row and token caps."""
        candidates = [r for r in self._pending if r.group == oldest.group and r is not oldest]
        candidates.sort(key=lambda r: (abs(r.tokens - oldest.tokens), r.arrived))
        batch, tokens = [oldest], oldest.tokens
        for row in candidates:
            if len(batch) >= self.batch_rows:
                break
            if tokens + row.tokens > self.max_media_tokens:
                continue
            batch.append(row)
            tokens += row.tokens
        batch.sort(key=lambda r: r.arrived)
        return batch


class _Countdown:
    """Calls ``done`` once ``count`` rows have been prepared (or failed)."""

    def __init__(self, count: int, done: Callable[[], None]) -> None:
        self._left, self._done, self._lock = count, done, threading.Lock()
        if count == 0:
            done()

    def tick(self) -> None:
        with self._lock:
            self._left -= 1
            finished = self._left == 0
        if finished:
            self._done()


def watch_model_call(
    settings: Settings,
    requests: Sequence[GenerationRequest],
    owners: tuple[deadlines.Owner, ...] | None = None,
    *,
    label: str = "generate",
) -> AbstractContextManager[deadlines.Deadline]:
    """A model call's deadline (README "Deadlines"): the floor, its rows' media and the tokens it may write, for
    ``owners`` (default: the calling thread's unit); both concurrent engines watch their calls with it."""
    media = sum(media_seconds(request, settings.fps) for request in requests)
    tokens = max((request.max_new_tokens for request in requests), default=0)
    what = f"{label} of {len(requests)} rows ({','.join(sorted({request.kind for request in requests}))})"
    return deadlines.watch(what, deadlines.model_seconds(settings, media, tokens), deadlines.MODEL, owners)


def media_seconds(request: GenerationRequest, default_fps: float) -> float:
    seconds = len(request.audio) / SAMPLE_RATE if request.audio is not None else 0.0
    if request.video is not None:
        seconds = max(seconds, len(request.video) / float(request.fps or default_fps))
    return seconds


def _has_video(rows: Sequence[_Row]) -> bool:
    return any(row.request.video is not None for row in rows)


def _tell_prepared(rows: Sequence[_Row]) -> None:
    for row in rows:
        if row.prepared is not None:
            row.prepared.tick()
            row.prepared = None


def unwrap(outcome: GenerationResult | BaseException) -> GenerationResult:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _fail(rows: Sequence[_Row], error: BaseException) -> None:
    for row in rows:
        if not row.future.done():
            row.future.set_exception(error)
