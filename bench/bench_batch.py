"""Batched generate vs one call per request on the tiny model (or OMNIQ_MODEL), same process.

Usage: python bench/bench_batch.py [--rows 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pipeline import prompts
from pipeline.config import Settings
from pipeline.engines.omni import OmniEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    settings = Settings(model=os.environ.get("OMNIQ_MODEL", "tiny"), batch_size=args.rows)
    engine = OmniEngine(settings)
    engine.load()
    rng = np.random.default_rng(0)
    requests = [
        prompts.transcript_request((0.1 * rng.standard_normal(int(16000 * args.seconds))).astype(np.float32), None, 32)
        for _ in range(args.rows)
    ]
    engine.generate(requests[:1])  # warm-up
    started = time.perf_counter()
    single = [engine.generate([r])[0] for r in requests]
    singles = time.perf_counter() - started
    started = time.perf_counter()
    batched = engine.generate(requests)
    batch = time.perf_counter() - started
    same = all(a.text == b.text for a, b in zip(single, batched, strict=True))
    print(f"{args.rows} rows of {args.seconds:.0f} s audio, model {settings.model}")
    print(f"one call per row: {singles:6.2f} s   1.00x")
    print(f"one batched call: {batch:6.2f} s   {singles / batch:5.2f}x faster   identical rows: {same}")


if __name__ == "__main__":
    main()
