"""A tiny, randomly initialised Qwen3-Omni for tests, demos and CI on machines without the model hub.

The checkpoint has the *real* architecture and layout of the released ones: a ``qwen3_omni_moe`` config with a
``thinker_config`` (``Qwen3OmniMoeForConditionalGeneration`` without its talker, ``enable_audio_output`` false,
weights under ``thinker.``) and a full ``Qwen3OmniMoeProcessor`` (byte-level BPE tokenizer with the Qwen special
tokens, Whisper features, Qwen2-VL image/video processors, a ChatML template), saved with ``save_pretrained``
so that it loads through the normal ``from_pretrained`` / ``AutoProcessor`` code path of both engines:
transformers reads the thinker out of it, and vLLM, which has no key for a thinker-only config, serves it. Its
weights are random: every word it writes is noise, and whatever shows its output must say so
(:data:`TINY_MODEL_NOTICE`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported lazily: importing this module stays cheap
    from transformers import (
        PreTrainedModel,
        Qwen2Tokenizer,
        Qwen3OmniMoeConfig,
        Qwen3OmniMoeProcessor,
    )

TINY_MODEL_NAME = "tiny-qwen3-omni-v2"  # bump the suffix whenever the recipe below changes
TINY_MODEL_RANDOM_WEIGHTS = True
TINY_MODEL_NOTICE = "Written by the tiny offline test model, whose weights are random: this text is meaningless."

logger = logging.getLogger(__name__)

# Qwen3-Omni's special tokens in their real vocabulary order (ids 151643... in the real tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)

# The names the Qwen3-Omni processor reads from its tokenizer (``tokenizer.image_token`` and so on).
MULTIMODAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

# ChatML, with the same media placeholders as the real Qwen3-Omni template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Enough English for a few hundred BPE merges; the tokenizer only has to be real, not good.
CORPUS = (
    "Transcribe the English audio into text. Describe the video in detail. Summarize the following "
    "transcript and captions in a few sentences. The speaker talks about the weather, the news, music, "
    "sports, science and the history of the city. A person walks into the room, sits down at the table "
    "and opens a laptop. The camera pans across a green field with trees and a blue sky. Two people are "
    "having a conversation in a kitchen while cooking dinner. The audio contains speech, music, laughter "
    "and background noise. Thank you for watching, please subscribe and see you next time. "
    "In the first part of the video the presenter explains how the system works; in the second part "
    "she shows a demonstration on the screen. Numbers like 1, 2, 3, 10, 42 and 2025 appear in the text. "
    "What is happening in this scene? Where are they? Who is speaking, and what are they saying? "
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
    "It was a bright cold day in April, and the clocks were striking thirteen. "
)
BPE_VOCAB_SIZE = 448  # 256 byte symbols + merges; the special tokens follow, then padding to a multiple of 64
VOCAB_MULTIPLE = 64

PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
POSITION_ID_PER_SECONDS = 13  # must equal the processor's value: it aligns audio and video positions


def _build_tokenizer() -> Qwen2Tokenizer:
    """Train a byte-level BPE on :data:`CORPUS` and wrap it as the Qwen2 tokenizer the processor expects."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([CORPUS] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    # The special tokens follow the BPE vocabulary in their real order, like Qwen's own (151643, 151644, ...).
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",  # noqa: S106 (a token, not a password)
        pad_token="<|endoftext|>",  # noqa: S106
        extra_special_tokens=dict(MULTIMODAL_TOKENS),
        model_max_length=131072,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_processor(tokenizer: Qwen2Tokenizer) -> Qwen3OmniMoeProcessor:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3OmniMoeProcessor,
        WhisperFeatureExtractor,
    )

    pixels = {"shortest_edge": 4 * 32 * 32, "longest_edge": 448 * 448}
    vision = {"patch_size": PATCH_SIZE, "merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE}
    return Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(pixels), **vision),
        video_processor=Qwen2VLVideoProcessor(size=dict(pixels), **vision),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=128,
            sampling_rate=16_000,
            hop_length=160,
            chunk_length=30,
            n_fft=400,
            return_attention_mask=True,
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_processor() -> Qwen3OmniMoeProcessor:
    """The processor of the tiny model (a real Qwen3-Omni processor with a small tokenizer), built in memory:
    its audio and video features have the released model's shapes (``bench/gpu_throughput.py`` uses it)."""
    return _build_processor(_build_tokenizer())


