"""Unit tests of the Redis job state (fakeredis: pure logic, no broker)."""

from __future__ import annotations

import fakeredis
import pytest

from pipeline.config import Settings
from workers.app import TASK_ROUTES, celery_config
from workers.state import JobState


@pytest.fixture
def state():
    return JobState(fakeredis.FakeRedis(decode_responses=True))


def test_all_chunks_done_fires_exactly_once(state):
    state.create("j1", "file:///a.mp4", "m1", {"job_id": "j1"})
    assert state.complete_chunks("j1", [0, 1], 3) == (2, False)
    assert state.complete_chunks("j1", [0, 1], 3) == (2, False)  # duplicate delivery
    assert state.complete_chunks("j1", [2], 3) == (3, True)
    assert state.complete_chunks("j1", [2], 3) == (3, False)  # redelivered last chunk: no second summary
    assert state.complete_chunks("j1", [0, 1, 2], 3) == (3, False)
    assert state.get("j1")["chunks_done"] == 3


def test_create_resets_an_earlier_run(state):
    state.create("j1", "s", "m", {})
    state.complete_chunks("j1", [0], 1)
    state.set_status("j1", "done", chunks_total=1)
    state.create("j1", "s", "m", {})
    job = state.get("j1")
    assert job["status"] == "queued" and job["chunks_done"] == 0
    assert state.complete_chunks("j1", [0], 1) == (1, True)


def test_claim_is_exclusive_and_release_needs_the_token(state):
    token = state.claim("j1", "finalize", 60)
    assert token and state.claim("j1", "finalize", 60) is None
    state.release("j1", "finalize", "someone-else")
    assert state.claim("j1", "finalize", 60) is None
    state.release("j1", "finalize", token)
    assert state.claim("j1", "finalize", 60)


def test_status_fields_and_listing(state):
    state.create("a", "file:///a.mp4", "ma", {})
    state.create("b", "file:///b.mp4", "mb", {})
    state.set_status("b", "failed", error="PermanentMediaError: b.mp4: not media")
    state.add_timings("b", {"ingest_s": 1.5})
    assert [j["job_id"] for j in state.recent()] == ["b", "a"]
    job = state.get("b")
    assert job["error"].startswith("PermanentMediaError") and state.timings("b") == {"ingest_s": 1.5}
    assert state.get("missing") is None


def test_celery_config_is_safe():
    config = celery_config(Settings(visibility_timeout_seconds=7200))
    assert config["task_serializer"] == "json" and config["accept_content"] == ["json"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["task_ignore_result"]
    assert config["result_backend"] is None
    assert config["broker_transport_options"]["visibility_timeout"] == 7200
    assert TASK_ROUTES["omniq.infer"]["queue"] == TASK_ROUTES["omniq.summarize"]["queue"] == "gpu"
    assert TASK_ROUTES["omniq.ingest"]["queue"] == TASK_ROUTES["omniq.finalize"]["queue"] == "media"


def test_tasks_have_readable_names_and_retry_policy():
    import workers.tasks  # noqa: F401  (registers the tasks, as the worker's include= does)
    from pipeline.errors import TransientError
    from workers.app import app

    names = {"omniq.ingest", "omniq.infer", "omniq.summarize", "omniq.finalize"}
    assert names <= set(app.tasks)
    for name in names:
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost
        assert TransientError in task.autoretry_for and task.retry_jitter
