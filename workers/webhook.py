"""The HTTP trigger: S3-style event JSON (MinIO's webhook target) → jobs, behind a bearer token."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError
from workers.events import (
    EnqueueFn,
    KeyFilter,
    MalformedEvent,
    count,
    handle_events,
    log_outcomes,
    parse_message,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
HEALTH_PATHS = ("/healthz", "/health")


class WebhookServer(ThreadingHTTPServer):
    """A threading HTTP server that carries what its handlers need."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], settings: Settings, enqueue_fn: EnqueueFn, token: str) -> None:
        super().__init__(address, WebhookHandler)
        self.token = token
        self.key_filter = KeyFilter.from_settings(settings)
        self.enqueue_fn = enqueue_fn


class WebhookHandler(BaseHTTPRequestHandler):
    """``POST`` (any path but health) with a bearer token: S3-style event JSON; ``GET /healthz``: liveness."""

    server: WebhookServer
    timeout = 30  # seconds a client may take to send its request
    server_version = "omniq-webhook"
    sys_version = ""

    def do_GET(self) -> None:
        if urlparse(self.path).path in HEALTH_PATHS:
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": "not found: POST events to this server, GET /healthz for health"})

    def do_HEAD(self) -> None:  # MinIO probes its target with HEAD; any answer means it is up
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        if urlparse(self.path).path in HEALTH_PATHS:
            self._reply(405, {"error": f"{self.path} answers GET only"})
            return
        length = self._content_length()
        if length is None:
            return
        if not self._authorized():
            self._discard(length)
            self._reply(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"})
            return
        if length > MAX_BODY_BYTES:
            self._reply(413, {"error": f"body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit"})
            return
        try:
            events = parse_message(self.rfile.read(length))
        except MalformedEvent as error:
            self._reply(400, {"error": str(error)})
            return
        outcomes = handle_events(events, self.server.key_filter, self.server.enqueue_fn)
        log_outcomes(outcomes)
        totals = count(outcomes)
        # 503 makes the sender retry later (MinIO keeps undelivered events in its queue_dir)
        status = 503 if totals["failed"] else 200
        self._reply(status, {"events": len(events), **totals, "results": [o.to_dict() for o in outcomes]})

    def _content_length(self) -> int | None:
        header = self.headers.get("Content-Length")
        if header is None:
            self._reply(411, {"error": "a Content-Length header is required"})
            return None
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length < 0:
            self._reply(400, {"error": f"Content-Length {header!r} is not a byte count"})
            return None
        return length

    def _authorized(self) -> bool:
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        return hmac.compare_digest(given.strip().encode(), self.server.token.encode())

    def _discard(self, length: int) -> None:
        """Read a small unread body so closing the connection does not reset it before the client reads."""
        if length <= MAX_BODY_BYTES:
            self.rfile.read(length)

    def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)  # the request line: never headers


def make_webhook_server(
    host: str, port: int, settings: Settings, enqueue_fn: EnqueueFn, token: str | None = None
) -> WebhookServer:
    """A bound, not yet serving webhook server (port 0 picks a free port: see ``server_address``)."""
    return WebhookServer((host, port), settings, enqueue_fn, token or webhook_token(settings))


def webhook_token(settings: Settings) -> str:
    """The bearer token senders must present; the webhook does not start without one."""
    token = settings.webhook_token.get_secret_value() if settings.webhook_token is not None else ""
    if not token:
        raise ConfigError(
            "the webhook needs a bearer token: set OMNIQ_WEBHOOK_TOKEN (e.g. to `openssl rand -hex 32`) and give "
            "the same value to the sender (MinIO: notify_webhook auth_token)"
        )
    return token


def serve_webhook(
    host: str,
    port: int,
    settings: Settings,
    enqueue_fn: EnqueueFn,
    token: str | None = None,
    *,
    stop: threading.Event | None = None,
) -> None:
    """Serve the webhook until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
    stop = stop or threading.Event()
    server = make_webhook_server(host, port, settings, enqueue_fn, token)
    thread = threading.Thread(target=server.serve_forever, name="omniq-webhook", daemon=True)
    thread.start()
    log.info("webhook listening on http://%s:%d (GET /healthz for health)", *server.server_address[:2])
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
