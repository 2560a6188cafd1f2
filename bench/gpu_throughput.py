"""Throughput of the full-size Qwen3-Omni-30B-A3B thinker with random weights, on one GPU.

No machine here can download the released weights, so the model is built from the released model's config
(set explicitly below: transformers' default ``Qwen3OmniMoeConfig()`` is a different, smaller model) with random
bf16 weights directly on the GPU. Inputs are real processor outputs for 30 s chunks: frames at 2 fps under the
pixel cap with their soundtrack (caption rows), 30 s of audio (transcript rows), and chunk-summary prompts of
realistic length. Output lengths are fixed (EOS ignored): transcript 120, caption 100, summary 80 tokens.

For each batch size it prints prefill and decode tokens/s, seconds per chunk, peak memory and media-hours per
GPU-hour for transcript + caption + summary, and writes them as JSON (``--out``). ``--scale small`` builds a
tiny config of the same shape family, so the script itself can be checked on a CPU.

``--engine vllm`` (run it with a python that has vLLM: ``.venv-vllm/bin/python`` here, the vLLM image on a GPU)
measures the same rows on the vLLM engine: a checkpoint folder holds the same config in the released layout and
the processor, vLLM's ``dummy`` loader fills in random weights, and each batch's rows (``batch`` chunks x the
three kinds, same output lengths) go to the engine at once, as a GPU worker hands them over. It prints output
tokens/s and media-hours per GPU-hour per batch; ``--compare transformers.json`` adds the ratio of output
tokens/s to the transformers run on the same batch.

Usage: python bench/gpu_throughput.py [--batches 1,4,8,16] [--out results.json] [--scale full|small]
                                      [--engine transformers|vllm] [--compare transformers.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from pipeline import prompts
from pipeline.config import Settings
from pipeline.engines.base import SAMPLE_RATE, GenerationRequest
from pipeline.engines.omni import OmniEngine, fast_paths
from pipeline.engines.tiny import build_processor, thinker_token_settings

OUTPUT_TOKENS = {prompts.TRANSCRIPT: 120, prompts.CAPTION: 100, prompts.CHUNK_SUMMARY: 80}

# Qwen3-Omni-30B-A3B's thinker as released (about 31 B parameters, 3 B active per token)
RELEASED = {
    "text": {
        "vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1, "norm_topk_prob": True,
        "max_position_embeddings": 65_536, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [24, 20, 20],
                            "interleaved": True, "mrope_interleaved": True},
    },
    "audio": {
        "num_mel_bins": 128, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
        "d_model": 1280, "output_dim": 2048, "downsample_hidden_size": 480, "n_window": 50, "n_window_infer": 800,
        "max_source_positions": 1500, "conv_chunksize": 500,
    },
    "vision": {
        "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
        "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": 2048, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24], "image_size": 768, "apply_vit_abs_pos_embed": True,
    },
}  # fmt: skip
SMALL = {  # the same families, small enough for a CPU: checks the script, says nothing about speed
    "text": {**RELEASED["text"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "intermediate_size": 32,
             "rope_parameters": {**RELEASED["text"]["rope_parameters"], "mrope_section": [8, 4, 4]}},
    "audio": {**RELEASED["audio"], "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
              "d_model": 32, "output_dim": 64, "downsample_hidden_size": 8},
    "vision": {**RELEASED["vision"], "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
               "out_hidden_size": 64, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1],
               "image_size": 128},
}  # fmt: skip


def thinker_config(scale: str, tokenizer: Any) -> Any:
    from transformers import Qwen3OmniMoeThinkerConfig

    shapes = RELEASED if scale == "full" else SMALL
    token = tokenizer.convert_tokens_to_ids
    return Qwen3OmniMoeThinkerConfig(
        text_config={**shapes["text"], "pad_token_id": token("<|endoftext|>"), "eos_token_id": token("<|im_end|>")},
        audio_config=shapes["audio"],
        vision_config=shapes["vision"],
        **thinker_token_settings(tokenizer),
    )


def chunk_requests(settings: Settings, seconds: float, seed: int) -> dict[str, GenerationRequest]:
    """One 30 s chunk's three rows, from synthetic media of the real shapes (640x360 frames under the cap)."""
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    scale = min(1.0, (settings.frame_max_pixels / (640 * 360)) ** 0.5)
    height, width = int(360 * scale) // 2 * 2, int(640 * scale) // 2 * 2
    frames = rng.integers(0, 255, (int(seconds * settings.fps), height, width, 3), dtype=np.uint8)
    words = " ".join(["the speaker explains the next step of the plan"] * 12)  # ~100 tokens of earlier output
    return {
        prompts.TRANSCRIPT: prompts.transcript_request(audio, None, OUTPUT_TOKENS[prompts.TRANSCRIPT]),
        prompts.CAPTION: prompts.caption_request(frames, settings.fps, audio, OUTPUT_TOKENS[prompts.CAPTION]),
        prompts.CHUNK_SUMMARY: prompts.chunk_summary_request(
            0.0, seconds, words, words, words, OUTPUT_TOKENS[prompts.CHUNK_SUMMARY]
        ),
    }


