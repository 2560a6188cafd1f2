from __future__ import annotations

import numpy as np
import pytest

from pipeline import prompts
from pipeline.config import Settings
from pipeline.errors import ConfigError, SourceNotFound
from pipeline.storage import LocalStorage, open_storage


def test_local_storage_atomic_idempotent_and_scoped(tmp_path):
    storage = LocalStorage(tmp_path)
    assert storage.put_bytes("a/b/c.json", b"{}") is True
    assert storage.put_bytes("a/b/c.json", b"{}") is False  # identical: not rewritten
    assert storage.put_bytes("a/b/c.json", b"[]") is True
    assert storage.get_bytes("a/b/c.json") == b"[]"
    assert list(storage.list_keys("a")) == ["a/b/c.json"]
    assert not list((tmp_path / "a" / "b").glob(".*"))  # no temp files left behind
    assert storage.delete_prefix("a") == 1 and not storage.exists("a/b/c.json")
    with pytest.raises(SourceNotFound):
        storage.get_bytes("a/b/c.json")
    for bad in ("../x", "/etc/passwd", "a//b", ""):
        with pytest.raises(ValueError):
            storage.put_bytes(bad, b"x")


def test_result_files_are_as_readable_as_the_umask_says(tmp_path):
    """Not mkstemp's 0600: a shared results folder or a web server must read them (umask 022 here)."""
    import os
    import stat
    import subprocess
    import sys

    script = (
        "import os, sys; os.umask(0o022); from pathlib import Path; from pipeline.storage import LocalStorage; "
        "LocalStorage(Path(sys.argv[1])).put_bytes('results/m/transcript.json', b'{}')"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60, cwd=os.getcwd())
    assert stat.S_IMODE((tmp_path / "results" / "m" / "transcript.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "results" / "m").stat().st_mode) == 0o755


def test_open_storage_urls(tmp_path):
    settings = Settings()
    assert open_storage(f"file://{tmp_path}", settings).root == tmp_path
    assert open_storage(str(tmp_path), settings).root == tmp_path
    with pytest.raises(ConfigError, match="unsupported scheme"):
        open_storage("ftp://x/y", settings)
    with pytest.raises(ConfigError, match="no bucket"):
        open_storage("s3:///prefix", settings)


def test_prompts_put_media_before_the_instruction():
    audio = np.zeros(16000, dtype=np.float32)
    request = prompts.transcript_request(audio, "English", 64)
    content = request.messages[0]["content"]
    assert [c["type"] for c in content] == ["audio", "text"]
    assert content[1]["text"] == "Transcribe the English audio into text."
    assert request.messages[0]["role"] == "user" and len(request.messages) == 1  # no system prompt
    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    caption = prompts.caption_request(frames, 2.0, audio, 32)
    assert caption.use_audio_in_video and caption.fps == 2.0
    assert prompts.caption_request(frames, 2.0, None, 32).use_audio_in_video is False


def test_parse_caption():
    assert prompts.parse_caption("Visual: a red car.\nAudio: an engine.", True, True) == ("a red car.", "an engine.")
    assert prompts.parse_caption("just words", True, True) == ("just words", "")
    assert prompts.parse_caption("a tone", False, True) == ("", "a tone")
    assert prompts.parse_caption("a car", True, False) == ("a car", "")
