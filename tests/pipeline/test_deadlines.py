"""Step deadlines (pipeline.deadlines): derived from the work, extended as it turns out bigger, acted on once when
passed; an ffmpeg past its deadline is killed (a real ffmpeg reading a stalled input)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline import deadlines, failpoints
from pipeline.config import Settings
from pipeline.job import run_job
from pipeline.media.extract import ffmpeg_binary, run_ffmpeg
from pipeline.media.sample import make_sample
from pipeline.storage import LocalStorage


def test_deadlines_follow_the_work():
    settings = Settings(deadline_min_seconds=60, deadline_factor=0.5, deadline_token_seconds=0.25)
    assert deadlines.ingest_seconds(settings, 3600) == 1800
    assert deadlines.download_seconds(settings.model_copy(update={"deadline_bytes_per_second": 1e6}), 5_000_000) == 5
    assert deadlines.model_seconds(settings, 30.0, 128) == 60 + 15 + 32


@pytest.mark.parametrize("name", ["DEADLINE_MIN_SECONDS", "DEADLINE_FACTOR", "DEADLINE_TOKEN_SECONDS"])
@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_a_deadline_setting_that_is_not_a_positive_number_stops_the_worker_in_one_line(name, value, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker", "--queue", "media"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", f"OMNIQ_{name}": value},
        cwd=tmp_path,
        timeout=120,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"omniq: invalid setting: OMNIQ_{name}:"), completed.stderr


def test_the_monitor_hands_each_passed_deadline_over_once_and_allow_extends_it():
    monitor = deadlines.Monitor()
    seen = []
    monitor.callback = seen.append
    early = deadlines.Deadline("early", deadlines.STEP, (("job", "ingest"),), 1.0, ends=100.0)
    late = deadlines.Deadline("late", deadlines.MODEL, (), 1.0, ends=200.0)
    monitor._watched = {early.id: early, late.id: late}  # as watch() adds them, without the thread
    assert monitor.check(now=150.0) == [early] and seen == [early] and early.expired
    assert monitor.check(now=160.0) == [] and seen == [early]  # once
    late.extend(100.0)
    assert monitor.check(now=250.0) == [] and late.seconds == 101.0
    assert monitor.check(now=300.0) == [late]


def test_watch_stacks_per_thread_and_timeout_for_takes_the_sooner():
    assert deadlines.current() is None and deadlines.timeout_for(60.0) == 60.0
    with deadlines.watch("outer", 30.0) as outer:
        assert deadlines.current() is outer and deadlines.timeout_for(3600.0) <= 30.0
        deadlines.allow(100.0)
        assert 129.0 < deadlines.timeout_for(3600.0) <= 130.0
        assert deadlines.timeout_for(5.0) == 5.0 and not deadlines.passed()
        with deadlines.watch("inner", 0.0) as inner:
            assert deadlines.current() is inner and deadlines.passed()
        assert deadlines.current() is outer
    assert deadlines.current() is None


def test_an_ffmpeg_reading_a_stalled_input_is_killed_at_the_deadline(tmp_path):
    stalled = tmp_path / "stalled.fifo"
    os.mkfifo(stalled)  # nobody writes: ffmpeg blocks opening it, as on a network read that never answers
    command = [ffmpeg_binary(), "-nostdin", "-i", str(stalled), "-f", "null", "-"]
    started = time.monotonic()
    with deadlines.watch("ingest", 1.5), pytest.raises(deadlines.DeadlineExceeded, match="deadline"):
        run_ffmpeg(command, timeout=60, name="stalled.mp4")
    assert time.monotonic() - started < 10
    with pytest.raises(Exception, match="did not finish within 1 s"):  # no deadline: its own timeout
        run_ffmpeg(command, timeout=1, name="stalled.mp4")


def test_a_run_whose_ffmpeg_hangs_fails_at_the_deadline_with_the_reason(settings, tmp_path):
    """``media.ffmpeg=hang``: the decode reads a stalled input; ingest's deadline (the floor plus the media's
    duration) stops it, and the file fails with the reason instead of hanging ``omniq run``."""
    clip = make_sample(tmp_path / "clip.mp4", 4.0, size="160x120")
    fast = settings.model_copy(update={"deadline_min_seconds": 2.0, "deadline_factor": 0.25})
    failpoints.install("media.ffmpeg=hang")
    started = time.monotonic()
    try:
        outcome = run_job(str(clip), fast, LocalStorage(tmp_path / "store"), engine=None)  # type: ignore[arg-type]
    finally:
        failpoints.install("")
    assert outcome.status == "failed" and "deadline" in outcome.error and "ffmpeg" in outcome.error
    assert 2.9 < time.monotonic() - started < 20  # 2 s + 0.25 x 4 s, then a prompt stop
