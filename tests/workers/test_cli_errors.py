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


def test_the_command_line_says_what_it_needs():
    """-v after the command, --version, defaults and the OMNIQ_* variables in the help texts."""
    from pipeline import __version__
    from workers.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "x.mp4", "-v"]).verbose is True
    assert parser.parse_args(["-v", "run", "x.mp4"]).verbose is True
    assert parser.parse_args(["run", "x.mp4"]).verbose is False
    assert parser.parse_args(["index", "rebuild", "-v"]).verbose is True
    assert parser.parse_args(["worker", "--queue", "gpu", "--model", "tiny"]).model == "tiny"
    assert _omniq("--version").stdout.strip() == f"omniq {__version__}"
    names = ("run", "enqueue", "worker", "status", "flower")
    helps = {name: " ".join(_omniq(*name.split(), "--help").stdout.split()) for name in names}  # unwrapped
    assert "default ./omniq-data" in helps["run"] and "default 4, OMNIQ_BATCH_SIZE" in helps["run"]
    assert "OMNIQ_BROKER_URL" in helps["enqueue"] and "OMNIQ_STORAGE_URL" in helps["worker"]
    assert "OMNIQ_BROKER_URL" in helps["status"] and "how many of the newest jobs" in helps["status"]
    assert "default 5555" in helps["flower"] and "print a JSON list" in helps["enqueue"]
    assert "--model" in helps["worker"]
    from workers.threads import HandBackThreadPool

    # Celery's banner names the pool by its module: "concurrency: 16 (threads)", not "(pool)" or "(solo)"
    assert HandBackThreadPool.__module__.rsplit(".", 1)[-1] == "threads"
