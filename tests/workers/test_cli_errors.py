"""When Redis or the store cannot be reached, every command says so in one line, with its own exit status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.servers import find_free_port
from workers.cli import EXIT_NO_REDIS, EXIT_NO_STORAGE


def _omniq(*args, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env={**base, **env}, timeout=120
    )


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "some-job"),
        ("enqueue", "FILE"),
        ("cancel", "some-job"),
        ("retry", "--failed"),
        ("recover",),
    ],
)
def test_unreachable_redis_is_one_line_with_exit_status_3(args, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really media")
    port = find_free_port()
    args = [str(clip) if a == "FILE" else a for a in args]
    result = _omniq(
        *args, OMNIQ_BROKER_URL=f"redis://:s3cret-pw@127.0.0.1:{port}/0", OMNIQ_STORAGE_URL=str(tmp_path / "store")
    )
    assert result.returncode == EXIT_NO_REDIS == 3, result.stderr
    assert result.stderr.strip() == f"omniq: cannot reach Redis at redis://:***@127.0.0.1:{port}/0 (Connection refused)"
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_unreachable_storage_is_one_line_with_exit_status_4(redis_url, tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really media")
    result = _omniq(
        "enqueue",
        str(clip),
        OMNIQ_BROKER_URL=redis_url.rsplit("/", 1)[0] + "/7",
        OMNIQ_STORAGE_URL="s3://bucket/prefix",
        OMNIQ_S3_ENDPOINT_URL=f"http://127.0.0.1:{find_free_port()}",
        AWS_ACCESS_KEY_ID="key",
        AWS_SECRET_ACCESS_KEY="secret",
    )
    assert result.returncode == EXIT_NO_STORAGE == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omniq: cannot reach storage: s3://bucket/prefix/")
    assert "Traceback" not in result.stderr
