"""Prometheus metrics of the workers, recorded in one place (the task base class and the engine hook).

Celery's prefork pool runs tasks in child processes, so metrics use prometheus_client's multiprocess
mode: ``omniq worker --metrics-port`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
anything imports this module, and serves the merged values of all children.
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

log = logging.getLogger(__name__)

LABELS = ("queue", "model")

MEDIA_SECONDS = Counter("omniq_media_seconds", "Seconds of media ingested", LABELS)
CHUNKS = Counter("omniq_chunks", "Chunks run through the model", LABELS)
JOBS = Counter("omniq_jobs", "Jobs that ended, by status", (*LABELS, "status"))
MODEL_SECONDS = Counter("omniq_model_seconds", "Seconds spent in generate calls", LABELS)
GENERATED_TOKENS = Counter("omniq_generated_tokens", "Tokens generated", LABELS)
ASR_SECONDS = Counter("omniq_asr_seconds", "Seconds Whisper spent transcribing", LABELS)
ASR_AUDIO_SECONDS = Counter("omniq_asr_audio_seconds", "Seconds of audio Whisper heard", LABELS)
TOKENS_PER_SECOND = Histogram(
    "omniq_generated_tokens_per_second",
    "Generation speed of each batch (new tokens of all rows / batch seconds)",
    LABELS,
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
BATCH_SIZE = Histogram("omniq_batch_size", "Rows per generate call", LABELS, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
FFMPEG_SECONDS = Histogram(
    "omniq_ffmpeg_seconds",
    "Wall time of the ffmpeg decode per file",
    LABELS,
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800),
)
QUEUE_WAIT = Histogram(
    "omniq_queue_wait_seconds",
    "Time from publishing a task to a worker starting it",
    (*LABELS, "task"),
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200),
)
TASK_SECONDS = Histogram(
    "omniq_task_seconds", "Task run time", (*LABELS, "task"), buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200)
)
DEADLINES = Counter(
    "omniq_deadlines_passed", "Steps and model calls stopped at their deadline (README Deadlines)", ("queue", "kind")
)  # kind: step (ingest, finalize: their ffmpeg killed) | model (generate, Whisper: the worker restarts)
RETRIES = Counter("omniq_task_retries", "Task retries after transient errors", (*LABELS, "task"))
RECOVERED = Counter(
    "omniq_recovered_units", "Units of work the watchdog sent again, by why", ("queue", "model", "reason")
)
NOTIFICATIONS = Counter(
    "omniq_notifications", "Job notifications to OMNIQ_NOTIFY_URL by outcome", ("event", "outcome")
)  # outcome: delivered | failed_attempt | gave_up
MALFORMED_MESSAGES = Counter(
    "omniq_malformed_messages", "Queue messages refused as not written by omniq (README Security)", ("queue", "task")
)
WORKER_DEATHS = Counter("omniq_worker_deaths", "Units whose worker died while running them", ("queue", "model"))


def merged_registry() -> CollectorRegistry:
    """The values of every process of this worker (multiprocess mode)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


class _MetricsHandler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    credentials: bytes | None = None  # b"user:password" when basic auth is on

    def do_GET(self) -> None:
        if self.credentials is not None and not self._authorized(self.credentials):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="omniq metrics"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.split("?")[0] not in ("/", "/metrics"):
            self.send_response(404)
            self.end_headers()
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self, credentials: bytes) -> bool:
        """Basic credentials compared in constant time; a malformed header is just not authorized (401)."""
        scheme, _, encoded = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except ValueError:  # binascii.Error (not base64) or text that is not ASCII
            return False
        return hmac.compare_digest(given, credentials)

    def log_message(self, format: str, *args: object) -> None:
        return


def serve_metrics(host: str, port: int, registry: CollectorRegistry, basic_auth: str | None) -> ThreadingHTTPServer:
    """Serve ``/metrics`` in a daemon thread. Beyond loopback, basic auth is required."""
    from pipeline.errors import ConfigError

    if host not in ("127.0.0.1", "localhost", "::1") and not basic_auth:
        raise ConfigError(
            f"--metrics-host {host} exposes metrics beyond this machine: set OMNIQ_METRICS_BASIC_AUTH=user:password "
            "(and configure basic_auth in Prometheus' scrape config)"
        )
    handler = type(
        "MetricsHandler",
        (_MetricsHandler,),
        {"registry": registry, "credentials": basic_auth.encode() if basic_auth else None},
    )
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="omniq-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
