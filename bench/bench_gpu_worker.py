"""The GPU worker's loop with the tiny model: serial (one message at a time, fetch + decode + processor, then
generate) against pipelined (several messages at once through one PipelinedEngine: rows of different files share
batches, the next batch is prepared while one generates), on the same ingested files in this one process.

Prints model time, preparation time (fetch + decode + processor), wall time, the overlap figure
``(prepare + model - wall) / min(prepare, model)`` (1 = one hides the other entirely, 0 = they add up), the mean
batch size and the storage requests per chunk. On a CPU-only machine the model is given ``--model-threads``
cores (default 1) so that the other core plays the host CPU that prepares batches beside a GPU.

Usage: python bench/bench_gpu_worker.py [--files 16] [--seconds 20] [--batch 4] [--s3]
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


def messages(plans: list[JobPlan], batch: int) -> list[tuple[JobPlan, list[int]]]:
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


def run_serial(work: list[tuple[JobPlan, list[int]]], engine: OmniEngine, storage: Storage, settings: Settings) -> dict:
    batches: list[int] = []
    engine.batch_observers.append(lambda rows, tokens, seconds: batches.append(rows))
    started = time.perf_counter()
    results = [r for plan, chunks in work for r in infer_chunks(plan, chunks, engine, storage, settings)]
    wall = time.perf_counter() - started
    engine.batch_observers.clear()
    return {
        "wall": wall,
        "model": sum(r.model_seconds for r in results),
        "prepare": sum(r.prepare_seconds for r in results),  # fetch + decode + processor
        "mean_batch": sum(batches) / len(batches),
    }


def run_pipelined(
    work: list[tuple[JobPlan, list[int]]], engine: OmniEngine, storage: Storage, settings: Settings, slots: int
) -> dict:
    fed = PipelinedEngine(engine, settings)
    budget = ChunkBudget(2 * settings.batch_size)
    started = time.perf_counter()
    with ThreadPoolExecutor(slots) as workers:  # the GPU worker's message slots
        results = list(workers.map(lambda m: infer_chunks(m[0], m[1], fed, storage, settings, budget), work))
    wall = time.perf_counter() - started
    fed.close()
    return {
        "wall": wall,
        "model": fed.stats.model_s,
        "prepare": sum(r.prepare_seconds for rs in results for r in rs),  # fetch + decode + processor
        "mean_batch": fed.stats.mean_batch,
    }


def overlap(run: dict) -> float:
    hidden = run["prepare"] + run["model"] - run["wall"]
    return max(0.0, hidden / min(run["prepare"], run["model"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each file (one chunk at 30 s)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model-threads", type=int, default=1)
    parser.add_argument("--s3", action="store_true", help="store on a SeaweedFS started here instead of a directory")
    args = parser.parse_args()
    torch.set_num_threads(args.model_threads)
    settings = Settings(
        model="tiny", device="cpu", batch_size=args.batch, transcript_max_new_tokens=64, caption_max_new_tokens=64,
        summary_max_new_tokens=48,
    )  # fmt: skip
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
            engine = OmniEngine(settings)
            engine.load()
            infer_chunks(plans[0], [0], engine, store, settings)  # warm-up
            clear_results(store, plans)
            counting = CountingStorage(store)
            serial = run_serial(work, engine, counting, settings)
            serial_requests = counting.total() / chunks
            clear_results(store, plans)
            counting = CountingStorage(store)
            piped = run_pipelined(work, engine, counting, settings, 2 * args.batch)
            piped_requests = counting.total() / chunks
        finally:
            if server is not None:
                server.stop()
    where = "S3 (SeaweedFS)" if args.s3 else "a file store"
    print(
        f"{args.files} files of ~{args.seconds:.0f} s (640x360, {chunks} chunks), tiny model on {args.model_threads} "
        f"CPU thread(s), batch {args.batch}, {where}; torch {torch.__version__}"
    )
    print(f"{'':24}{'wall':>8}{'model':>8}{'prepare':>9}{'overlap':>9}{'mean batch':>12}{'req/chunk':>11}")
    rows = (("serial (one message)", serial, serial_requests), ("pipelined", piped, piped_requests))
    for name, run, requests in rows:
        mean = f"{run['mean_batch']:.2f}"
        print(
            f"{name:24}{run['wall']:7.2f}s{run['model']:7.2f}s{run['prepare']:8.2f}s{overlap(run):9.2f}"
            f"{mean:>12}{requests:11.1f}"
        )
    print(f"pipelined vs serial: {serial['wall'] / piped['wall']:.2f}x faster; "
          f"wall / max(model, prepare) = {piped['wall'] / max(piped['model'], piped['prepare']):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
