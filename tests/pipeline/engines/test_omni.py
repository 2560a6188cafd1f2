"""OmniEngine on the tiny real-architecture model: batching, ordering and every DESIGN.md pitfall."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.engines.base import SAMPLE_RATE, GenerationRequest, GenerationResult
from pipeline.engines.omni import (
    OmniEngine,
    OutOfMemory,
    batch_key,
    plan_batches,
    resolve_device,
    resolve_dtype,
    trim_generated,
)
from pipeline.errors import ConfigError, ModelError, TransientError
from tests.pipeline.engines.conftest import tiny_settings


def tone(seconds: float, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def frames(count: int, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """Random frames with a moving gradient, uint8 (count, height, width, 3)."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 255, (count, height, width, 3), dtype=np.uint8)
    gradient = (np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8)
    video[..., 0] = np.roll(gradient, seed)[None, None, :]
    return video


def user(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(items)}]


AUDIO = {"type": "audio"}
VIDEO = {"type": "video"}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def transcript_request(audio: np.ndarray, max_new_tokens: int = 32) -> GenerationRequest:
    messages = user(AUDIO, text("Transcribe the English audio into text."))
    return GenerationRequest("transcript", messages, audio=audio, max_new_tokens=max_new_tokens)


def caption_request(
    video: np.ndarray,
    audio: np.ndarray | None = None,
    fps: float | None = 2.0,
    max_new_tokens: int = 32,
) -> GenerationRequest:
    messages = user(VIDEO, text("Describe the video in detail."))
    return GenerationRequest(
        "caption",
        messages,
        audio=audio,
        video=video,
        fps=fps,
        use_audio_in_video=audio is not None,
        max_new_tokens=max_new_tokens,
    )


def summary_request(body: str, max_new_tokens: int = 32) -> GenerationRequest:
    messages = user(text(f"Summarize the following transcript in a few sentences.\n{body}"))
    return GenerationRequest("summary", messages, max_new_tokens=max_new_tokens)


