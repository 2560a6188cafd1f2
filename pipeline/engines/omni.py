"""Qwen3-Omni through transformers: the thinker (text out) answering batches of audio/video/text requests.

Each pitfall listed in DESIGN.md is handled here, at the one place the processor or ``generate`` is called:
``fps=`` reaches the processor, frames are capped in pixels, long audio is not truncated, the soundtrack of a
video is interleaved with its frames, videos of different fps never share a batch, and padding is on the left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import failpoints, prompts
from pipeline.config import TINY_MODEL, Settings
from pipeline.engines.base import SAMPLE_RATE, GenerationRequest, GenerationResult
from pipeline.engines.tiny import TINY_MODEL_RANDOM_WEIGHTS, ensure_tiny_model
from pipeline.errors import ConfigError, ModelError, TransientError

if TYPE_CHECKING:  # torch and transformers are imported lazily: importing this module stays cheap
    import torch
    from transformers import BatchFeature

logger = logging.getLogger(__name__)

_DTYPES = ("bfloat16", "float16", "float32")


class OutOfMemory(TransientError):
    """CUDA ran out of memory even for a batch of one request; worth retrying later or elsewhere."""


@dataclass
class EncodedBatch:
    """Processor output for one compatible batch, on the model's device, plus the flags ``generate`` needs."""

    inputs: BatchFeature
    use_audio_in_video: bool
    max_new_tokens: int
    input_ids: torch.Tensor  # host copies of the token ids and mask, for accounting without device syncs
    attention_mask: torch.Tensor
    seconds: float  # time spent in the processor and on the copy to the device


def batch_key(request: GenerationRequest, default_fps: float) -> tuple[float, bool] | None:
    """What a request's batch must share: ``(fps, use_audio_in_video)`` for a video, ``None`` (anything) else.

    One processor call takes one ``fps`` for all its videos, and the model's ``use_audio_in_video`` flag is
    batch-wide, so videos with and without an interleaved soundtrack cannot share a batch either. Audio-only
    and text-only rows get the same positions under either flag, so they fit into any batch.
    """
    if request.video is None:
        return None
    fps = float(request.fps) if request.fps is not None else float(default_fps)
    return fps, _audio_in_video(request)


def plan_batches(requests: Sequence[GenerationRequest], batch_size: int, default_fps: float) -> list[list[int]]:
    """Group request indices into compatible batches of at most ``batch_size``, first fit in request order."""
    batches: list[tuple[tuple[float, bool] | None, list[int]]] = []
    for index, request in enumerate(requests):
        key = batch_key(request, default_fps)
        for slot, (batch_key_, members) in enumerate(batches):
            if len(members) < batch_size and (key is None or batch_key_ is None or key == batch_key_):
                members.append(index)
                batches[slot] = (batch_key_ if key is None else key, members)
                break
        else:
            batches.append((key, [index]))
    return [members for _, members in batches]


def model_source(settings: Settings) -> str:
    """What ``from_pretrained`` (or vLLM) loads for ``settings.model``: the tiny model's folder (built once), a
    checkpoint folder, or a hub id resolved through the Hugging Face cache."""
    model = settings.model
    if model == TINY_MODEL:
        return str(ensure_tiny_model(settings.cache_dir))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; point OMNIQ_MODEL at a checkpoint")
        return str(path)
    if model.startswith(("/", ".", "~")):
        raise ModelError(f"model path {model!r} does not exist; set OMNIQ_MODEL to a checkpoint directory")
    return model


def chat_prompt(processor: Any, request: GenerationRequest) -> str:
    """The prompt text of ``request`` through the checkpoint's chat template, with one placeholder per media
    array it carries (a soundtrack interleaved with its video has none of its own); both engines send this."""
    counts = {"audio": 0, "video": 0, "image": 0}
    messages = request.messages
    if _audio_in_video(request):
        # The soundtrack sits inside the video placeholder, so a separate audio item would be one too many.
        messages = [_without_audio_items(m) for m in messages]
    for message in messages:
        content = message.get("content")
        for item in content if isinstance(content, list) else []:
            if item.get("type") in counts:
                counts[item["type"]] += 1
    expected = {
        "audio": int(request.audio is not None and not _audio_in_video(request)),
        "video": int(request.video is not None),
        "image": 0,
    }
    if counts != expected:
        raise ValueError(
            f"{request.kind} request: its messages name {counts} media items but it carries {expected} "
            "arrays; put one {'type': 'audio'} / {'type': 'video'} item per array and no images"
        )
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def stop_token_ids(tokenizer: Any, configured: int | list[int] | None) -> set[int]:
    """The ids that end an answer: ``<|im_end|>``, the tokenizer's end and pad, and the generation config's."""
    stop_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id, tokenizer.pad_token_id}
    stop_ids.update(configured if isinstance(configured, list) else [configured])
    return {int(i) for i in stop_ids if i is not None and i >= 0}


