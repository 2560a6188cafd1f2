"""The HTTP trigger: S3-style event JSON (MinIO's webhook target) → jobs, behind a bearer token."""

from __future__ import annotations

import hmac
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError
from workers.triggers.events import (
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
MAX_CONNECTIONS = 32  # connections served at once, each on its own thread
REQUEST_DEADLINE_SECONDS = 30.0  # from accepting a connection to having read its whole request
BUSY_RETRY_AFTER_SECONDS = 5
LINGER_SECONDS, LINGER_BYTES = 1.0, 64 * 1024  # closing after a refusal: how long and how much is drained
_BUSY_BODY = json.dumps({"error": "too many connections: retry later"}).encode()
_BUSY_REPLY = (
    "HTTP/1.0 503 Service Unavailable\r\n"
    "Content-Type: application/json\r\n"
    f"Content-Length: {len(_BUSY_BODY)}\r\n"
    f"Retry-After: {BUSY_RETRY_AFTER_SECONDS}\r\n"
    "Connection: close\r\n\r\n"
).encode() + _BUSY_BODY


class WebhookServer(ThreadingHTTPServer):
    """A threading HTTP server that carries what its handlers need and serves at most ``max_connections`` at once.

    A connection over the cap is answered ``503`` with ``Retry-After`` from the accepting thread and closed at
    once, without reading its request: waiting for a slot would hold the accept loop (or a thread per waiter),
    and the senders retry (MinIO keeps undelivered events in its queue_dir). Each request (headers and body)
    must arrive whole within ``request_deadline`` seconds of the connection's start, so a client trickling
    bytes holds its slot that long at most; the handler speaks HTTP/1.0, one request per connection.
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        settings: Settings,
        enqueue_fn: EnqueueFn,
        token: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_deadline: float = REQUEST_DEADLINE_SECONDS,
    ) -> None:
        super().__init__(address, WebhookHandler)
        self.token = token
        self.key_filter = KeyFilter.from_settings(settings)
        self.enqueue_fn = enqueue_fn
        self.max_connections = max_connections
        self.request_deadline = request_deadline
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Take a slot before starting the connection's thread; refuse the connection when none is free."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the thread that releases the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        """Send the 503 without blocking (it fits in a new socket's buffer) and close, so the accept loop goes on."""
        log.warning("webhook busy (%d connections): refused %s with 503", self.max_connections, client_address[0])
        try:
            request.setblocking(False)
            request.send(_BUSY_REPLY)
        except OSError as error:  # the client went away: nothing to answer
            log.debug("webhook could not answer %s: %s", client_address[0], error)
        self.shutdown_request(request)


class _DeadlineSocketReader(io.RawIOBase):
    """Socket reads that all end by one deadline: a per-read timeout alone lets a client trickling a byte
    at a time hold a connection for ever."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive before its deadline")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class WebhookHandler(BaseHTTPRequestHandler):
    """``POST`` (any path but health) with a bearer token: S3-style event JSON; ``GET /healthz``: liveness."""

    server: WebhookServer
    timeout = 10  # seconds to send a reply; reading the request has the server's request_deadline instead
    server_version = "omniq-webhook"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced: each of its reads would get the whole timeout again
        deadline = time.monotonic() + self.server.request_deadline
        self.rfile = io.BufferedReader(_DeadlineSocketReader(self.connection, deadline))

    _body_unread = False

    def finish(self) -> None:
        """After a reply sent before the body was read, close gently: a socket closed with unread data resets
        the connection, and the client may lose the reply. The end of the reply is signalled (FIN), then at
        most ``LINGER_BYTES`` are drained for ``LINGER_SECONDS`` while the client reads it; no more is read."""
        super().finish()
        if not self._body_unread:
            return
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            drained = 0
            while drained < LINGER_BYTES and (data := self.connection.recv(16384)):
                drained += len(data)
        except OSError:  # the client closed or stayed silent: either way the reply is on its way
            pass

    def end_headers(self) -> None:
        """Give the reply its own timeout, not what is left of the request's deadline (every reply passes here)."""
        self.connection.settimeout(self.timeout)
        super().end_headers()

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
        if not self._authorized():  # before the body: a sender without the token costs no read of it
            headers = {"WWW-Authenticate": "Bearer", "Connection": "close"}
            self._reply(401, {"error": "missing or wrong bearer token"}, headers)
            self._body_unread = True
            return
        length = self._content_length()
        if length is None:
            return
        if length > MAX_BODY_BYTES:
            self._reply(413, {"error": f"body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit"})
            self._body_unread = True
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
    host: str,
    port: int,
    settings: Settings,
    enqueue_fn: EnqueueFn,
    token: str | None = None,
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_deadline: float = REQUEST_DEADLINE_SECONDS,
) -> WebhookServer:
    """A bound, not yet serving webhook server (port 0 picks a free port: see ``server_address``)."""
    return WebhookServer(
        (host, port),
        settings,
        enqueue_fn,
        token or webhook_token(settings),
        max_connections=max_connections,
        request_deadline=request_deadline,
    )


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
