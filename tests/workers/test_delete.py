"""``omniq delete`` on a real results directory, a real SQLite index and a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.config import Settings
from pipeline.search import open_index, rebuild_index
from pipeline.storage import LocalStorage
from tests.pipeline.test_search import write_results
from tests.servers import find_free_port
from workers.job_events import read_events
from workers.state import JobState

TALK, WALK, KEEP = "a" * 20, "b" * 20, "c" * 20


def library(tmp_path, state: JobState | None):
    """Three media: two tagged 'week1' (one still has a running job), one other; indexed."""
    storage = LocalStorage(tmp_path / "data")
    write_results(storage, TALK, source="/videos/talk one.mp4", tag="week1", segments=[(0, 4, "rockets lift off")])
    write_results(storage, WALK, source="s3://bucket/walk.mov", tag="week1", segments=[(0, 4, "rockets in a park")])
    write_results(storage, KEEP, source="/videos/keep.mp4", segments=[(0, 4, "rockets stay here")])
    storage.put_bytes(f"work/{TALK}-job/chunks/00000/result.json", b"{}")
    if state is not None:
        for media_id, status in ((TALK, "done"), (WALK, "running")):
            job_id = f"{media_id}-job"
            state.create(job_id, "s", media_id, {"job_id": job_id, "source": "s", "media_id": media_id})
            if status == "done":
                state.finish(job_id, "done")
            else:
                state.advance(job_id, "running")
    settings = Settings(storage_url=storage.url)
    with open_index(None, settings) as index:
        rebuild_index(storage, index)
    return storage, settings


def omniq(env, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
    )


def hits(settings, query):
    with open_index(None, settings) as index:
        return sorted({hit.media_id for hit in index.search(query, limit=50)})


def test_delete_by_tag_removes_everything_of_a_media_and_refuses_a_running_one(broker, tmp_path):
    url, client, state = broker
    storage, settings = library(tmp_path, state)
    env = {**os.environ, "OMNIQ_BROKER_URL": url, "OMNIQ_STORAGE_URL": "file:///nowhere"}
    env.pop("OMNIQ_INDEX_URL", None)
    assert hits(settings, "rockets") == [TALK, WALK, KEEP]

    asked = omniq(env, "delete", "--tag", "week1", "--out", storage.url)  # not a terminal, no --yes
    assert asked.returncode == 1 and "without --yes" in asked.stderr
    assert storage.exists(f"results/{TALK}/manifest.json")

    done = omniq(env, "delete", "--tag", "week1", "--out", str(tmp_path / "data"), "--yes")
    assert done.returncode == 1, done.stderr  # one media was refused
    assert f"job {WALK}-job is running; cancel it first (omniq cancel {WALK}-job)" in done.stderr
    assert f"deleted {TALK}  /videos/talk one.mp4" in done.stdout
    assert not list(storage.list_keys(f"results/{TALK}")) and not list(storage.list_keys(f"work/{TALK}-job"))
    assert not (tmp_path / "data" / "results" / TALK).exists()
    assert state.get(f"{TALK}-job") is None and f"{TALK}-job" not in client.zrange("omniq:jobs", 0, -1)
    assert hits(settings, "rockets") == [WALK, KEEP]  # the running one and the untagged one stay
    assert storage.exists(f"results/{WALK}/manifest.json") and storage.exists(f"results/{KEEP}/transcript.json")
    deleted = [e for e in read_events(client) if e.event == "deleted"]
    assert [(e.media_id, e.source) for e in deleted] == [(TALK, "/videos/talk one.mp4")]

    again = omniq(env, "delete", TALK, "--out", storage.url, "--yes")
    assert again.returncode == 1 and "no results for" in again.stderr


def test_delete_by_source_without_a_queue(tmp_path):
    storage, settings = library(tmp_path, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no S3 to ask: the manifests say
    env |= {"OMNIQ_BROKER_URL": f"redis://:pw@127.0.0.1:{find_free_port()}/0"}
    env |= {"OMNIQ_STORAGE_URL": storage.url}
    env.pop("OMNIQ_INDEX_URL", None)
    done = omniq(env, "delete", "s3://bucket/walk.mov", KEEP, "--yes")
    assert done.returncode == 0, done.stderr
    assert "not checking for running jobs" in done.stderr and ":pw@" not in done.stderr  # never the password
    assert hits(settings, "rockets") == [TALK]
    assert json.loads(storage.get_bytes(f"results/{TALK}/manifest.json"))["status"] == "done"
    assert not storage.exists(f"results/{WALK}/manifest.json") and not storage.exists(f"results/{KEEP}/manifest.json")


def test_delete_needs_something_to_delete(tmp_path):
    env = {**os.environ, "OMNIQ_STORAGE_URL": LocalStorage(tmp_path / "data").url}
    nothing = omniq(env, "delete")
    assert nothing.returncode == 2 and "name what to delete" in nothing.stderr
