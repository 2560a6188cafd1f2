"""This worker process's shared objects (settings, store, job state, leases, the search index, the model), each
made once, on first use, in the process that uses it (after Celery's fork)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import cache, wraps
from typing import TypeVar

from pipeline import job
from pipeline.config import Settings
from pipeline.engines.base import Engine
from pipeline.errors import OmniqError
from pipeline.storage import Storage, open_storage
from workers import metrics
from workers.app import GPU_QUEUE
from workers.reliability.leases import Leases
from workers.state import JobState
from workers.threads import SoloGate

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

    Concurrent: the GPU worker runs several messages at once (``gpu_slots``) and their rows share batches: with
    transformers the next batch is prepared beside the running one (``pipeline.engines.pipelined``); vLLM takes
    every row as it comes and batches continuously (``pipeline.engines.vllm_engine``).
    """
    from pipeline.engines import concurrent_engine, whisper

    model = concurrent_engine(settings())
    model.batch_observers.append(_observe_batch)
    whisper.OBSERVERS.append(_observe_asr)
    return model


@once
def chunk_budget() -> job.ChunkBudget:
    """How many chunks this worker holds decoded at once, across the messages it works on."""
    return job.ChunkBudget(2 * settings().batch_size)


def gpu_slots(config: Settings) -> int:
    """How many messages a GPU worker works on at once: twice the chunk budget of one-chunk messages, so that
    the next ones are fetched and prepared while the model runs the last ones' rows (``bench_gpu_worker``:
    with 2 x batch the model waited at each turn of the messages). vLLM batches whatever it is handed, and gains
    from more rows at once: twice that (``bench_engines``: 32 callers 61 rows/s, 16 callers 52, 8 callers 42)."""
    if config.gpu_slots:
        return config.gpu_slots
    return (8 if config.engine == "vllm" else 4) * config.batch_size


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


@once
def solo_gate() -> SoloGate:
    return SoloGate()


def index_or_none():  # type: ignore[no-untyped-def]
    try:
        return search_index()
    except OmniqError as error:  # a broken index must not fail jobs; 'omniq index rebuild' repairs it
        log.warning("search index unavailable: %s", error)
        return None
