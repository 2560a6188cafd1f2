"""The GPU worker's loop with the tiny model: serial (one message at a time, fetch + decode + processor, then
generate) against pipelined (several messages at once through one PipelinedEngine: rows of different files share
batches, the next batch is prepared while one generates), on the same ingested files in this one process.

Every chunk load (fetch + decode) and every processor call is timed as a span, and so is every ``generate``.
Prints wall time; model time (the union of the generate spans); preparation time (the union of the load and
processor spans: loads that run at once count once); the overlap ``|prepare ∩ model| / min(prepare, model)``
(1 = the shorter stage is hidden entirely under the longer one, so wall = max(model, prepare); 0 = they add up),
for the whole run and in steady state (from the first ``generate`` on: before it the model has nothing to run,
the pipeline's fill); the share of wall time the model was busy; the mean batch size; storage requests per chunk.
On a CPU-only machine the model is given ``--model-threads`` cores (default 1) so that the other core plays the
host CPU that prepares batches beside a GPU.

Usage: python bench/bench_gpu_worker.py [--files 16] [--seconds 20] [--batch 4] [--slots N] [--s3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipeline import infer
from pipeline.config import Settings
from pipeline.engines.omni import OmniEngine
from pipeline.engines.pipelined import PipelinedEngine
from pipeline.infer import ChunkBudget, infer_chunks
from pipeline.job import ingest, make_spec
from pipeline.media.sample import make_sample
from pipeline.spec import JobPlan
from pipeline.storage import LocalStorage, Storage, open_storage


class CountingStorage:
    """Counts the requests a store gets (each method call is one request on S3), passing everything through."""

    COUNTED = ("get_bytes", "get_range", "put_bytes", "exists")

    def __init__(self, inner: Storage) -> None:
        self.inner, self.url, self.counts = inner, inner.url, {name: 0 for name in self.COUNTED}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in self.COUNTED:
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.counts[name] += 1
            return attribute(*args, **kwargs)

        return counted

    def total(self) -> int:
        return sum(self.counts.values())


Work = list[tuple[JobPlan, list[int]]]  # (job, chunk indices) per omniq.infer message


def messages(plans: list[JobPlan], batch: int) -> Work:
    """The ``omniq.infer`` messages ingest would send: each job's chunks in groups of ``batch``."""
    out = []
    for plan in plans:
        indices = [c.index for c in plan.chunks]
        out += [(plan, indices[first : first + batch]) for first in range(0, len(indices), batch)]
    return out


def clear_results(storage: Storage, plans: list[JobPlan]) -> None:
    for plan in plans:
        for chunk in plan.chunks:
            storage.delete(f"work/{plan.spec.job_id}/chunks/{chunk.index:05d}/result.json")


