"""Unit tests of the Redis job state (fakeredis: pure logic, no broker)."""

from __future__ import annotations

import time

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
    state.finish("j1", "done", chunks_total=1)
    state.create("j1", "s", "m", {})
    job = state.get("j1")
    assert job["status"] == "queued" and job["chunks_done"] == 0
    assert state.complete_chunks("j1", [0], 1) == (1, True)


def test_transitions_never_revive_an_ended_job(state):
    state.create("j1", "s", "m", {})
    assert state.advance("j1", "running", chunks_total=2) and state.get("j1")["chunks_total"] == 2
    assert "j1" in set(state.active_ids())
    assert state.finish("j1", "cancelled", error="cancelled by the user")
    assert "j1" not in set(state.active_ids())
    assert not state.advance("j1", "summarizing")  # a step still running cannot revive it
    assert not state.finish("j1", "failed")  # nor turn it into a failure
    assert state.get("j1")["status"] == "cancelled"
    assert not state.advance("unknown", "running") and state.get("unknown") is None


def test_the_watchdog_watches_jobs_at_work_and_unsent_ones_not_jobs_waiting_in_a_queue(state):
    state.create("j1", "s", "m", {})
    assert "j1" in set(state.active_ids())  # its message may never have been sent
    state.mark_sent([("j1", "ingest", None)])
    assert "j1" not in set(state.active_ids())  # waiting in the queue: nothing to watch
    assert state.advance("j1", "ingesting")
    assert "j1" in set(state.active_ids())
    state.mark_sent([("j1", "ingest", None)])  # sent again by the watchdog while ingesting: still watched
    assert "j1" in set(state.active_ids())


def test_a_new_run_starts_without_the_leases_of_the_last_one(state):
    state.create("j1", "s", "m", {})
    state.mark_sent([("j1", "infer-0", [0])])
    state.redis.set("omniq:lease:j1:infer-0", "left over", px=60_000)
    state.finish("j1", "done")
    state.create("j1", "s", "m", {})
    assert not state.redis.exists("omniq:lease:j1:infer-0")


def test_create_is_refused_for_an_active_job_unless_forced(state):
    assert state.create("j1", "s", "m", {}) == "created"
    state.advance("j1", "running")
    assert state.create("j1", "s", "m", {}) == "running"
    assert state.create("j1", "s", "m", {}, force=True) == "created"
    assert state.status("j1") == "queued"


def test_units_record_sending_retries_and_completion(state):
    state.create("j1", "s", "m", {})
    state.mark_sent([("j1", "infer-0", [0, 1]), ("j1", "summarize", None)])
    units = state.units("j1")
    assert units["infer-0:chunks"] == "0,1" and "summarize:sent" in units and state.was_sent("j1", "summarize")
    first = state.unit_retrying("j1", "infer-0", "storage is unavailable", 123.0)
    assert state.unit_retrying("j1", "infer-0", "again", 456.0) == first  # the budget counts from the first
    job = state.get("j1")
    assert job["retry_reason"] == "again" and job["retry_at"] == 456.0
    state.unit_done("j1", "infer-0")
    assert state.is_unit_done("j1", "infer-0") and state.retry_since("j1", "infer-0") is None
    state.finish("j1", "done")
    assert state.get("j1")["retry_at"] is None  # an ended job shows no pending retry


def test_a_unit_of_an_earlier_run_is_not_marked_done_in_the_new_run(state):
    """A step that ends after its job was enqueued again (a forced re-run right after ``done``) must not mark the
    new run's unit done: that run would skip it and never end."""
    state.create("j1", "s", "m", {})
    first_run = state.run_of("j1")
    state.finish("j1", "done")
    time.sleep(0.01)
    assert state.create("j1", "s", "m", {}, force=True) == "created"
    assert state.run_of("j1") != first_run
    state.unit_done("j1", "finalize", first_run)  # the earlier run's finalize, finishing late
    assert not state.is_unit_done("j1", "finalize")
    state.unit_done("j1", "finalize", state.run_of("j1"))
    assert state.is_unit_done("j1", "finalize")


def test_status_fields_and_listing(state):
    state.create("a", "file:///a.mp4", "ma", {})
    state.create("b", "file:///b.mp4", "mb", {})
    state.finish("b", "failed", error="PermanentMediaError: b.mp4: not media")
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
    assert TASK_ROUTES["omniq.ingest"]["queue"] == TASK_ROUTES["omniq.finalize"]["queue"] == "media"
    assert config["task_queues"][1].name == "gpu.Qwen-Qwen3-Omni-30B-A3B-Instruct-" + config["task_queues"][1].name[-8:]
    # recovery never waits on the visibility timeout alone: see tests/workers/test_recovery.py
    assert config["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert config["broker_connection_max_retries"] is None
    assert config["worker_soft_shutdown_timeout"] == Settings().soft_shutdown_seconds > 0


def test_each_model_has_its_own_gpu_queue():
    from workers.app import gpu_queue_for

    assert gpu_queue_for("tiny") == "gpu.tiny"
    assert gpu_queue_for("Qwen/Qwen3-Omni-30B-A3B-Instruct") != gpu_queue_for("Qwen/Qwen3-Omni-30B-A3B-Thinking")
    assert gpu_queue_for("/models/a/omni") != gpu_queue_for("/models/b/omni")  # same name, other path
    assert all(c.isalnum() or c in "._-" for c in gpu_queue_for("/models/ünïcode dir/x"))


def test_tasks_have_readable_names_and_retry_policy():
    import workers.tasks  # noqa: F401  (registers the tasks, as the worker's include= does)
    from workers.app import app

    names = {"omniq.ingest", "omniq.infer", "omniq.summarize", "omniq.finalize"}
    assert names <= set(app.tasks)
    for name in names:
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost
        assert not getattr(task, "autoretry_for", ())  # transient errors retry on a time budget instead


def test_a_partial_job_has_ended_carries_its_count_and_is_retried_with_the_failed(state):
    from workers.job_events import last_events

    for job_id in ("p", "f", "d"):
        state.create(job_id, "s", f"m-{job_id}", {})
        state.advance(job_id, "running", chunks_total=2)
    assert state.finish("p", "partial", error="2 of 7 rows failed; first: ...", failed_rows=2)
    state.finish("f", "failed", error="PermanentMediaError: x")
    state.finish("d", "done")
    assert "p" not in set(state.active_ids()) and not state.advance("p", "running")  # it has ended
    assert state.get("p")["failed_rows"] == 2 and state.get("d")["failed_rows"] == 0
    assert sorted(state.failed_ids()) == ["f", "p"]  # omniq retry --failed takes partial jobs too
    (event,) = [e for e in last_events(state.redis, 50) if e.event == "partial"]
    assert (event.job_id, event.failed_rows, event.error) == ("p", 2, "2 of 7 rows failed; first: ...")
    state.create("p", "s", "m-p", {})  # a new run starts without the count
    assert state.get("p")["failed_rows"] == 0
