"""Bulk enqueue against a real Redis broker (no workers: the messages stay queued and are inspected)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.config import Settings
from pipeline.storage import LocalStorage
from tests.workers.conftest import queued as _queued
from workers.producer import enqueue


@pytest.fixture
def library(tmp_path):
    for index in range(5):
        (tmp_path / "lib" / "season").mkdir(parents=True, exist_ok=True)
        (tmp_path / "lib" / "season" / f"ep{index}.mp4").write_bytes(b"fake media %d" % index)
    (tmp_path / "lib" / "cover.jpg").write_bytes(b"jpeg")
    return tmp_path / "lib"


def test_directory_then_again_then_done_then_forced(broker, library, tmp_path):
    url, client, state = broker
    settings = Settings(broker_url=url)
    storage = LocalStorage(tmp_path / "store")
    first = enqueue([str(library)], settings, storage, state, tag="season-1")
    assert [o.status for o in first] == ["enqueued"] * 5  # cover.jpg is not media
    assert sum(_queued(client).values()) == 5
    message = json.loads(client.lrange(next(iter(_queued(client))), 0, 0)[0])
    assert message["headers"]["task"] == "omniq.ingest"
    kwargs = json.loads(__import__("base64").b64decode(message["body"]))[1]
    assert kwargs["spec"]["tag"] == "season-1" and kwargs["source"].startswith("file:///")
    (record_key,) = storage.list_keys("work/_enqueued")  # the batch, recorded in the store in one request
    record = json.loads(storage.get_bytes(record_key))
    assert record["enqueued_at"] and {spec["job_id"] for spec in record["specs"]} == {o.job_id for o in first}
    assert all(spec["run_id"] for spec in record["specs"])
    assert all(state.was_sent(outcome.job_id, "ingest") for outcome in first)  # and marked sent after sending

    again = enqueue([str(library)], settings, storage, state)
    assert {(o.status, o.reason) for o in again} == {("skipped", "already queued")}
    assert sum(_queued(client).values()) == 5  # nothing published twice

    done = first[0].job_id
    state.finish(done, "done")
    third = enqueue([str(library)], settings, storage, state)
    assert [o.reason for o in third if o.job_id == done] == ["already done with this config"]
    forced = enqueue([str(library / "season" / "ep0.mp4")], settings, storage, state, force=True)
    assert forced[0].status == "enqueued" and forced[0].job_id == done
    assert state.get(done)["status"] == "queued"


def test_finished_jobs_are_found_in_the_store_when_redis_forgot_them(broker, library, tmp_path):
    url, client, state = broker
    settings = Settings(broker_url=url)
    storage = LocalStorage(tmp_path / "store")
    first = enqueue([str(library / "season" / "ep1.mp4")], settings, storage, state)[0]
    media_id = first.job_id.rsplit("-", 1)[0]
    storage.put_bytes(
        f"results/{media_id}/manifest.json",
        json.dumps({"status": "done", "config_hash": settings.config_hash()}).encode(),
    )
    client.flushdb()  # a new Redis: the store is the source of truth
    again = enqueue([str(library / "season" / "ep1.mp4")], settings, storage, state)[0]
    assert (again.status, again.reason) == ("skipped", "already done with this config")
    other_config = enqueue(
        [str(library / "season" / "ep1.mp4")], settings.model_copy(update={"fps": 1.0}), storage, state
    )[0]
    assert other_config.status == "enqueued"


def test_priority_decides_the_redis_list(broker, library, tmp_path):
    url, client, state = broker
    settings = Settings(broker_url=url)
    storage = LocalStorage(tmp_path / "store")
    enqueue([str(library / "season" / "ep0.mp4")], settings, storage, state, priority=9)
    enqueue([str(library / "season" / "ep1.mp4")], settings, storage, state, priority=0)
    enqueue([str(library / "season" / "ep2.mp4")], settings, storage, state)
    assert _queued(client) == {"media": 1, "media:9": 1, "media:4": 1}  # list "media" is served first


def test_duplicate_sources_and_rejections(broker, library, tmp_path):
    url, client, state = broker
    settings = Settings(broker_url=url)
    storage = LocalStorage(tmp_path / "store")
    episode = str(library / "season" / "ep3.mp4")
    outcomes = enqueue([episode, f"file://{episode}", str(tmp_path / "missing.mp4")], settings, storage, state)
    assert [o.status for o in outcomes] == ["enqueued", "skipped", "rejected"]
    assert "missing.mp4" in outcomes[2].reason


def test_cli_bulk_enqueue_with_list_file(broker, library, tmp_path):
    url, client, state = broker
    listing = tmp_path / "list.jsonl"
    listing.write_text(
        json.dumps({"uri": str(library / "season" / "ep4.mp4")}) + "\n" + str(tmp_path / "nope.mp4") + "\n"
    )
    env = {**os.environ, "OMNIQ_BROKER_URL": url, "OMNIQ_STORAGE_URL": str(tmp_path / "store")}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "enqueue",
            str(library),
            "--exclude",
            "ep0*",
            "--from-file",
            str(listing),
            "--tag",
            "nightly",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert completed.returncode == 1  # one source was rejected
    outcomes = json.loads(completed.stdout)
    assert [o["status"] for o in outcomes].count("enqueued") == 4  # ep1-ep3 from the dir, ep4 from the list
    assert sum(1 for o in outcomes if o["status"] == "skipped") == 1  # ep4 again through the list
    assert "enqueued 4, skipped 1" in completed.stderr and "rejected 1" in completed.stderr
    assert "ignored 1 non-media file (-v lists them)" in completed.stderr  # cover.jpg; ep0 was --exclude'd
    assert "nope.mp4" in completed.stderr
    assert all(
        json.loads(state.redis.hget(state.key(o["job_id"]), "spec"))["tag"] == "nightly"
        for o in outcomes
        if o["status"] == "enqueued"
    )


def test_s3_prefix_enqueues_every_object_once(broker, s3_server, s3_bucket, tmp_path, monkeypatch):
    url, client, state = broker
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    settings = Settings(broker_url=url, s3_endpoint_url=s3_server.endpoint_url)
    storage = LocalStorage(tmp_path / "store")
    for index in range(30):
        s3_server.client().put_object(Bucket=s3_bucket, Key=f"videos/{index:03d}.mp4", Body=b"v%d" % index)
    s3_server.client().put_object(Bucket=s3_bucket, Key="videos/index.html", Body=b"<html>")
    first = enqueue([f"s3://{s3_bucket}/videos/"], settings, storage, state, tag="bucket")
    assert [o.status for o in first] == ["enqueued"] * 30
    assert {o.source for o in first} == {f"s3://{s3_bucket}/videos/{i:03d}.mp4" for i in range(30)}
    assert sum(_queued(client).values()) == 30
    again = enqueue([f"s3://{s3_bucket}/videos/"], settings, storage, state)
    assert {o.status for o in again} == {"skipped"} and len(again) == 30