def _audio_in_video(request: GenerationRequest) -> bool:
    # A silent video has no soundtrack to interleave: it is processed as a plain video.
    return bool(request.use_audio_in_video and request.video is not None and request.audio is not None)


def trim_generated(token_ids: Sequence[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], bool]:
    """Cut one generated row to ``max_new_tokens`` and at its first stop token (kept); say whether it stopped."""
    row = list(token_ids)[:max_new_tokens]
    for position, token in enumerate(row):
        if token in stop_ids:
            return row[: position + 1], True
    return row, False


def resolve_device(setting: str) -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU; anything else as torch spells it."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"OMNIQ_DEVICE={setting!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"OMNIQ_DEVICE={setting!r} but no CUDA device is visible; use OMNIQ_DEVICE=auto or cpu")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 on the CPU (where bfloat16 matmuls are slow or missing)."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in _DTYPES:
        raise ConfigError(f"OMNIQ_DTYPE={setting!r} is not supported; use auto or one of {', '.join(_DTYPES)}")
    return getattr(torch, setting)


def fast_paths(settings: Settings) -> dict[str, str]:
    """``from_pretrained`` arguments for the attention and MoE-experts kernels; ``auto`` keeps transformers'
    defaults (SDPA attention; grouped GEMM experts for prefill, switched to batched GEMM for decode on GPUs)."""
    chosen = {"attn_implementation": settings.attention, "experts_implementation": settings.experts}
    return {name: value for name, value in chosen.items() if value != "auto"}