def one_by_one(engine: OmniEngine, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    return [engine.generate([request])[0] for request in requests]


def same_answer(a: GenerationResult, b: GenerationResult) -> bool:
    return (a.text, a.new_tokens, a.prompt_tokens, a.meta) == (b.text, b.new_tokens, b.prompt_tokens, b.meta)


# -- batching and order --------------------------------------------------------------------------------------


def test_batched_outputs_equal_single_outputs(engine: OmniEngine) -> None:
    requests = [
        transcript_request(tone(10.0)),
        caption_request(frames(20, seed=1), audio=tone(10.0, 300.0)),
        summary_request("The speaker talks about the weather and the news."),
        transcript_request(noise(7.3, seed=2)),  # a shorter chunk: padded in the batch
    ]
    batched = engine.generate(requests)
    single = one_by_one(engine, requests)

    assert [r.batch_size for r in batched] == [4, 4, 4, 4]
    assert [r.batch_size for r in single] == [1, 1, 1, 1]
    for b, s in zip(batched, single, strict=True):
        assert same_answer(b, s), (b, s)
        assert b.new_tokens == 32 and b.text
    assert len({r.text for r in batched}) == 4  # the tiny model does read its inputs
    assert batched[0].meta["audio_tokens"] == 130 and batched[0].meta["video_tokens"] == 0
    assert batched[1].meta["audio_tokens"] == 130 and batched[1].meta["video_tokens"] == 60
    assert batched[2].meta["audio_tokens"] == batched[2].meta["video_tokens"] == 0


def test_a_clip_is_heard_the_same_alone_and_batched_whatever_its_length(engine: OmniEngine) -> None:
    # utterances have any length, not whole 10 ms mel frames; Whisper's feature extractor counted one frame more
    # for such a clip when it was padded beside a longer one: a different input, an answer that depended on the
    # batch (the fault suite's byte-for-byte comparisons of results caught it)
    from pipeline.media.voice import SENTENCES, synthesize

    spoken = [synthesize(text).astype(np.float32) / 32768 for text in (SENTENCES[0], "Yes.", "No.", SENTENCES[4])]
    assert all(len(clip) % 160 for clip in spoken)
    requests = [transcript_request(clip, max_new_tokens=4) for clip in spoken]
    together = engine.encode(requests).inputs
    for row, request in enumerate(requests):
        alone = engine.encode([request]).inputs
        frames = int(alone["feature_attention_mask"].sum())
        assert int(together["feature_attention_mask"][row].sum()) == frames
        # the same features but for the last frame, whose window reaches past the end (reflected alone, zeros
        # in a batch)
        last = frames - 1
        assert torch.equal(together["input_features"][row, :, :last], alone["input_features"][0, :, :last])
    batched = engine.generate(requests)
    assert [r.meta["audio_tokens"] for r in batched] == [r.meta["audio_tokens"] for r in one_by_one(engine, requests)]


def test_mixed_fps_are_split_into_batches_and_results_keep_request_order(engine: OmniEngine) -> None:
    requests = [
        caption_request(frames(8, seed=1), fps=2.0),
        caption_request(frames(8, seed=2), fps=1.0),
        transcript_request(tone(3.0)),
        caption_request(frames(8, seed=3), fps=2.0),
        caption_request(frames(8, seed=4), fps=1.0),
    ]
    batched = engine.generate(requests)

    assert [r.batch_size for r in batched] == [3, 2, 3, 3, 2]  # batches [0, 2, 3] (fps 2) and [1, 4] (fps 1)
    for b, s in zip(batched, one_by_one(engine, requests), strict=True):
        assert same_answer(b, s)


def test_plan_batches_groups_compatible_requests_first_fit() -> None:
    video = frames(2)
    requests = [
        caption_request(video, fps=2.0),
        caption_request(video, fps=1.0),
        summary_request("a"),
        caption_request(video, audio=tone(1.0), fps=2.0),  # soundtrack interleaved: not with plain videos
        caption_request(video, fps=None),  # None means the settings' fps (2.0)
        transcript_request(tone(1.0)),
        caption_request(video, fps=2.0),
    ]
    assert batch_key(requests[4], default_fps=2.0) == (2.0, False)
    assert batch_key(requests[2], default_fps=2.0) is None
    assert plan_batches(requests, batch_size=3, default_fps=2.0) == [[0, 2, 4], [1, 5], [3], [6]]
    assert plan_batches(requests, batch_size=1, default_fps=2.0) == [[i] for i in range(7)]


def test_text_only_request(engine: OmniEngine) -> None:
    [result] = engine.generate([summary_request("Two people cook dinner.", max_new_tokens=12)])
    assert result.new_tokens == 12 and result.text
    assert result.prompt_tokens > 10 and result.seconds > 0 and result.batch_size == 1
    assert result.meta["finish_reason"] == "length"


def test_each_row_is_cut_to_its_own_max_new_tokens(engine: OmniEngine) -> None:
    # The thinker class takes plain max_new_tokens (the full Qwen3OmniMoeForConditionalGeneration would
    # silently ignore it and want thinker_max_new_tokens).
    requests = [
        transcript_request(tone(4.0), max_new_tokens=5),
        transcript_request(tone(4.0, 300.0), max_new_tokens=17),
    ]
    short, long = engine.generate(requests)
    assert (short.new_tokens, long.new_tokens) == (5, 17)
    assert same_answer(short, engine.generate([requests[0]])[0])


def test_tiny_engine_says_its_weights_are_random(engine: OmniEngine) -> None:
    assert engine.model_id == "tiny"
    assert engine.random_weights is True


# -- DESIGN.md pitfalls --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [0.5, 2.0, 4.0])
def test_request_fps_reaches_the_processor(engine: OmniEngine, fps: float) -> None:
    # Without fps= the processor assumes 1 frame per second and every frame pair gets the wrong time.
    encoded = engine.encode([caption_request(frames(8), fps=fps)])
    temporal_patch = engine.processor.video_processor.temporal_patch_size
    assert encoded.inputs["video_second_per_grid"].tolist() == [pytest.approx(temporal_patch / fps)]


def test_missing_request_fps_uses_the_settings_fps(make_engine: Callable[..., OmniEngine]) -> None:
    engine = make_engine(fps=4.0)
    encoded = engine.encode([caption_request(frames(8), fps=None)])
    assert encoded.inputs["video_second_per_grid"].tolist() == [pytest.approx(0.5)]


def test_frame_pixels_are_capped(make_engine: Callable[..., OmniEngine]) -> None:
    # The processor's own default allows 768*32*32 pixels per frame: ~700 tokens per frame pair at 720p.
    engine = make_engine(frame_max_pixels=128 * 128)
    [result] = engine.generate([caption_request(frames(4, height=720, width=1280), max_new_tokens=2)])
    pairs = 2
    assert 0 < result.meta["video_tokens"] <= pairs * (128 * 128) // (32 * 32)


def test_small_frames_are_not_blown_up(engine: OmniEngine) -> None:
    # ... and its default minimum of 128*32*32 pixels would turn a 32x32 frame into 128 tokens per pair.
    [result] = engine.generate([caption_request(frames(4, height=32, width=32), max_new_tokens=2)])
    assert result.meta["video_tokens"] == 2


def test_audio_longer_than_30_seconds_is_not_truncated(make_engine: Callable[..., OmniEngine]) -> None:
    # Whisper's feature extractor cuts at 30 s unless truncation=False reaches it. This transformers release
    # defaults to False in the Qwen3-Omni processor; others did not, so the test restores Whisper's default.
    engine = make_engine()
    engine.processor.audio_kwargs = {**engine.processor.audio_kwargs, "truncation": True, "padding": "max_length"}
    encoded = engine.encode([transcript_request(tone(45.0)), transcript_request(tone(15.0))])
    frames_per_second = SAMPLE_RATE // engine.processor.feature_extractor.hop_length
    assert encoded.inputs["feature_attention_mask"].sum(-1).tolist() == [45 * frames_per_second, 15 * frames_per_second]
    audio_tokens = (encoded.inputs["input_ids"] == engine.processor.tokenizer.audio_token_id).sum(-1).tolist()
    assert audio_tokens == [45 * 13, 15 * 13]  # 13 audio tokens per second


def test_soundtrack_is_interleaved_with_its_frames(engine: OmniEngine) -> None:
    request = caption_request(frames(20), audio=tone(10.0, 300.0))
    encoded = engine.encode([request])
    assert encoded.use_audio_in_video is True
    tokenizer = engine.processor.tokenizer
    ids = encoded.inputs["input_ids"][0].tolist()
    start = ids.index(tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1] == tokenizer.convert_tokens_to_ids("<|audio_start|>")
    kinds = "".join("V" if i == tokenizer.video_token_id else "A" if i == tokenizer.audio_token_id else "" for i in ids)
    assert kinds.count("V") == 60 and kinds.count("A") == 130
    assert kinds.count("VA") == 10  # ten frame pairs, each followed by its 2 s of sound


def test_generate_passes_use_audio_in_video_to_the_model(engine: OmniEngine) -> None:
    # The processor interleaves the tokens; the model needs the same flag to give them the right positions.
    request = caption_request(frames(20), audio=tone(10.0, 300.0), max_new_tokens=8)
    encoded = engine.encode([request])
    prompt_length = encoded.inputs["input_ids"].shape[1]
    by_flag = {}
    with torch.inference_mode():
        for flag in (True, False):
            output = engine.model.generate(**encoded.inputs, use_audio_in_video=flag, max_new_tokens=8, do_sample=False)
            by_flag[flag] = engine.processor.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
    assert by_flag[True] != by_flag[False]
    assert engine.generate([request])[0].text == by_flag[True].strip()


def test_a_separate_audio_item_for_the_soundtrack_is_dropped(engine: OmniEngine) -> None:
    plain = caption_request(frames(8), audio=tone(4.0), max_new_tokens=8)
    with_item = caption_request(frames(8), audio=tone(4.0), max_new_tokens=8)
    with_item.messages = user(VIDEO, AUDIO, text("Describe the video in detail."))
    assert same_answer(engine.generate([with_item])[0], engine.generate([plain])[0])


def test_silent_video_is_a_plain_video(engine: OmniEngine) -> None:
    request = caption_request(frames(8), fps=2.0)
    request.use_audio_in_video = True  # but there is no audio
    encoded = engine.encode([request])
    assert encoded.use_audio_in_video is False
    assert engine.generate([request])[0].meta["audio_tokens"] == 0


def test_batches_are_padded_on_the_left(make_engine: Callable[..., OmniEngine]) -> None:
    engine = make_engine()
    # A tokenizer saved with right padding must not turn the batch around: generation appends on the right.
    engine.processor.tokenizer.padding_side = "right"
    engine.processor.tokenizer.init_kwargs["padding_side"] = "right"
    requests = [summary_request("short"), transcript_request(tone(3.0))]
    mask = engine.encode(requests).inputs["attention_mask"]
    assert mask[:, -1].tolist() == [1, 1]
    assert mask[0, 0] == 0 and mask[1].all()
    with_right_tokenizer = engine.generate(requests)
    assert [r.text for r in with_right_tokenizer] == [r.text for r in one_by_one(engine, requests)]


def test_one_batch_cannot_mix_fps(engine: OmniEngine) -> None:
    with pytest.raises(ValueError, match="fps"):
        engine.encode([caption_request(frames(4), fps=1.0), caption_request(frames(4), fps=2.0)])


# -- CUDA out of memory --------------------------------------------------------------------------------------


class OutOfMemoryAbove(OmniEngine):
    """The tiny engine on a pretend GPU that fits at most ``rows`` requests per generate call."""

    def __init__(self, rows: int, *args: Any) -> None:
        super().__init__(*args)
        self.rows = rows
        self.calls: list[int] = []

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls.append(len(requests))
        if len(requests) > self.rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate_batch(requests)


def test_out_of_memory_halves_the_batch_and_keeps_order(tiny_cache_dir: Path, engine: OmniEngine) -> None:
    oom_engine = OutOfMemoryAbove(1, tiny_settings(tiny_cache_dir, batch_size=4))
    requests = [transcript_request(tone(2.0 + i)) for i in range(3)] + [summary_request("x")]
    results = oom_engine.generate(requests)
    assert oom_engine.calls == [4, 2, 1, 1, 2, 1, 1]
    assert [r.batch_size for r in results] == [1, 1, 1, 1]
    for got, expected in zip(results, one_by_one(engine, requests), strict=True):
        assert same_answer(got, expected)


def test_out_of_memory_for_one_request_is_transient(tiny_cache_dir: Path) -> None:
    oom_engine = OutOfMemoryAbove(0, tiny_settings(tiny_cache_dir))
    with pytest.raises(OutOfMemory) as caught:
        oom_engine.generate([transcript_request(tone(1.0))])
    assert isinstance(caught.value, TransientError)
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)


