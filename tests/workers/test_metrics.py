"""The metrics endpoint and the Flower command's safety checks."""

from __future__ import annotations

import base64
import http.client
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from pipeline.errors import ConfigError
from workers.metrics import serve_metrics


@pytest.fixture
def registry():
    registry = CollectorRegistry()
    Counter("omniq_test_things", "things", ["queue"], registry=registry).labels(queue="gpu").inc(3)
    return registry


def _get(url, auth=None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read().decode()


def test_metrics_endpoint_serves_prometheus_text(registry):
    server = serve_metrics("127.0.0.1", 0, registry, None)
    try:
        status, body = _get(f"http://127.0.0.1:{server.server_address[1]}/metrics")
        assert status == 200 and 'omniq_test_things_total{queue="gpu"} 3.0' in body
    finally:
        server.shutdown()


def test_metrics_basic_auth(registry):
    server = serve_metrics("127.0.0.1", 0, registry, "prom:s3cret")
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        for auth in (None, "prom:wrong"):
            with pytest.raises(urllib.error.HTTPError) as error:
                _get(url, auth)
            assert error.value.code == 401
        assert _get(url, "prom:s3cret")[0] == 200
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "authorization",
    [
        b"Basic !!!notbase64",
        b"Basic " + base64.b64encode(b"prom:s3cret")[:-1],  # padding cut off
        b"Basic \xff\xfe\xc3\x28",  # not even ASCII
        b"Basic " + base64.b64encode(b"\xff\xfe:\x80"),  # base64 of bytes that are not UTF-8
        b"Basic",
        b"Bearer " + base64.b64encode(b"prom:s3cret"),
    ],
)
def test_metrics_answer_401_to_a_malformed_authorization(registry, authorization):
    """Over a raw socket, as a client could send it: every malformed header gets the 401, never a dropped connection."""
    server = serve_metrics("127.0.0.1", 0, registry, "prom:s3cret")
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as connection:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: omniq\r\nAuthorization: " + authorization + b"\r\n\r\n")
            response = http.client.HTTPResponse(connection)
            response.begin()
            assert response.status == 401 and response.headers["WWW-Authenticate"] == 'Basic realm="omniq metrics"'
            assert response.read() == b""
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_beyond_loopback_need_auth(registry):
    with pytest.raises(ConfigError, match="OMNIQ_METRICS_BASIC_AUTH"):
        serve_metrics("0.0.0.0", 0, registry, None)


def test_flower_beyond_loopback_needs_basic_auth():
    completed = subprocess.run(
        [sys.executable, "-m", "workers.cli", "flower", "--address", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 2 and "OMNIQ_FLOWER_BASIC_AUTH" in completed.stderr
