"""Settings shared by the pipeline's end-to-end tests: the tiny model, short chunks, small frames, few tokens.

``settings`` has Qwen3-Omni write the transcript (the path a real checkpoint takes by default);
``whisper_settings`` has Whisper tiny.en write it (what ``--model tiny`` does by default).
"""

from __future__ import annotations

import pytest

from pipeline.config import Settings


@pytest.fixture(scope="module")
def settings(tiny_cache_dir):
    return Settings(
        model="tiny",
        cache_dir=tiny_cache_dir,
        chunk_seconds=10.0,
        fps=1.0,
        frame_max_pixels=96 * 96,
        transcript_max_new_tokens=24,
        caption_max_new_tokens=24,
        summary_max_new_tokens=16,
        transcriber="omni",
    )


@pytest.fixture(scope="module")
def whisper_settings(settings):
    return settings.model_copy(update={"transcriber": "whisper"})
