"""Both engines on the same rows in one run: rows/s, output tokens/s and per-row latency, as ratios.

The transformers engine runs here, behind the pipelined batcher as the GPU worker runs it; the vLLM engine runs
in the environment ``make vllm`` builds (this script again, ``--side vllm``, in a subprocess), on the same
inputs: chunks of seeded synthetic media of the pipeline's shapes. Each chunk is one caller thread's work, as a
GPU worker slot's message is: its transcript and caption rows handed in together, then its chunk summary; up
to ``--callers`` chunks are under way at once. Model loading is not timed; one chunk warms each engine first.
``identical`` says whether both engines wrote the same tokens for every row.

On a CPU (here) this measures the engines' overheads on the tiny model, not a GPU's throughput: see
``bench/gpu_throughput.py`` for that.

Usage: .venv/bin/python bench/bench_engines.py [--chunks 16] [--callers 8] [--seconds 10] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from pipeline import prompts
from pipeline.config import Settings
from pipeline.engines import concurrent_engine
from pipeline.engines.base import SAMPLE_RATE, ConcurrentEngine, GenerationRequest, GenerationResult

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def workload(chunks: int, seconds: float, tokens: int, fps: float) -> list[list[GenerationRequest]]:
    """Each chunk's transcript, caption (frames with their soundtrack) and chunk summary rows."""
    work = []
    for index in range(chunks):
        rng = np.random.default_rng(index)
        audio = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
        frames = rng.integers(0, 256, (max(2, int(seconds * fps)), 120, 160, 3), dtype=np.uint8)
        words = " ".join(["the speaker explains the next step of the plan"] * 4)
        work.append(
            [
                prompts.transcript_request(audio, "en", tokens),
                prompts.caption_request(frames, fps, audio, tokens),
                prompts.chunk_summary_request(index * seconds, (index + 1) * seconds, words, words, words, tokens),
            ]
        )
    return work


def measure(engine: ConcurrentEngine, work: list[list[GenerationRequest]], callers: int) -> dict[str, Any]:
    latencies: list[float] = []
    tokens: list[list[int]] = []

    def chunk(rows: list[GenerationRequest]) -> list[GenerationResult]:
        answers: list[GenerationResult] = []
        for part in (rows[:2], rows[2:]):
            started = time.perf_counter()
            outcomes = engine.generate_each(part)
            took = time.perf_counter() - started
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
                answers.append(outcome)
                latencies.append(took)
        return answers

    chunk(work[0])  # warm-up: kernels, allocator, the processor's first call
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        answers = [a for chunk_answers in pool.map(chunk, work) for a in chunk_answers]
    wall = time.perf_counter() - started
    tokens = [a.meta["token_ids"] for a in answers]
    new_tokens = sum(a.new_tokens for a in answers)
    latencies = latencies[3:]  # the warm-up chunk's rows
    return {
        "rows": len(answers),
        "wall_s": wall,
        "rows_per_s": len(answers) / wall,
        "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": statistics.quantiles(latencies, n=20)[-1],
        "token_ids": tokens,
    }


def side(name: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(model="tiny", engine=name, device="cpu", fps=args.fps, batch_size=args.batch_size)
    engine = concurrent_engine(settings)
    started = time.perf_counter()
    engine.load()
    loaded = time.perf_counter() - started
    try:
        report = measure(engine, workload(args.chunks, args.seconds, args.tokens, args.fps), args.callers)
    finally:
        engine.close()
    return {"engine": name, "load_s": loaded, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--callers", type=int, default=8, help="chunks under way at once (the GPU worker's slots)")
    parser.add_argument("--seconds", type=float, default=10.0, help="media per chunk")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each row writes")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=4, help="the transformers engine's rows per generate")
    parser.add_argument("--side", choices=("both", "transformers", "vllm"), default="both")
    parser.add_argument("--json", type=Path, help="write this side's report here")
    args = parser.parse_args()
    if args.side != "both":
        report = side(args.side, args)
        if args.json:
            args.json.write_text(json.dumps(report))
        else:
            print(json.dumps({k: v for k, v in report.items() if k != "token_ids"}, indent=1))
        return

    mine = side("transformers", args)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "vllm.json"
        command = [str(VLLM_PYTHON), __file__, "--side", "vllm", "--json", str(out)]
        for name in ("chunks", "callers", "seconds", "tokens", "fps", "batch_size"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, check=False)
        if done.returncode != 0:
            sys.exit(f"the vLLM side failed (is .venv-vllm built? make vllm):\n{done.stderr[-3000:]}")
        theirs = json.loads(out.read_text())
    print(
        f"{args.chunks} chunks of {args.seconds:.0f} s (transcript + caption with soundtrack + summary, {args.tokens} "
        f"tokens each), {args.callers} chunks at once, tiny model, {os.cpu_count()} CPU cores"
    )
    print("| engine | rows/s | output tok/s | row latency p50 / p95 (s) | load (s) |")
    print("|---|---|---|---|---|")
    for report in (mine, theirs):
        print(
            f"| {report['engine']} | {report['rows_per_s']:.2f} | {report['tokens_per_s']:.1f} | "
            f"{report['latency_p50_s']:.2f} / {report['latency_p95_s']:.2f} | {report['load_s']:.1f} |"
        )
    same = theirs["token_ids"] == mine["token_ids"]
    print(
        f"vllm / transformers: rows/s {theirs['rows_per_s'] / mine['rows_per_s']:.2f}x, output tok/s "
        f"{theirs['tokens_per_s'] / mine['tokens_per_s']:.2f}x, latency p50 "
        f"{theirs['latency_p50_s'] / mine['latency_p50_s']:.2f}x; identical tokens: {same}"
    )


if __name__ == "__main__":
    main()
