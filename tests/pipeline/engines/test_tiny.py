"""The tiny offline model: real Qwen3-Omni architecture, checkpoint layout and processor, random weights, built once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, Qwen3OmniMoeProcessor, Qwen3OmniMoeThinkerForConditionalGeneration

from pipeline.engines import tiny
from pipeline.engines.tiny import MULTIMODAL_TOKENS, SPECIAL_TOKENS, build_tiny_model, ensure_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_reloads_through_the_normal_transformers_path(tiny_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tiny_model_dir)

    assert isinstance(processor, Qwen3OmniMoeProcessor)
    # the released checkpoints' layout, which vLLM needs: the full model's config, the thinker inside, no talker
    assert config.model_type == "qwen3_omni_moe" and config.architectures == ["Qwen3OmniMoeForConditionalGeneration"]
    assert config.thinker_config.model_type == "qwen3_omni_moe_thinker" and not config.enable_audio_output
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert weights and all(name.startswith("thinker.") for name in weights)
    # transformers reads the thinker's weights out of it
    assert torch.equal(model.lm_head.weight, weights["thinker.lm_head.weight"])
    assert torch.equal(model.model.get_input_embeddings().weight, weights["thinker.model.embed_tokens.weight"])
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(processor.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert processor.feature_extractor.feature_size == 128
    assert processor.feature_extractor.sampling_rate == 16_000
    for part in (processor.image_processor, processor.video_processor):
        assert (part.patch_size, part.merge_size, part.temporal_patch_size) == (16, 2, 2)
    assert model.model.visual is not None and model.model.audio_tower is not None


def test_tokenizer_has_qwen_special_tokens_in_order(tiny_model_dir: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    for name, token in MULTIMODAL_TOKENS.items():
        assert getattr(tokenizer, name) == token
    # each special token is one token, never split into bytes
    assert tokenizer("<|im_start|>user<|audio_pad|>")["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(tokenizer("Describe the video.")["input_ids"]) == "Describe the video."


def test_config_facts_match_the_real_architecture(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir).thinker_config
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    text_config = config.text_config
    assert sum(text_config.rope_parameters["mrope_section"]) == text_config.head_dim // 2
    assert text_config.head_dim >= 32 and not text_config.tie_word_embeddings  # what vLLM's CPU build needs
    vision = config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == vision.num_position_embeddings
    assert config.audio_config.output_dim == text_config.hidden_size
    assert config.vision_config.out_hidden_size == text_config.hidden_size
    assert text_config.vocab_size % 64 == 0 and text_config.vocab_size >= len(tokenizer)
    assert config.audio_token_id == tokenizer.audio_token_id
    assert config.video_token_id == tokenizer.video_token_id
    assert config.image_token_id == tokenizer.image_token_id
    assert config.audio_start_token_id == tokenizer.convert_tokens_to_ids("<|audio_start|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")


def test_model_is_tiny(tiny_model_dir: Path) -> None:
    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tiny_model_dir)
    params = sum(p.numel() for p in model.parameters())
    on_disk = sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    assert 100_000 < params < 1_000_000
    assert on_disk < 5 * 1024 * 1024


def test_same_seed_gives_identical_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = load_file(build_tiny_model(tmp_path / "seed0", seed=0) / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert again.keys() == original.keys()
    assert all(torch.equal(again[name], original[name]) for name in original)

    other = load_file(build_tiny_model(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(other["thinker.lm_head.weight"], original["thinker.lm_head.weight"])


def test_build_is_atomic_and_leaves_no_staging_dirs(tiny_cache_dir: Path) -> None:
    leftovers = [p.name for p in tiny_cache_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert (tiny_cache_dir / tiny.TINY_MODEL_NAME / "config.json").is_file()


def test_ensure_builds_only_once(tiny_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(path: Path, seed: int = 0) -> Path:
        raise AssertionError(f"rebuilt {path}")

    monkeypatch.setattr(tiny, "build_tiny_model", no_rebuild)
    assert ensure_tiny_model(tiny_cache_dir) == tiny_cache_dir / tiny.TINY_MODEL_NAME


def test_parallel_processes_build_one_valid_model(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        from pipeline.engines.tiny import ensure_tiny_model
        print("RESULT", ensure_tiny_model(Path(sys.argv[1])))
        """
    )
    cache_dir = tmp_path / "shared-cache"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(cache_dir)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs

    expected = cache_dir / tiny.TINY_MODEL_NAME
    assert all(f"RESULT {expected}" in output for output in outputs)
    assert sum(output.count("building the tiny offline model") for output in outputs) == 1
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([tiny.TINY_MODEL_NAME, f"{tiny.TINY_MODEL_NAME}.lock"])
    assert json.loads((expected / "config.json").read_text())["model_type"] == "qwen3_omni_moe"
    Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(expected)
