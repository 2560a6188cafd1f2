"""Retry policy of the tasks: transient errors retry up to the limit, permanent ones fail the job at once.

The step function is replaced by a fault injector (the policy, not the step, is under test); the task
runs through Celery's own ``apply`` with job state in fakeredis and results on local disk.
"""

from __future__ import annotations

import json

import fakeredis
import pytest

from pipeline import job
from pipeline.config import Settings
from pipeline.errors import PermanentMediaError, TransientError
from pipeline.storage import LocalStorage
from workers import tasks
from workers.state import JobState


@pytest.fixture
def wired(monkeypatch, tmp_path):
    state = JobState(fakeredis.FakeRedis(decode_responses=True))
    storage = LocalStorage(tmp_path / "store")
    settings = Settings(model="tiny", max_retries=2)
    monkeypatch.setattr(tasks, "state", lambda: state)
    monkeypatch.setattr(tasks, "storage", lambda: storage)
    monkeypatch.setattr(tasks, "settings", lambda: settings)
    monkeypatch.setattr(tasks.ingest, "max_retries", 2)
    monkeypatch.setattr(tasks.ingest, "retry_backoff", False)  # no sleeping in eager retries
    spec = job.JobSpec(
        "job-1", "media-1", "file:///in/a.mp4", "file:///in/a.mp4", "size=1", settings.effective_config()
    )
    state.create(spec.job_id, spec.source, spec.media_id, spec.to_dict())
    return state, storage, spec


def _fail_with(monkeypatch, error):
    calls = []

    def failing_ingest(*args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setattr(job, "ingest", failing_ingest)
    return calls


def test_transient_error_retries_then_fails_the_job(wired, monkeypatch):
    state, storage, spec = wired
    from prometheus_client import REGISTRY

    calls = _fail_with(monkeypatch, TransientError("s3 is down"))
    labels = {"queue": "media", "model": "tiny", "task": "omniq.ingest"}
    before = REGISTRY.get_sample_value("omniq_task_retries_total", labels) or 0.0
    tasks.ingest.apply(kwargs={"job_id": spec.job_id, "source": spec.source, "spec": spec.to_dict()})
    assert len(calls) == 3  # the first try and max_retries=2 retries
    assert REGISTRY.get_sample_value("omniq_task_retries_total", labels) == before + 2  # counted in metrics
    assert state.get(spec.job_id)["status"] == "failed"
    manifest = json.loads(storage.get_bytes(f"results/{spec.media_id}/manifest.json"))
    assert manifest["status"] == "failed" and "s3 is down" in manifest["error"]


def test_permanent_error_fails_at_once(wired, monkeypatch):
    state, storage, spec = wired
    calls = _fail_with(monkeypatch, PermanentMediaError("a.mp4: not a decodable audio or video file"))
    tasks.ingest.apply(kwargs={"job_id": spec.job_id, "source": spec.source, "spec": spec.to_dict()})
    assert len(calls) == 1
    job_state = state.get(spec.job_id)
    assert job_state["status"] == "failed" and "not a decodable" in job_state["error"]
    manifest = json.loads(storage.get_bytes(f"results/{spec.media_id}/manifest.json"))
    assert "PermanentMediaError" in manifest["error"]


def test_backoff_is_exponential_with_jitter_and_capped():
    task = tasks.ingest
    assert task.retry_backoff and task.retry_jitter
    assert task.retry_backoff_max == Settings().retry_backoff_max_seconds
