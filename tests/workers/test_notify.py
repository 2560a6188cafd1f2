"""HTTP notifications of ended jobs: a real redis-server, a real HTTP receiver on 127.0.0.1 that checks every
signature, and the notifier's consumer group."""

from __future__ import annotations

import json
import logging
import time

import pytest
from prometheus_client import REGISTRY

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.storage import LocalStorage
from tests.servers import NotificationReceiver, find_free_port
from workers import notify
from workers.notify import Notifier, check_target, signature
from workers.state import EVENTS

SECRET = "notify-secret-0123456789"


def notifier(url, client, tmp_path, consumer="c1", **overrides):
    settings = Settings(notify_url=url, notify_secret=SECRET, **overrides)
    found = Notifier(client, LocalStorage(tmp_path / "store"), settings, consumer)
    found.ensure_group()
    return found


def run_until(condition, *notifiers, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the notifier did not get there in time"
        for each in notifiers:
            each.step(block_ms=100)


def ended_job(state, job_id, status, storage=None, error=None, failed_rows=0):
    media_id = f"m-{job_id}"
    state.create(job_id, f"s3://media/{job_id}.mp4", media_id, {"job_id": job_id, "source": "s", "media_id": media_id})
    state.advance(job_id, "running", chunks_total=1)
    if storage is not None:
        manifest = {"status": status, "job_id": job_id, "duration_s": 12.5, "language": "en", "error": error}
        manifest["rows"] = {"total": 7, "failed": failed_rows}
        storage.put_bytes(f"results/{media_id}/manifest.json", json.dumps(manifest).encode())
    state.finish(job_id, status, **({"error": error} if error else {}), failed_rows=failed_rows)


def test_ended_jobs_are_posted_once_signed_with_their_results(broker, tmp_path):
    url, client, state = broker
    receiver = NotificationReceiver(SECRET)
    try:
        sender = notifier(receiver.url, client, tmp_path)
        storage = sender.storage
        ended_job(state, "done-job", "done", storage)
        ended_job(state, "failed-job", "failed", storage, error="PermanentMediaError: not media")
        ended_job(state, "cancelled-job", "cancelled")
        ended_job(state, "partial-job", "partial", storage, error="2 of 7 rows failed; first: ...", failed_rows=2)
        state.create("queued-job", "s", "m", {"job_id": "queued-job", "source": "s", "media_id": "m"})
        run_until(lambda: len(receiver.acknowledged()) >= 4, sender)
        time.sleep(0.3)
        sender.step(block_ms=100)
        got = {r["body"]["job_id"]: r for r in receiver.requests}
        assert sorted(got) == ["cancelled-job", "done-job", "failed-job", "partial-job"] and len(receiver.requests) == 4
        partial = got["partial-job"]["body"]
        assert (partial["event"], partial["status"], partial["failed_rows"]) == ("partial", "partial", 2)
        assert partial["manifest"]["rows"] == {"total": 7, "failed": 2} and partial["result_uri"]
        assert all(r["signed"] for r in receiver.requests)
        done = got["done-job"]
        assert (
            done["headers"]["X-Omniq-Event"] == "done"
            and done["headers"]["X-Omniq-Event-Id"] == done["body"]["event_id"]
        )
        assert abs(int(done["headers"]["X-Omniq-Timestamp"]) - done["body"]["sent_at"]) < 1
        assert done["body"]["result_uri"] == storage.uri("results/m-done-job/manifest.json")
        assert (done["body"]["manifest"]["duration_s"], done["body"]["manifest"]["language"]) == (12.5, "en")
        assert (done["body"]["source"], done["body"]["status"]) == ("s3://media/done-job.mp4", "done")
        failed = got["failed-job"]["body"]
        assert (failed["status"], failed["error"]) == ("failed", "PermanentMediaError: not media")
        assert got["cancelled-job"]["body"]["manifest"] is None and got["cancelled-job"]["body"]["result_uri"] is None
        assert client.xpending(EVENTS, notify.GROUP)["pending"] == 0  # every event acknowledged
    finally:
        receiver.close()


def test_a_receiver_that_fails_first_gets_one_delivery_per_event_it_acknowledged(broker, tmp_path):
    url, client, state = broker
    receiver = NotificationReceiver(SECRET, fail_first=2)  # 500, 500, then 200 for each event
    try:
        sender = notifier(receiver.url, client, tmp_path)
        for index in range(3):
            ended_job(state, f"j{index}", "done")
        run_until(lambda: len(receiver.acknowledged()) >= 3, sender, timeout=40)
        deadline = time.monotonic() + 3  # and nothing more comes
        while time.monotonic() < deadline:
            sender.step(block_ms=100)
        by_event: dict[str, list[int]] = {}
        for request in receiver.requests:
            by_event.setdefault(request["event_id"], []).append(request["status"])
        assert sorted(by_event.values()) == [[500, 500, 200]] * 3
        assert all(r["signed"] for r in receiver.requests)
        assert client.xpending(EVENTS, notify.GROUP)["pending"] == 0
    finally:
        receiver.close()


def test_an_unreachable_endpoint_is_logged_counted_and_given_up(broker, tmp_path, caplog):
    url, client, state = broker
    closed = f"http://127.0.0.1:{find_free_port()}/hook"
    sender = notifier(closed, client, tmp_path, notify_retry_seconds=0)
    labels = {"event": "failed", "outcome": "gave_up"}
    before = REGISTRY.get_sample_value("omniq_notifications_total", labels) or 0.0
    started = time.monotonic()
    ended_job(state, "j1", "failed", error="x")
    with caplog.at_level(logging.WARNING, logger="workers.notify"):
        run_until(lambda: (REGISTRY.get_sample_value("omniq_notifications_total", labels) or 0) > before, sender)
    assert time.monotonic() - started < 15  # one attempt (10 s timeout at most), then given up
    assert REGISTRY.get_sample_value("omniq_notifications_total", labels) == before + 1
    assert client.xpending(EVENTS, notify.GROUP)["pending"] == 0 and sender.pending == {}
    assert "given up" in caplog.text and "cannot reach 127.0.0.1" in caplog.text and SECRET not in caplog.text


def test_entries_left_by_a_dead_consumer_are_claimed_by_another(broker, tmp_path, monkeypatch):
    url, client, state = broker
    receiver = NotificationReceiver(SECRET)
    try:
        monkeypatch.setattr(notify, "CLAIM_IDLE_SECONDS", 0.5)
        dead = notifier(receiver.url, client, tmp_path, consumer="dead")
        ended_job(state, "j1", "done")
        client.xreadgroup(notify.GROUP, "dead", {EVENTS: ">"}, count=10)  # it took the entry, then its worker died
        assert receiver.requests == [] and dead.pending == {}
        alive = notifier(receiver.url, client, tmp_path, consumer="alive")
        time.sleep(0.6)
        run_until(lambda: len(receiver.acknowledged()) == 1, alive)
        assert receiver.requests[0]["body"]["job_id"] == "j1"
        assert client.xpending(EVENTS, notify.GROUP)["pending"] == 0
    finally:
        receiver.close()


def test_the_notification_settings_are_checked():
    assert check_target(Settings()) is None
    with pytest.raises(ConfigError, match="without OMNIQ_NOTIFY_SECRET"):
        check_target(Settings(notify_url="https://example.com/hook"))
    with pytest.raises(ConfigError, match="http:// or https://"):
        check_target(Settings(notify_url="file:///etc/passwd", notify_secret="s"))
    # RFC 4231, test case 2
    expected = "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert signature(b"Jefe", b"what do ya want for nothing?") == expected