class OmniEngine:
    """Qwen3-Omni's thinker behind the :class:`~pipeline.engines.base.Engine` protocol.

    ``settings.model`` is a hub id, a local directory, or ``"tiny"`` for the random offline model (then
    :attr:`random_weights` is true and callers must say its text is meaningless).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_id: str = settings.model
        self.random_weights: bool = settings.model == TINY_MODEL and TINY_MODEL_RANDOM_WEIGHTS
        self.model: Any = None
        self.processor: Any = None
        self.device: torch.device | None = None
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._stop_ids: set[int] = set()
        # called after every generate call with (rows, new tokens, seconds): metrics hook for the workers
        self.batch_observers: list[Callable[[int, int, float], None]] = []

    # -- loading -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load processor and weights once; later calls return at once."""
        if self.model is not None:
            return
        with self._load_lock:
            if self.model is not None:
                return
            from transformers import AutoProcessor, Qwen3OmniMoeThinkerForConditionalGeneration

            device = resolve_device(self.settings.device)
            dtype = resolve_dtype(self.settings.dtype, device)
            source = model_source(self.settings)
            started = time.perf_counter()
            try:
                processor = AutoProcessor.from_pretrained(source)
                # The thinker alone (no talker): it takes plain generate() arguments such as max_new_tokens,
                # which the full Qwen3OmniMoeForConditionalGeneration would silently ignore (it wants
                # thinker_max_new_tokens). It also loads the thinker weights out of the full checkpoint.
                model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(
                    source,
                    dtype=dtype,
                    device_map=str(device) if device.type == "cuda" else None,
                    **fast_paths(self.settings),
                )
            except ValueError as exc:
                if any(value in str(exc) for value in fast_paths(self.settings).values()):
                    raise ConfigError(
                        f"OMNIQ_ATTENTION={self.settings.attention!r} / OMNIQ_EXPERTS={self.settings.experts!r}: {exc}"
                    ) from exc
                raise ModelError(
                    f"could not load model {self.model_id!r} ({exc}). Download it into the Hugging Face cache, "
                    "set OMNIQ_MODEL to a local checkpoint directory, or use OMNIQ_MODEL=tiny for the offline "
                    "test model."
                ) from exc
            except OSError as exc:
                raise ModelError(
                    f"could not load model {self.model_id!r} ({exc}). Download it into the Hugging Face cache, "
                    "set OMNIQ_MODEL to a local checkpoint directory, or use OMNIQ_MODEL=tiny for the offline "
                    "test model."
                ) from exc
            if device.type != "cuda":
                model.to(device)
            model.eval()
            self._stop_ids = stop_token_ids(processor.tokenizer, model.generation_config.eos_token_id)
            self.processor, self.device = processor, device
            self.model = model
            logger.info(
                "loaded %s from %s on %s (%s) in %.1fs%s",
                self.model_id,
                source,
                device,
                dtype,
                time.perf_counter() - started,
                " — random weights, text is meaningless" if self.random_weights else "",
            )

    # -- encoding ------------------------------------------------------------------------------------------

    def encode(self, requests: Sequence[GenerationRequest]) -> EncodedBatch:
        """Turn one compatible batch into model inputs (raises ``ValueError`` for mixed fps or soundtrack use)."""
        self.load()
        started = time.perf_counter()
        keys = {key for r in requests if (key := batch_key(r, self.settings.fps)) is not None}
        if len(keys) > 1:
            raise ValueError(f"one batch cannot mix video fps / use_audio_in_video settings: {sorted(keys)}")
        fps, audio_in_video = next(iter(keys)) if keys else (self.settings.fps, False)

        texts: list[str] = []
        audio: list[np.ndarray] = []
        audio_from_video: list[int | None] = []  # per audio slot: None = standalone, i = soundtrack of video i
        videos: list[np.ndarray] = []
        for request in requests:
            if (kind := prompts.row_kind(request.kind)) is not None:
                failpoints.hit("infer.row", chunk=request.chunk, kind=kind)
            texts.append(chat_prompt(self.processor, request))
            if request.video is not None:
                videos.append(_as_video(request.video))
            if request.audio is not None:
                audio.append(_as_audio(request.audio))
                audio_from_video.append(len(videos) - 1 if _audio_in_video(request) else None)

        factor = self.processor.video_processor.patch_size * self.processor.video_processor.merge_size
        min_pixels = factor * factor
        kwargs: dict[str, Any] = {
            "text_kwargs": {"padding": True, "padding_side": "left"},
            # Whisper truncates to 30 s by default; a chunk may be longer and must be heard to the end.
            "audio_kwargs": {"sampling_rate": SAMPLE_RATE, "truncation": False, "padding": True},
            "videos_kwargs": {
                # The processor assumes 1 fps unless told; it sets the time positions of every frame pair.
                "fps": fps,
                # The processor's own default is up to 768*32*32 pixels per frame (thousands of tokens).
                "size": {"shortest_edge": min_pixels, "longest_edge": max(self.settings.frame_max_pixels, min_pixels)},
                "do_sample_frames": False,  # frames arrive already sampled at ``fps``
                "cap_pixels_per_frame": True,
            },
        }
        if audio_in_video:
            kwargs.update(load_audio_from_video=True, audio_from_video_indices=audio_from_video)
        with self._encode_lock:  # the fast tokenizer cannot be used by two threads at once
            inputs = self.processor(
                text=texts,
                images=None,
                audio=audio or None,
                videos=videos or None,
                return_tensors="pt",
                **kwargs,
            )
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        floating = {"input_features", "pixel_values_videos"}
        device = self.device
        pin = device is not None and device.type == "cuda"
        for key, value in list(inputs.items()):
            if hasattr(value, "to"):
                value = value.to(self.model.dtype) if key in floating else value
                # pinned host memory lets the copy run beside the model's work on the previous batch
                inputs[key] = value.pin_memory().to(device, non_blocking=True) if pin else value.to(device)
        return EncodedBatch(
            inputs=inputs,
            use_audio_in_video=audio_in_video,
            max_new_tokens=max(r.max_new_tokens for r in requests),
            input_ids=input_ids,
            attention_mask=attention_mask,
            seconds=time.perf_counter() - started,
        )

    # -- generation ----------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer every request, in order: one greedy ``generate`` call per compatible batch."""
        self.load()
        results: list[GenerationResult | None] = [None] * len(requests)
        for indices in plan_batches(requests, self.settings.batch_size, self.settings.fps):
            batch_results = self.generate_shrinking([requests[i] for i in indices])
            for index, result in zip(indices, batch_results, strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    def generate_shrinking(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run a batch; on CUDA OOM split it in halves and retry, down to single requests."""
        import torch

        try:
            return self.generate_batch(requests)
        except torch.cuda.OutOfMemoryError as exc:
            if len(requests) == 1:
                raise OutOfMemory(
                    f"CUDA out of memory for a single {requests[0].kind} request on {self.model_id}; "
                    "lower OMNIQ_CHUNK_SECONDS or OMNIQ_FRAME_MAX_PIXELS, or use a larger GPU"
                ) from exc
            logger.warning("CUDA out of memory for a batch of %d; retrying in halves", len(requests))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = (len(requests) + 1) // 2
        return self.generate_shrinking(requests[:half]) + self.generate_shrinking(requests[half:])

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One ``generate`` call for a compatible batch; each row is cut to its own ``max_new_tokens``."""
        return self.run_encoded(requests, self.encode(requests))

    def run_encoded(self, requests: Sequence[GenerationRequest], encoded: EncodedBatch) -> list[GenerationResult]:
        """The model part of :meth:`generate_batch`, for a batch :meth:`encode` prepared (maybe in another
        thread, while the previous batch generated). Results carry the ``generate`` time as ``seconds``."""
        import torch

        started = time.perf_counter()
        failpoints.hit("gpu.generate", rows=len(requests))
        with torch.inference_mode():
            output = self.model.generate(
                **encoded.inputs,
                use_audio_in_video=encoded.use_audio_in_video,  # the model needs it too, for M-RoPE positions
                max_new_tokens=encoded.max_new_tokens,
                do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        prompt_length = encoded.input_ids.shape[1]
        generated = output[:, prompt_length:].cpu()  # one device-to-host copy for the whole batch
        seconds = time.perf_counter() - started
        tokenizer = self.processor.tokenizer
        results = []
        for row, request in enumerate(requests):
            prompt_ids = encoded.input_ids[row][encoded.attention_mask[row].bool()]  # host copies: no device sync
            new_ids, stopped = trim_generated(generated[row].tolist(), request.max_new_tokens, self._stop_ids)
            results.append(
                GenerationResult(
                    text=tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
                    new_tokens=len(new_ids),
                    prompt_tokens=int(prompt_ids.numel()),
                    seconds=seconds,
                    prepare_seconds=encoded.seconds,
                    batch_size=len(requests),
                    meta={
                        "finish_reason": "stop" if stopped else "length",
                        "audio_tokens": int((prompt_ids == tokenizer.audio_token_id).sum()),
                        "video_tokens": int((prompt_ids == tokenizer.video_token_id).sum()),
                        "engine": "transformers",
                        "token_ids": new_ids,
                    },
                )
            )
        for observer in self.batch_observers:
            observer(len(requests), sum(r.new_tokens for r in results), seconds)
        logger.info(
            "generated %d rows (%s) in %.2fs (prepared in %.2fs): %d prompt + %d new tokens",
            len(requests),
            ",".join(r.kind for r in requests),
            seconds,
            encoded.seconds,
            sum(r.prompt_tokens for r in results),
            sum(r.new_tokens for r in results),
        )
        return results


HOP = 160  # the Whisper feature extractor's hop: one mel frame per 10 ms


def _as_audio(audio: np.ndarray) -> np.ndarray:
    """Mono float32 samples, cut to whole mel frames (at most 10 ms lost).

    Whisper's feature extractor counts a clip's frames as ``len // hop`` when the clip is alone and as
    ``ceil(len / hop)`` when it is padded beside a longer one: one more (padding) frame in the input, and an
    answer that depends on what the clip was batched with. Whole frames count the same either way. (The last
    frame's 25 ms window still sees the signal reflected when alone and the batch's zeros when padded: a
    float-level difference, like the others batching brings.)
    """
    array = np.asarray(audio, dtype=np.float32)
    if array.ndim != 1 or array.size < HOP:
        raise ValueError(
            f"audio must be mono float32 samples at {SAMPLE_RATE} Hz, at least {HOP} of them, got shape {array.shape}"
        )
    return array[: array.size - array.size % HOP]


def _as_video(video: np.ndarray) -> np.ndarray:
    array = np.asarray(video)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0 or array.dtype != np.uint8:
        raise ValueError(
            f"video must be uint8 frames shaped (frames, height, width, 3), got {array.dtype} {array.shape}"
        )
    return array


def _without_audio_items(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": [item for item in content if item.get("type") != "audio"]}
