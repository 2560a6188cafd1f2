"""Failpoints (OMNIQ_FAILPOINTS): the grammar, what each action does, and that only the process's own environment
can arm them."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from pydantic import ValidationError

from pipeline import failpoints
from pipeline.config import Settings
from pipeline.errors import MalformedMessage
from pipeline.spec import JobSpec


@pytest.fixture
def armed():
    """Arm failpoints for one test; disarmed afterwards whatever happens."""
    yield failpoints.install
    failpoints.install("")


def test_the_grammar_names_places_actions_and_filters():
    points = failpoints.parse(" infer.row=raise:chunk=03:kind=caption ; gpu.generate=hang;media.ffmpeg=hang; ")
    assert sorted(points) == ["gpu.generate", "infer.row", "media.ffmpeg"]
    assert points["infer.row"].match == {"chunk": "3", "kind": "caption"}
    assert points["infer.row"].describe() == "infer.row=raise:chunk=3:kind=caption"
    assert failpoints.parse("") == {} and failpoints.parse(" ; ") == {}


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("infer.rows=raise", "'infer.rows=raise'"),  # unknown place
        ("infer.row", "'infer.row'"),  # no action
        ("infer.row=hang", "takes the action raise"),
        ("media.ffmpeg=raise", "takes the action hang"),
        ("infer.row=raise:chunk=one", "chunk='one' is not a chunk number"),
        ("infer.row=raise:kind=captions", "kind='captions'"),
        ("infer.row=raise:chunk", "'chunk' is not key=value"),
        ("gpu.generate=hang:chunk=1", "takes no keys"),
        ("infer.row=raise;infer.row=raise:chunk=1", "named twice"),
    ],
)
def test_a_failpoint_that_does_not_parse_is_named(text, names):
    with pytest.raises(ValueError, match=names):
        failpoints.parse(text)
    with pytest.raises(ValidationError, match="failpoints"):
        Settings(failpoints=text)


def test_raise_fires_every_time_where_its_filters_match(armed):
    armed("infer.row=raise:chunk=2:kind=caption")
    for _ in range(3):
        with pytest.raises(failpoints.FailpointError, match="chunk=2, kind=caption"):
            failpoints.hit("infer.row", chunk=2, kind="caption")
    failpoints.hit("infer.row", chunk=2, kind="transcript")  # other rows pass
    failpoints.hit("infer.row", chunk=1, kind="caption")
    failpoints.hit("gpu.generate", rows=4)  # not armed
    armed("")
    failpoints.hit("infer.row", chunk=2, kind="caption")  # disarmed


def test_hang_blocks_the_first_call_of_the_process_only(armed):
    armed("gpu.generate=hang")
    first = threading.Thread(target=failpoints.hit, args=("gpu.generate",), kwargs={"rows": 1}, daemon=True)
    first.start()
    first.join(timeout=1.0)
    assert first.is_alive()  # blocked for ever (a daemon thread: it ends with the test process)
    second = threading.Thread(target=failpoints.hit, args=("gpu.generate",), daemon=True)
    second.start()
    second.join(timeout=5.0)
    assert not second.is_alive()  # once per process


def test_a_queue_message_cannot_arm_a_failpoint():
    """A job carries only output-shaping settings: a spec whose config names failpoints is refused."""
    config = {**Settings(model="tiny").effective_config(), "failpoints": "infer.row=raise"}
    spec = {
        "job_id": "0" * 20 + "-" + "0" * 10, "media_id": "0" * 20, "source": "/x.mp4", "input_uri": "/x.mp4",
        "fingerprint": "f", "config": config,
    }  # fmt: skip
    with pytest.raises(MalformedMessage, match="failpoints"):
        JobSpec.from_dict(spec)


@pytest.mark.parametrize("command", [["worker", "--queue", "gpu"], ["run", "x.mp4"]])
def test_a_process_with_a_bad_failpoint_refuses_to_start_in_one_line(command, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "workers.cli", *command],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OMNIQ_FAILPOINTS": "gpu.generate=hang;infer.row=raise:kind=nope"},
        cwd=tmp_path,
        timeout=120,
    )
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "OMNIQ_FAILPOINTS" in lines[0] and "kind='nope'" in lines[0], completed.stderr