# -- loading, settings and validation ------------------------------------------------------------------------


def test_missing_local_model_is_a_model_error(tmp_path: Path) -> None:
    engine = OmniEngine(tiny_settings(tmp_path, model=str(tmp_path / "no-such-model")))
    with pytest.raises(ModelError, match="does not exist"):
        engine.load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"config\.json"):
        OmniEngine(tiny_settings(tmp_path, model=str(tmp_path / "empty"))).load()


def test_local_checkpoint_directory_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = OmniEngine(tiny_settings(tmp_path, model=str(tiny_model_dir)))
    engine.load()
    engine.load()  # idempotent
    assert engine.random_weights is False  # a local path could hold real weights
    assert engine.generate([summary_request("x", max_new_tokens=3)])[0].new_tokens == 3


def test_device_and_dtype_resolution() -> None:
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_dtype("float8", cpu)
    with pytest.raises(ConfigError):
        resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")


def test_media_items_must_match_the_arrays(engine: OmniEngine) -> None:
    request = transcript_request(tone(1.0))
    request.messages = user(text("no audio item here"))
    with pytest.raises(ValueError, match="media items"):
        engine.generate([request])
    with pytest.raises(ValueError, match="mono"):
        engine.generate([transcript_request(np.zeros((2, 100), dtype=np.float32))])


def test_trim_generated() -> None:
    assert trim_generated([5, 6, 7, 8], 3, {99}) == ([5, 6, 7], False)
    assert trim_generated([5, 99, 0, 0], 4, {99, 0}) == ([5, 99], True)
    assert trim_generated([99], 1, {99}) == ([99], True)


@pytest.mark.gpu
def test_tiny_model_generates_on_cuda(make_engine: Callable[..., OmniEngine]) -> None:
    engine = make_engine(device="cuda", dtype="auto")
    requests = [transcript_request(tone(10.0)), caption_request(frames(20), audio=tone(10.0)), summary_request("x")]
    results = engine.generate(requests)
    assert engine.model.dtype == torch.bfloat16 and engine.device.type == "cuda"
    assert [r.new_tokens for r in results] == [32, 32, 32]
    assert results[1].meta["video_tokens"] == 60