def _build_config(tokenizer: Qwen2Tokenizer) -> Qwen3OmniMoeConfig:
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig

    # head_dim 32: vLLM's CPU attention refuses 16
    hidden, heads, head_dim = 64, 4, 32
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "moe_intermediate_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        # Interleaved M-RoPE like the real model; the three sections must sum to head_dim / 2.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [8, 4, 4],
            "interleaved": True,
            "mrope_interleaved": True,
        },
        "pad_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "tie_word_embeddings": False,  # as the released model; vLLM's loader expects an lm_head of its own
    }
    audio_config = {
        "num_mel_bins": 128,
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "d_model": 32,
        "output_dim": hidden,  # audio embeddings land in the text embedding space
        "downsample_hidden_size": 8,
        "n_window": 50,
        "n_window_infer": 800,
        "max_source_positions": 1500,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "out_hidden_size": hidden,  # vision embeddings land in the text embedding space
        "num_position_embeddings": 64,
        # the learnt position grid is sqrt(num_position_embeddings) patches a side; vLLM sizes it from image_size
        "image_size": 8 * PATCH_SIZE,
        "apply_vit_abs_pos_embed": True,
        "deepstack_visual_indexes": [0, 1],
    }
    thinker = Qwen3OmniMoeThinkerConfig(
        text_config=text_config,
        audio_config=audio_config,
        vision_config=vision_config,
        **thinker_token_settings(tokenizer),
    )
    return Qwen3OmniMoeConfig(thinker_config=thinker.to_dict(), enable_audio_output=False)


def thinker_token_settings(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    """The thinker config's special-token ids (this tokenizer's) and audio/video position rate, which must
    match the processor's; shared by any thinker built around this processor (``bench/gpu_throughput.py``)."""
    token_id = tokenizer.convert_tokens_to_ids
    return {
        "position_id_per_seconds": POSITION_ID_PER_SECONDS,
        "audio_token_id": token_id("<|audio_pad|>"),
        "image_token_id": token_id("<|image_pad|>"),
        "video_token_id": token_id("<|video_pad|>"),
        "audio_start_token_id": token_id("<|audio_start|>"),
        "audio_end_token_id": token_id("<|audio_end|>"),
        "vision_start_token_id": token_id("<|vision_start|>"),
        "vision_end_token_id": token_id("<|vision_end|>"),
        "user_token_id": token_id("user") if "user" in tokenizer.get_vocab() else 0,
    }


def _init_weights(model: PreTrainedModel, seed: int) -> None:
    """Give every matrix a unit-gain fan-in scale (std = 1/sqrt(fan_in)).

    transformers' default (std 0.02) leaves a model this small almost blind to its audio and frames, so
    different inputs would all produce the same tokens and tests could not tell inputs apart.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() < 2:
                continue  # norms and biases keep their defaults
            # MoE expert banks are (experts, out, in); linear and conv weights are (out, in, *kernel)
            fan_in = parameter.shape[-1] if parameter.dim() == 3 else parameter[0].numel()
            values = torch.randn(parameter.shape, generator=generator) / fan_in**0.5
            parameter.copy_(values.to(parameter.dtype))


def _unprintable_token_ids(tokenizer: Qwen2Tokenizer, vocab_size: int) -> list[int]:
    """Ids the tiny model must never write: special tokens, padded ids, and bytes that are not printable ASCII.

    Random weights would otherwise stop at random (on ``<|im_end|>``) and emit control characters and broken
    UTF-8; without them the model writes exactly ``max_new_tokens`` tokens of harmless, printable gibberish.
    """
    specials = set(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    suppressed = []
    for token_id in range(vocab_size):
        text = tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
        if token_id in specials or not text or not (text.isascii() and text.isprintable()):
            suppressed.append(token_id)
    return suppressed


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build the tiny random Qwen3-Omni (thinker, no talker) and its processor at ``path``; return ``path``.

    The same ``seed`` gives identical weights. The checkpoint is written into a temporary directory next to
    ``path`` and renamed into place, so a reader never sees half a model; if another process finished first,
    its copy is kept and this one is discarded.
    """
    import torch
    from transformers import GenerationConfig, Qwen3OmniMoeForConditionalGeneration

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    processor = _build_processor(tokenizer)
    config = _build_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        suppress_tokens=_unprintable_token_ids(tokenizer, config.thinker_config.text_config.vocab_size),
    )

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users' workers
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        try:
            staging.rename(path)
        except OSError:
            if not (path / "config.json").exists():
                raise
            logger.info("tiny model at %s was built concurrently; keeping that copy", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Return the tiny model's directory under ``cache_dir``, building it once if it is missing.

    A file lock makes concurrent callers (several worker processes) wait for one build instead of racing.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / TINY_MODEL_NAME
    if (path / "config.json").exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{TINY_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (path / "config.json").exists():
                logger.info("building the tiny offline model at %s (random weights)", path)
                build_tiny_model(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
