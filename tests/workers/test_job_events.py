"""Job events: the Redis stream every job change is appended to, on a real redis-server, and `omniq events`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from workers import state as state_module
from workers.job_events import read_events
from workers.state import EVENTS


def test_every_change_appends_one_event_and_repeats_append_none(broker):
    url, client, state = broker
    spec = {"job_id": "j1", "source": "file:///media/talk%201.mp4", "media_id": "m1", "tag": "week1"}
    assert state.create("j1", spec["source"], "m1", spec) == "created"
    assert state.advance("j1", "ingesting", from_=("queued",))
    assert state.advance("j1", "running", chunks_total=3)
    assert state.complete_chunks("j1", [0, 1], 3) == (2, False)
    assert state.complete_chunks("j1", [0, 1], 3) == (2, False)  # a redelivered batch
    assert state.complete_chunks("j1", [2], 3) == (3, True)
    assert state.advance("j1", "summarizing")
    assert state.advance("j1", "summarizing", from_=("running", "summarizing"))  # the second advance: no change
    assert state.advance("j1", "finalizing")
    assert state.finish("j1", "done")
    assert not state.finish("j1", "failed", error="late")  # a late failure changes nothing
    assert not state.advance("j1", "running")
    events = read_events(client)
    assert [e.event for e in events] == [
        "queued", "ingesting", "running", "progress", "progress", "summarizing", "finalizing", "done",
    ]  # fmt: skip
    assert [(e.chunks_done, e.chunks_total) for e in events if e.event == "progress"] == [(2, 3), (3, 3)]
    done = events[-1]
    assert (done.job_id, done.media_id, done.source, done.tag, done.status) == (
        "j1",
        "m1",
        spec["source"],
        "week1",
        "done",
    )
    assert done.chunks_done == 3 and done.error is None and abs(done.at - time.time()) < 60
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert read_events(client, after=events[3].id)[0].id == events[4].id  # readers resume after an id

    state.create("j2", "s3://b/x.mp3", "m2", {"job_id": "j2", "source": "s3://b/x.mp3", "media_id": "m2"})
    state.finish("j2", "failed", error="PermanentMediaError: not media")
    failed = read_events(client)[-1]
    assert (failed.event, failed.error, failed.tag) == ("failed", "PermanentMediaError: not media", None)


def test_consumers_read_the_stream_with_their_own_groups(broker):
    url, client, state = broker
    state.create("j1", "s", "m", {"job_id": "j1", "source": "s", "media_id": "m"})
    for group in ("cms", "search"):
        client.xgroup_create(EVENTS, group, id="0")
    state.finish("j1", "cancelled")
    for group in ("cms", "search"):  # each group gets every event once
        (_, entries), *_ = client.xreadgroup(group, "c1", {EVENTS: ">"}, count=10)
        assert [fields["event"] for _, fields in entries] == ["queued", "cancelled"]
        assert client.xreadgroup(group, "c1", {EVENTS: ">"}, count=10, block=10) == []


def test_the_stream_is_capped(broker, monkeypatch):
    url, client, state = broker
    monkeypatch.setattr(state_module, "EVENTS_MAX_LENGTH", 10)
    for index in range(400):
        state.create(f"j{index}", "s", "m", {"job_id": f"j{index}", "source": "s", "media_id": "m"})
    assert 10 <= client.xlen(EVENTS) < 400  # trimmed in whole stream nodes (MAXLEN ~)


def test_omniq_events_prints_and_follows(broker):
    url, client, state = broker
    env = {**os.environ, "OMNIQ_BROKER_URL": url}
    state.create("j1", "file:///media/talk%20%C3%A4.mp4", "m1", {"job_id": "j1", "source": "x", "media_id": "m1"})
    state.finish("j1", "failed", error="it broke")
    command = [sys.executable, "-m", "workers.cli", "events"]
    printed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert "queued" in lines[0] and "/media/talk ä.mp4" in lines[0]  # the path as people write it
    assert "failed" in lines[1] and "it broke" in lines[1]
    as_json = subprocess.run([*command, "--json", "--limit", "1"], env=env, capture_output=True, text=True, timeout=60)
    (only,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (only["event"], only["job_id"], only["error"]) == ("failed", "j1", "it broke")

    following = subprocess.Popen(
        [*command, "--follow", "--json", "--limit", "1"], env=env, stdout=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(30, following.kill)  # every read below ends within 30 s
    watchdog.start()
    try:
        assert json.loads(following.stdout.readline())["event"] == "failed"  # the newest first
        time.sleep(0.5)
        state.create("j2", "s3://b/new.mp4", "m2", {"job_id": "j2", "source": "s3://b/new.mp4", "media_id": "m2"})
        assert json.loads(following.stdout.readline() or "{}").get("job_id") == "j2"
    finally:
        watchdog.cancel()
        following.terminate()
        following.wait(timeout=30)


def test_status_shows_paths_as_people_write_them():
    from workers.cli.jobs import _status_line

    row = {"job_id": "j", "status": "done", "chunks_done": 1, "chunks_total": 1, "error": None, "age_s": None}
    assert _status_line(row | {"source": "file:///m/talk%20%C3%A4.mp4"}).endswith("  /m/talk ä.mp4")
    assert _status_line(row | {"source": "s3://b/a%20b.mp4"}).endswith("  s3://b/a%20b.mp4")  # S3 keys are verbatim
