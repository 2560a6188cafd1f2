"""Retry policy of the tasks: transient errors retry on a time budget, permanent ones fail the job at once.

The step function is replaced by a fault injector (the policy, not the step, is under test); the task
runs through Celery's own ``apply`` with job state in fakeredis and results on local disk. A fake clock
stands in for the 30 minutes of the default budget.
"""

from __future__ import annotations

import json
import time
import time as _real_time
import types

import fakeredis
import pytest

from pipeline import job
from pipeline.config import Settings
from pipeline.errors import PermanentMediaError, TransientError
from pipeline.sources import SourceRef, job_id_for
from pipeline.storage import LocalStorage
from workers import runtime, tasks
from workers import state as state_module
from workers.reliability.leases import Leases
from workers.state import PENDING_FAILURES, JobState
from workers.steps import base as steps_base
from workers.steps import failures as steps_failures


class Clock:
    """time.time that the test moves; monotonic and sleep stay real."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self):
        return self.now

    monotonic = staticmethod(_real_time.monotonic)
    sleep = staticmethod(_real_time.sleep)


@pytest.fixture
def wired(monkeypatch, tmp_path):
    state = JobState(fakeredis.FakeRedis(decode_responses=True))
    storage = LocalStorage(tmp_path / "store")
    settings = Settings(
        model="tiny", retry_budget_seconds=1800, retry_min_seconds=5, retry_max_seconds=300, local_source_roots="/in"
    )
    clock = Clock()
    monkeypatch.setattr(runtime, "state", lambda: state)
    monkeypatch.setattr(runtime, "storage", lambda: storage)
    monkeypatch.setattr(runtime, "settings", lambda: settings)
    leases = Leases(state, 45, 10)
    monkeypatch.setattr(runtime, "leases", lambda: leases)
    for module in (steps_base, steps_failures):  # the retry budget's clock
        monkeypatch.setattr(module, "time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic))
    monkeypatch.setattr(state_module, "time", clock)
    source = SourceRef("file:///in/a.mp4", "size=1", 1)
    spec = job.JobSpec(
        job_id_for(source.media_id, settings.config_hash()),
        source.media_id,
        source.uri,
        source.uri,
        source.fingerprint,
        settings.effective_config(),
    )
    state.create(spec.job_id, spec.source, spec.media_id, spec.to_dict())
    return types.SimpleNamespace(state=state, storage=storage, spec=spec, clock=clock, leases=leases)


def _ingest_raising(monkeypatch, errors, clock, step=600.0):
    """Replace the ingest step: each call moves the clock by ``step`` and raises the next error (None: succeed)."""
    calls = []

    def ingest(spec, settings, storage):
        calls.append(clock.now)
        clock.now += step
        error = errors[min(len(calls), len(errors)) - 1]
        if error is not None:
            raise error
        raise _Stop()  # success is not under test: stop here

    monkeypatch.setattr(job, "ingest", ingest)
    return calls


class _Stop(PermanentMediaError):
    pass


def _run(w):
    tasks.ingest.apply(kwargs={"job_id": w.spec.job_id, "source": w.spec.source, "spec": w.spec.to_dict()})


def test_transient_errors_retry_until_the_time_budget_is_spent(wired, monkeypatch):
    from prometheus_client import REGISTRY

    error = TransientError("s3://b/k: storage is unavailable (503)")
    calls = _ingest_raising(monkeypatch, [error], wired.clock, step=120.0)
    labels = {"queue": "media", "model": "tiny", "task": "omniq.ingest"}
    before = REGISTRY.get_sample_value("omniq_task_retries_total", labels) or 0.0
    _run(wired)
    # tried every 2 min for the 30 min budget (no cap on the count): then the job fails with the real cause
    assert len(calls) == 16 and calls[-1] - calls[0] == 1800
    assert REGISTRY.get_sample_value("omniq_task_retries_total", labels) == before + 15
    job_state = wired.state.get(wired.spec.job_id)
    assert job_state["status"] == "failed" and job_state["retry_at"] is None
    manifest = json.loads(wired.storage.get_bytes(f"results/{wired.spec.media_id}/manifest.json"))
    assert manifest["status"] == "failed"
    assert "storage is unavailable (503)" in manifest["error"] and "30 min of retries" in manifest["error"]
    assert "will retry" not in manifest["error"]
    assert wired.state.redis.smembers(PENDING_FAILURES) == set()  # written at once: nothing left pending
    assert wired.leases.held() == {}  # every attempt gave its lease back


def test_a_retry_is_visible_in_the_job_state(wired, monkeypatch):
    seen = []

    def ingest(spec, settings, storage):
        seen.append(wired.state.get(spec.job_id))
        wired.clock.now += 60
        if len(seen) == 1:
            raise TransientError("s3://b/k: cannot reach storage")
        raise _Stop()

    monkeypatch.setattr(job, "ingest", ingest)
    _run(wired)
    retrying = seen[1]  # what `omniq status` showed while the retry was pending
    assert retrying["retry_reason"] == "s3://b/k: cannot reach storage"
    assert retrying["retry_at"] >= wired.clock.now - 60 + 5 - 1e-6
    assert wired.state.get(wired.spec.job_id)["status"] == "failed"  # _Stop is permanent


def test_permanent_error_fails_at_once(wired, monkeypatch):
    calls = _ingest_raising(
        monkeypatch, [PermanentMediaError("a.mp4: not a decodable audio or video file")], wired.clock
    )
    _run(wired)
    assert len(calls) == 1
    job_state = wired.state.get(wired.spec.job_id)
    assert job_state["status"] == "failed" and "not a decodable" in job_state["error"]
    manifest = json.loads(wired.storage.get_bytes(f"results/{wired.spec.media_id}/manifest.json"))
    assert "PermanentMediaError" in manifest["error"]


def test_backoff_doubles_from_the_floor_with_jitter_up_to_the_ceiling():
    assert tasks.retry_delay(0, 5, 300) == 5
    assert all(5 <= tasks.retry_delay(1, 5, 300) <= 10 for _ in range(50))
    assert all(150 <= tasks.retry_delay(12, 5, 300) <= 300 for _ in range(50))
    assert len({round(tasks.retry_delay(4, 5, 300), 3) for _ in range(20)}) > 1  # jittered


class FlakyStorage(LocalStorage):
    """A store whose writes fail while ``down`` (the fault injected; the failure handling is under test)."""

    down = True

    def put_bytes(self, key, data, content_type=None, **options):
        if self.down:
            raise TransientError(f"{self.uri(key)}: cannot reach storage (connection refused)")
        return super().put_bytes(key, data, content_type, **options)


def test_failure_manifest_waits_for_the_store_and_the_handler_never_raises(wired, monkeypatch, tmp_path):
    from workers.reliability.watchdog import Watchdog

    flaky = FlakyStorage(tmp_path / "flaky")
    monkeypatch.setattr(runtime, "storage", lambda: flaky)
    _ingest_raising(monkeypatch, [PermanentMediaError("a.mp4: not media")], wired.clock)
    _run(wired)  # on_failure cannot write the manifest: it must not raise
    assert wired.state.get(wired.spec.job_id)["status"] == "failed"
    assert wired.state.redis.smembers(PENDING_FAILURES) == {wired.spec.job_id}
    watchdog = Watchdog(wired.state, wired.leases, tasks.settings())
    monkeypatch.setattr(wired.state.redis, "set", lambda *a, **k: True)  # this sweeper gets the lock, no epoch
    assert watchdog.sweep(force=True)["failure_manifests_waiting"] == 1
    flaky.down = False  # the store is back: the next sweep writes it
    assert watchdog.sweep(force=True)["failure_manifests"] == 1
    manifest = json.loads(flaky.get_bytes(f"results/{wired.spec.media_id}/manifest.json"))
    assert manifest["status"] == "failed" and "not media" in manifest["error"]
    assert wired.state.redis.smembers(PENDING_FAILURES) == set()


def test_failure_handler_survives_a_dead_redis(wired, monkeypatch):
    dead = JobState.from_url("redis://127.0.0.1:1/0", retry_seconds=0)
    monkeypatch.setattr(runtime, "state", lambda: dead)
    tasks.fail_job(wired.spec.job_id, "PermanentMediaError: a.mp4: not media")  # logs, never raises
    tasks.ingest.on_failure(PermanentMediaError("x"), "id", (), {"job_id": wired.spec.job_id}, None)