def timed_generate(engine: OmniEngine, rows: list[GenerationRequest], new_tokens: int) -> dict[str, float]:
    """Prefill (a 1-token generate) and the whole fixed-length generate for one batch."""
    encoded = engine.encode(rows)
    prompt = int(encoded.attention_mask.sum())

    def run(tokens: int) -> float:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            engine.model.generate(
                **encoded.inputs, use_audio_in_video=encoded.use_audio_in_video, max_new_tokens=tokens,
                min_new_tokens=tokens, do_sample=False, pad_token_id=engine.processor.tokenizer.pad_token_id,
            )  # fmt: skip
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    prefill = run(1)
    total = run(new_tokens)
    decode = max(total - prefill, 1e-9)
    return {
        "prompt_tokens": prompt,
        "prefill_s": prefill,
        "decode_s": decode,
        "total_s": total,
        "prefill_tok_s": prompt / prefill,
        "decode_tok_s": len(rows) * (new_tokens - 1) / decode,
        "prepare_s": encoded.seconds,
    }


def vllm_checkpoint(scale: str, processor: Any, folder: Path) -> Path:
    """A checkpoint without weights for vLLM's ``dummy`` loader: the thinker config in the released layout (a
    ``qwen3_omni_moe`` config with a ``thinker_config``, no talker) and the processor."""
    from transformers import GenerationConfig, Qwen3OmniMoeConfig

    tokenizer = processor.tokenizer
    thinker = thinker_config(scale, tokenizer)
    config = Qwen3OmniMoeConfig(thinker_config=thinker.to_dict(), enable_audio_output=False)
    config.architectures = ["Qwen3OmniMoeForConditionalGeneration"]
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(eos_token_id=[end], pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    return folder


def vllm_main(args: argparse.Namespace) -> None:
    """The same rows on the vLLM engine: each batch's rows handed over at once, fixed output lengths."""
    import tempfile

    from pipeline.engines.vllm_engine import VllmEngine

    processor = build_processor()
    folder = vllm_checkpoint(args.scale, processor, Path(tempfile.mkdtemp(prefix="omniq-vllm-bench-")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(model=str(folder), device=device, vllm_max_model_len=16_384)
    engine = VllmEngine(settings, load_format="dummy", fixed_length=True)
    started = time.perf_counter()
    engine.load()
    print(f"{args.scale} thinker on vLLM ({device}), dummy weights, loaded in {time.perf_counter() - started:.0f} s")
    chunk = chunk_requests(settings, args.seconds, seed=0)
    engine.generate_each([chunk[prompts.CHUNK_SUMMARY], chunk[prompts.CAPTION]])  # warm-up
    report: dict[str, Any] = {"engine": "vllm", "scale": args.scale, "device": device, "batches": []}
    compare = {b["batch"]: b for b in json.loads(args.compare.read_text())["batches"]} if args.compare else {}
    for batch in (int(b) for b in args.batches.split(",")):
        rows = [chunk_requests(settings, args.seconds, seed=i)[kind] for i in range(batch) for kind in OUTPUT_TOKENS]
        started = time.perf_counter()
        outcomes = engine.generate_each(rows)
        wall = time.perf_counter() - started
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]
        tokens = sum(o.new_tokens for o in outcomes)  # type: ignore[union-attr]
        entry = {
            "batch": batch,
            "rows": len(rows),
            "seconds": wall,
            "prompt_tokens": sum(o.prompt_tokens for o in outcomes),  # type: ignore[union-attr]
            "output_tok_s": tokens / wall,
            "seconds_per_chunk": wall / batch,
            "media_hours_per_gpu_hour": batch * args.seconds / wall,
            "most_running": engine.most_running,
        }
        if batch in compare:
            entry["vs_transformers_output_tok_s"] = entry["output_tok_s"] / compare[batch]["output_tok_s"]
        report["batches"].append(entry)
        ratio = f", {entry['vs_transformers_output_tok_s']:.1f}x transformers' output tok/s" if batch in compare else ""
        print(
            f"batch {batch}: {len(rows)} rows in {wall:.2f} s, {entry['output_tok_s']:.0f} output tok/s, "
            f"{entry['media_hours_per_gpu_hour']:.1f} media-hours per GPU-hour{ratio}",
            flush=True,
        )
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--scale", choices=("full", "small"), default="full")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--compare", type=Path, help="the transformers run's --out, for the vLLM run's ratios")
    args = parser.parse_args()
    if args.engine == "vllm":
        vllm_main(args)
        return
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = Settings(model="tiny", device=device.type)
    processor = build_processor()
    config = thinker_config(args.scale, processor.tokenizer)
    started = time.perf_counter()
    with torch.device(device):
        model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config, dtype=dtype, **fast_paths(settings))
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    engine = OmniEngine(settings)  # its encode(): the same processor calls the workers make
    engine.model, engine.processor, engine.device = model, processor, device
    print(
        f"{args.scale} thinker: {parameters / 1e9:.2f} B parameters, built in {time.perf_counter() - started:.0f} s on "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} ({dtype}); torch {torch.__version__}; "
        f"attention {model.config._attn_implementation}, experts {model.get_experts_implementation()}",
        flush=True,
    )
    chunk = chunk_requests(settings, args.seconds, seed=0)
    timed_generate(engine, [chunk[prompts.CHUNK_SUMMARY]], 4)  # warm-up (kernels, allocator)
    report: dict[str, Any] = {"scale": args.scale, "parameters": parameters, "device": str(device), "batches": []}
    print(f"{'batch':>5} {'kind':>10} {'prompt':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'s':>7}", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        kinds = {}
        for kind, new_tokens in OUTPUT_TOKENS.items():
            rows = [chunk_requests(settings, args.seconds, seed=i)[kind] for i in range(batch)]
            kinds[kind] = timed_generate(engine, rows, new_tokens)
            row = kinds[kind]
            print(
                f"{batch:5d} {kind:>10} {row['prompt_tokens']:8d} {row['prefill_tok_s']:14.0f} "
                f"{row['decode_tok_s']:13.0f} {row['total_s']:7.2f}",
                flush=True,
            )
        seconds = sum(k["total_s"] for k in kinds.values())
        entry = {
            "batch": batch,
            "kinds": kinds,
            "output_tok_s": batch * sum(OUTPUT_TOKENS.values()) / seconds,
            "seconds_per_chunk": seconds / batch,
            "media_hours_per_gpu_hour": batch * args.seconds / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        report["batches"].append(entry)
        memory = f", peak {entry['peak_memory_gib']:.1f} GiB" if entry["peak_memory_gib"] else ""
        print(
            f"batch {batch}: {entry['seconds_per_chunk']:.2f} s per {args.seconds:.0f} s chunk, "
            f"{entry['media_hours_per_gpu_hour']:.1f} media-hours per GPU-hour{memory}",
            flush=True,
        )
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