class Timeline:
    """Spans of work by stage ("prepare", "model") from every thread, and how they overlap."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {"prepare": [], "model": []}
        self._lock = threading.Lock()

    def timed(self, stage: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.spans[stage].append((started, time.perf_counter()))

        return wrapper

    def figures(self, wall: float) -> dict:
        prepare, model = _union(self.spans["prepare"]), _union(self.spans["model"])
        first_model = model[0][0] if model else 0.0
        steady = _union([(max(a, first_model), b) for a, b in prepare if b > first_model])  # after the fill
        return {
            "wall": wall,
            "model": _length(model),
            "prepare": _length(prepare),
            "overlap": _overlap(prepare, model),
            "steady": _overlap(steady, model),
            "busy": _length(model) / wall,
        }


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)


def _overlap(one: list[tuple[float, float]], other: list[tuple[float, float]]) -> float:
    """``|one ∩ other| / min(|one|, |other|)`` for two unions of spans."""
    both = sum(max(0.0, min(b, d) - max(a, c)) for a, b in one for c, d in other)
    shorter = min(_length(one), _length(other))
    return both / shorter if shorter else 0.0


class TimedEngine(OmniEngine):
    """The real engine; its processor calls and generate calls are recorded on a :class:`Timeline`."""

    timeline: Timeline

    def encode(self, requests: Any) -> Any:
        return self.timeline.timed("prepare", super().encode)(requests)

    def run_encoded(self, requests: Any, encoded: Any) -> Any:
        return self.timeline.timed("model", super().run_encoded)(requests, encoded)


def timed_run(engine: TimedEngine, run: Any) -> tuple[Timeline, float]:
    """Run ``run()`` with a fresh timeline on ``engine`` and on every chunk load (fetch + decode)."""
    timeline = engine.timeline = Timeline()
    loading = infer.load_chunk_media
    infer.load_chunk_media = timeline.timed("prepare", loading)
    started = time.perf_counter()
    try:
        run()
    finally:
        infer.load_chunk_media = loading
    return timeline, time.perf_counter() - started


def run_serial(
    work: list[tuple[JobPlan, list[int]]], engine: TimedEngine, storage: Storage, settings: Settings
) -> dict:
    batches: list[int] = []
    engine.batch_observers.append(lambda rows, tokens, seconds: batches.append(rows))
    timeline, wall = timed_run(engine, lambda: [infer_chunks(p, c, engine, storage, settings) for p, c in work])
    engine.batch_observers.clear()
    return timeline.figures(wall) | {"mean_batch": sum(batches) / len(batches)}


def run_pipelined(work: Work, engine: TimedEngine, storage: Storage, settings: Settings, slots: int) -> dict:
    fed = PipelinedEngine(engine, settings)
    budget = ChunkBudget(2 * settings.batch_size)

    def run() -> None:
        with ThreadPoolExecutor(slots) as workers:  # the GPU worker's message slots
            list(workers.map(lambda m: infer_chunks(m[0], m[1], fed, storage, settings, budget), work))

    timeline, wall = timed_run(engine, run)
    fed.close()
    return timeline.figures(wall) | {"mean_batch": fed.stats.mean_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each file (one chunk at 30 s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model-threads", type=int, default=1)
    parser.add_argument("--slots", type=int, help="messages worked on at once (default: the GPU worker's)")
    parser.add_argument("--s3", action="store_true", help="store on a SeaweedFS started here instead of a directory")
    args = parser.parse_args()
    from workers.tasks import gpu_slots

    torch.set_num_threads(args.model_threads)
    settings = Settings(
        model="tiny", device="cpu", batch_size=args.batch, transcript_max_new_tokens=64, caption_max_new_tokens=64,
        summary_max_new_tokens=48,
    )  # fmt: skip
    slots = args.slots or gpu_slots(settings)
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        server = None
        if args.s3:
            from tests.servers import S3Server

            server = S3Server().start()
            os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
            settings = settings.model_copy(update={"s3_endpoint_url": server.endpoint_url, "s3_region": server.region})
            store: Storage = open_storage(f"s3://{server.create_bucket('bench')}/omniq", settings)
        else:
            store = LocalStorage(directory / "store")
        try:
            files = [
                make_sample(directory / f"clip{i:02d}.mp4", args.seconds + 0.1 * i, size="640x360")
                for i in range(args.files)
            ]
            plans = [ingest(make_spec(str(f), settings), settings, store) for f in files]
            chunks = sum(len(p.chunks) for p in plans)
            work = messages(plans, args.batch)
            engine = TimedEngine(settings)
            engine.timeline = Timeline()
            engine.load()
            infer_chunks(plans[0], [0], engine, store, settings)  # warm-up
            clear_results(store, plans)
            counting = CountingStorage(store)
            serial = run_serial(work, engine, counting, settings)
            serial_requests = counting.total() / chunks
            clear_results(store, plans)
            counting = CountingStorage(store)
            piped = run_pipelined(work, engine, counting, settings, slots)
            piped_requests = counting.total() / chunks
        finally:
            if server is not None:
                server.stop()
    where = "S3 (SeaweedFS)" if args.s3 else "a file store"
    print(
        f"{args.files} files of ~{args.seconds:.0f} s (640x360, {chunks} chunks), tiny model on {args.model_threads} "
        f"CPU thread(s), batch {args.batch}, {slots} slots, {where}; torch {torch.__version__}"
    )
    print(
        f"{'':22}{'wall':>8}{'model':>8}{'prepare':>9}{'overlap':>9}{'steady':>8}{'busy':>6}"
        f"{'mean batch':>12}{'req/chunk':>11}"
    )
    rows = (("serial (one message)", serial, serial_requests), ("pipelined", piped, piped_requests))
    for name, run, requests in rows:
        print(
            f"{name:22}{run['wall']:7.2f}s{run['model']:7.2f}s{run['prepare']:8.2f}s{run['overlap']:9.2f}"
            f"{run['steady']:8.2f}{run['busy']:6.2f}{run['mean_batch']:12.2f}{requests:11.1f}"
        )
    print(f"pipelined vs serial: {serial['wall'] / piped['wall']:.2f}x faster; "
          f"wall / max(model, prepare) = {piped['wall'] / max(piped['model'], piped['prepare']):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
