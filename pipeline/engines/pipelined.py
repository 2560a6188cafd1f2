"""A pipelined engine that batches across callers: the GPU is fed while the CPU prepares the next batch.

Any number of threads call :meth:`PipelinedEngine.generate` (one per message or file being worked on). Their
requests wait in one pool; a *preparing* thread gathers them for a short window into batches of compatible
requests (same video fps and soundtrack use, same kind of output, similar lengths; capped by rows and by media
tokens), runs the processor on each, and puts it into a queue; the *model* thread takes batches from that
queue and runs ``generate``. So the processor work for batch k+1 runs while batch k generates, and rows from
different jobs share one ``generate`` call. A batch is formed only when there is room for it in the queue
(at most ``ahead`` prepared batches wait, which keeps memory flat), so the rows that arrive while the model is
busy fill the next batch instead of waiting behind a half-full one. An exception reaches the callers whose
rows it concerns.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Settings
from pipeline.engines.base import SAMPLE_RATE, GenerationRequest, GenerationResult
from pipeline.engines.omni import OmniEngine, batch_key

log = logging.getLogger(__name__)

AUDIO_TOKENS_PER_SECOND = 12.5  # Qwen3-Omni's audio encoder: 100 mel frames/s, downsampled 8x
PATCH_PIXELS = 32 * 32  # a merged 2x2 group of 16-pixel patches is one token, per pair of frames
_STOP = object()


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
    arrived: float = field(default_factory=time.monotonic)


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

    ``batch_rows`` and ``max_media_tokens`` cap a batch; a batch is started once it is full or its oldest row
    has waited ``gather_seconds``; at most ``ahead`` prepared batches wait for the model.
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
        self.stats = PipelineStats()
        self._pending: list[_Row] = []
        self._condition = threading.Condition()
        self._ready: queue.Queue[Any] = queue.Queue()
        # places for prepared batches: a batch is formed only once there is room for it, so rows that arrive
        # while the model is busy join the next batch instead of waiting in a half-full one
        self._room = threading.Semaphore(max(1, ahead))
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()

    @property
    def batch_observers(self) -> list[Any]:
        return self.engine.batch_observers

    def load(self) -> None:
        self.engine.load()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer ``requests`` in order; they are batched with whatever other callers submit meanwhile."""
        futures = [self.submit(request) for request in requests]
        return [future.result() for future in futures]

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue one request; its future gets the result (or the exception that stopped its batch)."""
        self._start()
        row = _Row(request, Future(), group_of(request, self.default_fps), media_tokens(request, self.max_pixels))
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
            self._room.acquire()
            rows = self._next_batch()
            if rows is None:
                self._ready.put(_STOP)
                return
            requests = [row.request for row in rows]
            started = time.perf_counter()
            try:
                encoded = self.engine.encode(requests)
            except BaseException as error:  # handed to the callers, who raise it
                _fail(rows, error)
                self._room.release()
                continue
            self.stats.prepare_s += time.perf_counter() - started
            self._ready.put((rows, encoded))  # at most ``ahead`` wait: memory stays flat

    def _model_loop(self) -> None:
        import torch

        while True:
            item = self._ready.get()
            if item is _STOP:
                return
            self._room.release()
            rows, encoded = item
            requests = [row.request for row in rows]
            started = time.perf_counter()
            try:
                try:
                    results = self.engine.run_encoded(requests, encoded)
                except torch.cuda.OutOfMemoryError:
                    del encoded
                    log.warning("CUDA out of memory for a batch of %d; retrying in halves", len(rows))
                    torch.cuda.empty_cache()
                    results = self.engine.generate_shrinking(requests)
            except BaseException as error:  # handed to the callers, who raise it
                _fail(rows, error)
                continue
            self.stats.model_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.rows += len(rows)
            for row, result in zip(rows, results, strict=True):
                row.future.set_result(result)

    # -- gathering ----------------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Row] | None:
        """Wait for a full batch or for the oldest row's gather window to end; take one batch out of the pool."""
        with self._condition:
            while True:
                if not self._pending:
                    if self._closed:
                        return None
                    self._condition.wait()
                    continue
                oldest = self._pending[0]
                batch = self._full_batch() or self._fill(oldest)
                waited = time.monotonic() - oldest.arrived
                if self._is_full(batch) or waited >= self.gather_seconds or self._closed:
                    taken = {id(row) for row in batch}
                    self._pending = [row for row in self._pending if id(row) not in taken]
                    return batch
                self._condition.wait(timeout=self.gather_seconds - waited)

    def _is_full(self, batch: list[_Row]) -> bool:
        return len(batch) >= self.batch_rows or sum(r.tokens for r in batch) >= self.max_media_tokens

    def _full_batch(self) -> list[_Row] | None:
        """A full batch of any group (oldest group first), so one slow-to-fill group never holds up the rest."""
        seen: set[tuple[Any, ...]] = set()
        for row in self._pending:
            if row.group not in seen:
                seen.add(row.group)
                batch = self._fill(row)
                if self._is_full(batch):
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


def _fail(rows: Sequence[_Row], error: BaseException) -> None:
    for row in rows:
        if not row.future.done():
            row.future.set_exception(error)
