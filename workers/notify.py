"""HTTP notifications: each ended job (``done``, ``failed``, ``cancelled``) POSTed to ``OMNIQ_NOTIFY_URL``.

The notifier reads the job event stream (``workers.job_events``) in the consumer group ``omniq-notify``; every
worker runs one in a thread when the URL is set, so each event is delivered by one of them. A delivery is
JSON signed with HMAC-SHA256 (``X-Omniq-Signature: sha256=<hex>`` of the exact body, secret
``OMNIQ_NOTIFY_SECRET``); the body holds its send time, also in ``X-Omniq-Timestamp``, so a receiver can refuse
replays. Any answer but 2xx, or no answer, is retried with backoff until ``OMNIQ_NOTIFY_RETRY_SECONDS`` have
passed since the first try; then it is given up, logged and counted. Jobs never wait for a delivery: the
notifier only reads the stream. An event is acknowledged in the group once the receiver answered 2xx (or it
was given up): a receiver that answered 2xx gets no second delivery of that event, unless the worker dies
between its answer and the acknowledgement (the ``X-Omniq-Event-Id`` header lets it drop such a repeat).
Entries a dead worker had taken are claimed by another after ``CLAIM_IDLE_SECONDS``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from pipeline.config import Settings
from pipeline.errors import ConfigError, OmniqError
from pipeline.spec import results_prefix
from pipeline.storage import Storage
from workers import metrics
from workers.job_events import ENDED, JobEvent
from workers.state import EVENTS

log = logging.getLogger(__name__)

GROUP = "omniq-notify"
CLAIM_IDLE_SECONDS = 120.0  # an entry a consumer took and has not touched for this long is another's to send
REQUEST_TIMEOUT_SECONDS = 10.0
MANIFEST_FIELDS = (
    "status", "run_id", "model", "random_weights", "duration_s", "chunks", "language", "speech_s", "segments",
    "cues", "tokens", "finished_at", "error", "rows", "failed_rows",
)  # fmt: skip


def check_target(settings: Settings) -> tuple[str, bytes] | None:
    """The URL and secret to notify, or None when notifications are off; ConfigError for a half setup."""
    url = (settings.notify_url or "").strip()
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"OMNIQ_NOTIFY_URL={url!r}: give an http:// or https:// URL")
    secret = settings.notify_secret.get_secret_value() if settings.notify_secret else ""
    if not secret:
        raise ConfigError("OMNIQ_NOTIFY_URL is set without OMNIQ_NOTIFY_SECRET: give the secret that signs deliveries")
    return url, secret.encode()


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Omniq-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a redirect is an answer that is not 2xx
        return None


_opener = urllib.request.build_opener(_NoRedirects)


@dataclass
class _Pending:
    event: JobEvent
    first_at: float
    next_at: float
    attempts: int = 0


class Notifier:
    """One consumer of the group; ``step`` does one round, ``run`` loops until stopped."""

    def __init__(self, client: redis.Redis, storage: Storage, settings: Settings, consumer: str) -> None:
        target = check_target(settings)
        if target is None:
            raise ConfigError("notifications are off: set OMNIQ_NOTIFY_URL and OMNIQ_NOTIFY_SECRET")
        self.url, self.secret = target
        self.client, self.storage, self.settings, self.consumer = client, storage, settings, consumer
        self.pending: dict[str, _Pending] = {}

    def ensure_group(self) -> None:
        """Create the group at the end of the stream: events from before notifications were on are not sent."""
        try:
            self.client.xgroup_create(EVENTS, GROUP, id="$", mkstream=True)
        except redis.exceptions.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def step(self, block_ms: int = 1000) -> None:
        now = time.time()
        self._claim_abandoned(now)
        due = [p for p in self.pending.values() if p.next_at <= now]
        wait = None if due else self._wait_ms(now, block_ms)
        answer = self.client.xreadgroup(GROUP, self.consumer, {EVENTS: ">"}, count=100, block=wait)
        for _, entries in answer or []:
            for entry_id, fields in entries:
                self._take(JobEvent.from_entry(entry_id, fields), time.time())
        for entry_id, pending in list(self.pending.items()):
            if pending.next_at <= time.time():
                self._attempt(entry_id, pending)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.ensure_group()
                while not stop.is_set():
                    self.step()
            except redis.exceptions.RedisError as error:
                log.warning("notifications: Redis is unavailable (%s); trying again", error)
                stop.wait(5.0)
            except Exception:  # a notifier must outlive any one bad event
                log.exception("notifications: unexpected error; trying again")
                stop.wait(5.0)

    # -- internals ------------------------------------------------------------------------------------------

    def _wait_ms(self, now: float, block_ms: int) -> int:
        if not self.pending:
            return block_ms
        soonest = min(p.next_at for p in self.pending.values())
        return max(1, min(block_ms, int((soonest - now) * 1000)))

    def _take(self, event: JobEvent, now: float) -> None:
        if event.event not in ENDED:
            self.client.xack(EVENTS, GROUP, event.id)  # nothing to send for this kind of event
            return
        self.pending.setdefault(event.id, _Pending(event, now, now))

    def _claim_abandoned(self, now: float) -> None:
        """Take over entries that a consumer took and left (its worker died) after ``CLAIM_IDLE_SECONDS``."""
        _, entries, *_ = self.client.xautoclaim(
            EVENTS, GROUP, self.consumer, min_idle_time=int(CLAIM_IDLE_SECONDS * 1000), count=100
        )
        for entry_id, fields in entries:
            if fields:  # None when the entry was trimmed from the stream meanwhile
                self._take(JobEvent.from_entry(entry_id, fields), now)
            else:
                self.client.xack(EVENTS, GROUP, entry_id)

    def _attempt(self, entry_id: str, pending: _Pending) -> None:
        pending.attempts += 1
        # keep the entry ours while it is retried: claiming resets its idle time for the other consumers
        self.client.xclaim(EVENTS, GROUP, self.consumer, 0, [entry_id], justid=True)
        problem = self._deliver(pending.event)
        labels = {"event": pending.event.event}
        if problem is None:
            self.client.xack(EVENTS, GROUP, entry_id)
            del self.pending[entry_id]
            metrics.NOTIFICATIONS.labels(outcome="delivered", **labels).inc()
            return
        elapsed = time.time() - pending.first_at
        if elapsed >= self.settings.notify_retry_seconds:
            self.client.xack(EVENTS, GROUP, entry_id)
            del self.pending[entry_id]
            metrics.NOTIFICATIONS.labels(outcome="gave_up", **labels).inc()
            log.error(
                "notification of job %s (%s) given up after %d attempts in %.0f s: %s",
                pending.event.job_id, pending.event.event, pending.attempts, elapsed, problem,
            )  # fmt: skip
            return
        delay = min(300.0, 2.0 ** min(pending.attempts, 10)) * random.uniform(0.75, 1.0)
        pending.next_at = time.time() + delay
        metrics.NOTIFICATIONS.labels(outcome="failed_attempt", **labels).inc()
        log.warning(
            "notification of job %s (%s) not delivered (%s); attempt %d again in %.0f s",
            pending.event.job_id, pending.event.event, problem, pending.attempts + 1, delay,
        )  # fmt: skip

    def _deliver(self, event: JobEvent) -> str | None:
        """POST the event; None when the receiver answered 2xx, else what went wrong."""
        document = self.payload(event)
        body = json.dumps(document, sort_keys=True).encode()
        request = urllib.request.Request(self.url, data=body, method="POST")  # noqa: S310 - http(s) only (check_target)
        request.add_header("Content-Type", "application/json")
        request.add_header("User-Agent", "omniq-notify")
        request.add_header("X-Omniq-Event", event.event)
        request.add_header("X-Omniq-Event-Id", event.id)
        request.add_header("X-Omniq-Timestamp", str(int(document["sent_at"])))
        request.add_header("X-Omniq-Signature", signature(self.secret, body))
        try:
            with _opener.open(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                response.read(65536)
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            return f"cannot reach {urlsplit(self.url).netloc} ({reason})"

    def payload(self, event: JobEvent) -> dict[str, Any]:
        """What a receiver gets: the event, where the results are, and the manifest's main fields."""
        key = f"{results_prefix(event.media_id)}/manifest.json"
        manifest: dict[str, Any] | None = None
        if event.event in ("done", "partial", "failed") and event.media_id:
            try:
                document = json.loads(self.storage.get_bytes(key))
                if document.get("job_id") == event.job_id:  # another run's manifest is not this job's
                    manifest = {name: document.get(name) for name in MANIFEST_FIELDS}
            except (OmniqError, ValueError):
                manifest = None
        return {
            "event": event.event,
            "event_id": event.id,
            "job_id": event.job_id,
            "media_id": event.media_id,
            "source": event.source,
            "tag": event.tag,
            "status": event.status,
            "error": event.error,
            "failed_rows": event.failed_rows,
            "result_uri": self.storage.uri(key) if manifest is not None else None,
            "manifest": manifest,
            "at": event.at,
            "sent_at": time.time(),
        }


def start(name: str, settings: Settings) -> threading.Event | None:
    """Start this worker's notifier thread when ``OMNIQ_NOTIFY_URL`` is set; set the event to stop it."""
    if check_target(settings) is None:
        return None
    from pipeline.storage import open_storage
    from workers.state import JobState

    client = JobState.from_url(settings.broker_url, retry_seconds=0).redis
    notifier = Notifier(client, open_storage(settings.storage_url, settings), settings, consumer=name)
    stop = threading.Event()
    threading.Thread(target=notifier.run, args=(stop,), name="omniq-notify", daemon=True).start()
    return stop
