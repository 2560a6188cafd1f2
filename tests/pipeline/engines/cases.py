"""The same requests for both engines, built from seeded numpy media so that two processes (the test in
``.venv`` and the vLLM engine in ``.venv-vllm``) build identical arrays; ``python -m`` runs them on vLLM."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline import prompts
from pipeline.engines.base import SAMPLE_RATE, GenerationRequest


def _audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.2 * np.sin(2 * np.pi * (220 + 40 * seed) * t) * (1 + np.sin(2 * np.pi * 0.7 * t))
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


def requests() -> list[GenerationRequest]:
    """One of each row kind the pipeline sends, with the settings that trip engines: audio past Whisper's 30 s,
    a soundtrack interleaved with its frames, a video at another fps, text-only rows."""
    return [
        prompts.transcript_request(_audio(3.0, 1), "en", 12),
        prompts.transcript_request(_audio(41.0, 2), None, 12),  # past 30 s: must be heard to the end
        prompts.caption_request(_frames(8, 96, 128, 3), 2.0, _audio(4.0, 3), 10),  # use_audio_in_video
        prompts.caption_request(_frames(4, 64, 64, 4), 1.0, None, 10),  # another fps, no soundtrack
        prompts.caption_request(None, 2.0, _audio(5.0, 5), 10),
        prompts.language_request(_audio(2.0, 6)),
        prompts.chunk_summary_request(0.0, 30.0, "the weather today", "a field", "music", 9),
        prompts.file_summary_request([(0.0, 30.0, "a walk"), (30.0, 60.0, "a talk")], 9),
    ]


def too_long() -> GenerationRequest:
    """A caption of 20 s of large frames: about 4 000 video tokens, more than :data:`MAX_MODEL_LEN` holds."""
    return prompts.caption_request(_frames(40, 448, 448, 7), 2.0, None, 10)


MAX_MODEL_LEN = 2048  # the vLLM side's context: every row of :func:`requests` fits, :func:`too_long` does not


def _row(outcome: object) -> dict[str, object]:
    if isinstance(outcome, BaseException):
        return {"error": f"{type(outcome).__name__}: {outcome}"}
    return {"text": outcome.text, "prompt_tokens": outcome.prompt_tokens, **outcome.meta}  # type: ignore[attr-defined]


def main() -> int:
    """Run :func:`requests` and :func:`too_long` on the vLLM engine with the tiny model, in one call and then
    each from a thread of its own (as the GPU worker's slots do); write the outcomes as JSON to ``--out`` (vLLM
    logs to standard output)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from pipeline.config import Settings
    from pipeline.engines.vllm_engine import VllmEngine

    settings = Settings(
        model="tiny", cache_dir=args.cache_dir, device="cpu", dtype="auto", fps=2.0, vllm_max_model_len=MAX_MODEL_LEN
    )
    engine = VllmEngine(settings)
    engine.record_prompt_ids = True
    rows = [*requests(), too_long()]
    together = [_row(outcome) for outcome in engine.generate_each(rows)]
    with ThreadPoolExecutor(len(rows)) as callers:
        apart = [_row(outcome) for outcome in callers.map(lambda row: engine.generate_each([row])[0], rows)]
    engine.close()
    report = {"together": together, "apart": apart, "most_running": engine.most_running, "steps": engine.steps}
    args.out.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
