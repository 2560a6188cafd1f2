"""Rebuilding job state from the store after Redis lost its data (real Redis and a store on disk; no workers:
the messages that would be sent are read back from the queues)."""

from __future__ import annotations

import base64
import json

import pytest

from pipeline import job
from pipeline.config import Settings
from pipeline.media.sample import make_sample
from pipeline.results.assemble import ChunkResult
from pipeline.spec import chunk_prefix, put_json, work_prefix
from pipeline.storage import LocalStorage
from workers import runtime
from workers.reliability.restore import prune_batch_records, record_batch, record_cancelled, restore_from_store


def _messages(client):
    """Every queued message as (task name, kwargs)."""
    found = []
    for key in client.scan_iter("*"):
        if client.type(key) == "list" and not key.startswith("_kombu"):
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                kwargs = json.loads(base64.b64decode(message["body"]))[1]
                found.append((message["headers"]["task"], kwargs, key))
    return found


@pytest.fixture
def store(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path / "store")
    settings = Settings(model="tiny", chunk_seconds=5, batch_size=2, storage_url=storage.url)
    monkeypatch.setattr(runtime, "settings", lambda: settings)
    return storage, settings


def test_every_unfinished_job_is_rebuilt_and_its_missing_work_sent(broker, store, tmp_path, monkeypatch):
    url, client, state = broker
    monkeypatch.setattr(runtime, "state", lambda: state)
    storage, settings = store
    specs = {}
    for name in ("queued", "some-chunks", "all-chunks", "summarized", "finished", "known", "cancelled"):
        clip = make_sample(tmp_path / f"{name}.mp3", 14.0, video=False)  # three chunks of ~5 s
        spec = job.make_spec(str(clip), settings)
        spec.run_id = f"run-{name}"
        specs[name] = spec
    record = record_batch(storage, [spec.to_dict() for spec in specs.values()])  # what the producer writes
    for name in ("some-chunks", "all-chunks", "summarized"):
        plan = job.ingest(specs[name], settings, storage)
        assert len(plan.chunks) == 3
        done = [0] if name == "some-chunks" else [0, 1, 2]
        for index in done:
            result = ChunkResult(index, plan.chunks[index].start, plan.chunks[index].end, transcript="x")
            put_json(storage, f"{chunk_prefix(plan.spec.job_id, index)}/result.json", result.to_dict())
    put_json(storage, f"{work_prefix(specs['summarized'].job_id)}/summary.json", {"summary": "s"})
    finished = specs["finished"]
    job.write_failure(finished, storage, settings.model_copy(update={"keep_work": True}), "PermanentMediaError: x")
    storage.put_bytes("work/orphan-job/input/clip.mp4", b"an upload cut short")
    known = specs["known"]
    state.create(known.job_id, known.source, known.media_id, known.to_dict())

    record_cancelled(storage, specs["cancelled"].job_id, "run-cancelled")  # what `omniq cancel` leaves

    report = restore_from_store(storage, state, settings)

    assert dict(report) == {
        "ingest": 1,
        "infer": 1,
        "summarize": 1,
        "finalize": 1,
        "finished": 1,
        "orphaned": 1,
        "known": 1,
        "cancelled": 1,
    }
    sent = {(task, kwargs["job_id"]): kwargs for task, kwargs, _ in _messages(client)}
    assert set(sent) == {
        ("omniq.ingest", specs["queued"].job_id),
        ("omniq.infer", specs["some-chunks"].job_id),
        ("omniq.summarize", specs["all-chunks"].job_id),
        ("omniq.finalize", specs["summarized"].job_id),
    }
    assert sent[("omniq.infer", specs["some-chunks"].job_id)]["chunks"] == [1, 2]  # only what is missing
    gpu_lists = {key for task, _, key in _messages(client) if task in ("omniq.infer", "omniq.summarize")}
    assert all(key.startswith("gpu.tiny") for key in gpu_lists)
    assert state.get(specs["queued"].job_id)["status"] == "queued"
    some = state.get(specs["some-chunks"].job_id)
    assert (some["status"], some["chunks_total"], some["chunks_done"]) == ("running", 3, 1)
    assert state.units(specs["some-chunks"].job_id)["infer-1:chunks"] == "1,2"
    assert state.is_unit_done(specs["some-chunks"].job_id, "ingest")
    assert state.get(specs["summarized"].job_id)["status"] == "summarizing"
    ended = state.get(finished.job_id)
    assert ended["status"] == "failed" and "PermanentMediaError" in ended["error"]
    assert state.get(known.job_id)["status"] == "queued"  # left to the watchdog

    again = restore_from_store(storage, state, settings)  # nothing twice
    assert again["known"] == 6 and again["cancelled"] == 1 and len(_messages(client)) == 4

    # the batch record stays while one of its jobs waits in the queue, and goes once none does
    assert prune_batch_records(storage, state, older_than=0) == 0 and storage.exists(record)
    state.advance(specs["queued"].job_id, "ingesting")
    state.advance(known.job_id, "ingesting")
    assert prune_batch_records(storage, state, older_than=0) == 0  # Redis does not know the cancelled one
    gone = specs["cancelled"]
    state.create(gone.job_id, gone.source, gone.media_id, gone.to_dict())
    state.finish(gone.job_id, "cancelled")
    assert prune_batch_records(storage, state, older_than=0) == 2  # the batch record and the cancel marker
    assert not storage.exists(record) and list(storage.list_keys("work/_enqueued")) == []
