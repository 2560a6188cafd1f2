"""The vLLM engine against the transformers engine on the tiny model: the same requests (every row kind, audio
past 30 s, a soundtrack interleaved with its frames, another fps, text only) give identical prompt token ids and
identical greedy tokens. vLLM runs in its own environment (``make vllm``), so it runs in a subprocess there;
the transformers side runs here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.engines.omni import OmniEngine
from pipeline.engines.pipelined import AUDIO_TOKENS_PER_SECOND
from pipeline.engines.vllm_engine import check_architecture
from pipeline.errors import ConfigError
from tests.pipeline.engines import cases
from tests.pipeline.engines.conftest import tiny_settings

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_cases(vllm_bin: Path, cache_dir: Path, out: Path, **env: str) -> dict[str, Any]:
    """What the vLLM engine answered to :func:`cases.requests` (+ a row too long for its context), all in one
    call and each row from a thread of its own."""
    command = [str(vllm_bin / "python"), "-m", "tests.pipeline.engines.cases", "--cache-dir", str(cache_dir)]
    done = subprocess.run(
        [*command, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**_base_env(), **env},
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def vllm_report(vllm_bin: Path, tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cases(vllm_bin, tiny_cache_dir, tmp_path_factory.mktemp("vllm") / "report.json")


@pytest.fixture(scope="module")
def transformers_rows(tiny_cache_dir: Path) -> list[dict[str, Any]]:
    """The same requests through the transformers engine, batched as the workers batch them (4 rows)."""
    engine = OmniEngine(tiny_settings(tiny_cache_dir, batch_size=4))
    requests = cases.requests()
    results = engine.generate(requests)
    rows = []
    for request, result in zip(requests, results, strict=True):
        prompt_ids = engine.encode([request]).input_ids[0].tolist()
        rows.append(
            {"text": result.text, "prompt_tokens": result.prompt_tokens, "prompt_ids": prompt_ids, **result.meta}
        )
    return rows


def test_both_engines_send_the_same_prompt_tokens(
    vllm_report: dict[str, Any], transformers_rows: list[dict[str, Any]]
) -> None:
    vllm_rows = vllm_report["together"][: len(transformers_rows)]
    for request, mine, theirs in zip(cases.requests(), transformers_rows, vllm_rows, strict=True):
        assert "error" not in theirs, theirs
        assert theirs["prompt_ids"] == mine["prompt_ids"], request.kind
        assert (theirs["audio_tokens"], theirs["video_tokens"]) == (mine["audio_tokens"], mine["video_tokens"])
    # what each engine is known to get wrong by default, proven absent: 41 s of audio is heard to the end (not cut
    # at Whisper's 30 s), the soundtrack sits inside the video, and frames are not resized to the processor's default
    long_audio = vllm_rows[1]["audio_tokens"]
    assert long_audio >= 40 * AUDIO_TOKENS_PER_SECOND, long_audio
    interleaved = vllm_rows[2]
    assert interleaved["audio_tokens"] > 0 and interleaved["video_tokens"] == 4 * (96 // 32) * (128 // 32)


def test_both_engines_write_the_same_greedy_tokens(
    vllm_report: dict[str, Any], transformers_rows: list[dict[str, Any]]
) -> None:
    vllm_rows = vllm_report["together"][: len(transformers_rows)]
    for request, mine, theirs in zip(cases.requests(), transformers_rows, vllm_rows, strict=True):
        assert theirs["token_ids"] == mine["token_ids"], request.kind
        assert theirs["text"] == mine["text"] and theirs["finish_reason"] == mine["finish_reason"]
        assert len(theirs["token_ids"]) == request.max_new_tokens  # the checkpoint's suppressed ids stayed out
    assert len({tuple(row["token_ids"]) for row in vllm_rows}) > 3  # inputs tell rows apart: not one answer for all


def test_rows_from_many_callers_are_batched_and_answered_the_same(vllm_report: dict[str, Any]) -> None:
    assert vllm_report["apart"] == vllm_report["together"]
    assert vllm_report["most_running"] >= 4  # rows handed in by different threads ran in the same steps


def test_the_engine_core_in_a_process_of_its_own_answers_the_same(
    vllm_bin: Path, tiny_cache_dir: Path, tmp_path: Path, vllm_report: dict[str, Any]
) -> None:
    apart = run_cases(vllm_bin, tiny_cache_dir, tmp_path / "report.json", OMNIQ_VLLM_ENGINE_PROCESS="true")
    assert apart["together"] == vllm_report["together"] and apart["apart"] == vllm_report["apart"]


def test_a_row_too_long_for_the_context_fails_alone_with_the_reason(vllm_report: dict[str, Any]) -> None:
    *answered, refused = vllm_report["together"]
    assert all("error" not in row for row in answered)
    assert refused["error"].startswith("ValueError: vLLM refused the caption row:")
    assert f"maximum model length of {cases.MAX_MODEL_LEN}" in refused["error"]


def test_engine_vllm_where_vllm_is_not_installed_is_a_usage_error(tmp_path: Path, tiny_cache_dir: Path) -> None:
    env = {"OMNIQ_CACHE_DIR": str(tiny_cache_dir)}
    for command in (["run", str(tmp_path / "any.mp4")], ["worker", "--queue", "gpu"]):
        done = subprocess.run(
            [str(REPO_ROOT / ".venv" / "bin" / "omniq"), *command, "--model", "tiny", "--engine", "vllm"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**_base_env(), **env},
            check=False,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--engine vllm: vLLM is not installed in this environment" in lines[0]
        assert "make vllm" in lines[0]


def test_a_checkpoint_vllm_cannot_serve_is_named(tmp_path: Path, vllm_bin: Path) -> None:
    thinker_only = tmp_path / "thinker-only"
    thinker_only.mkdir()
    config = {"architectures": ["Qwen3OmniMoeThinkerForConditionalGeneration"], "model_type": "qwen3_omni_moe_thinker"}
    (thinker_only / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="cannot serve Qwen3OmniMoeThinkerForConditionalGeneration .* thinker-only"):
        check_architecture(str(thinker_only))
    done = subprocess.run(
        [str(vllm_bin / "omniq"), "run", str(tmp_path / "any.mp4"), "--model", str(thinker_only), "--engine", "vllm"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_base_env(),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot serve Qwen3OmniMoeThinkerForConditionalGeneration" in done.stderr.strip().splitlines()[-1]


def test_the_engine_setting_is_checked_and_vllm_gets_more_slots() -> None:
    from workers.runtime import gpu_slots

    assert Settings(engine=" VLLM ").engine == "vllm"
    assert gpu_slots(Settings(engine="vllm", batch_size=4)) == 32  # vLLM batches whatever it is handed
    assert gpu_slots(Settings(engine="transformers", batch_size=4)) == 16
    assert gpu_slots(Settings(engine="vllm", batch_size=4, gpu_slots=5)) == 5
    with pytest.raises(ValueError, match="engine 'onnx': use transformers"):
        Settings(engine="onnx")


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")} | {"OMNIQ_EMBEDDING_MODEL": "none"}
