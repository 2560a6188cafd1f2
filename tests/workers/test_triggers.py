"""Triggers without a cloud: event parsing on real-world payloads, filters, batch dedupe, the webhook over real
HTTP on 127.0.0.1, the Lambda handler and the CLI. The SQS listener against moto is in test_triggers_moto.py."""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError, TransientError
from pipeline.storage import split_s3_uri
from tests.servers import find_free_port
from workers.cli.triggers import add_commands, cmd_listen, cmd_webhook
from workers.triggers import lambda_handler, make_webhook_server, parse_queue
from workers.triggers.events import KeyFilter, MalformedEvent, ObjectEvent, handle_events, parse_message
from workers.triggers.webhook import MAX_BODY_BYTES

TOKEN = "test-token-0123456789abcdef"

# -- payloads as real deployments send them -----------------------------------------------------------

AWS_S3_EVENT = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2024-05-01T12:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "203.0.113.5"},
            "responseElements": {
                "x-amz-request-id": "C3D13FE58DE4C810",
                "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "omniq-media",
                "bucket": {
                    "name": "media-in",
                    "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                    "arn": "arn:aws:s3:::media-in",
                },
                "object": {
                    "key": "videos/my+clip%28v2%29.mp4",
                    "size": 1048576,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "sequencer": "0055AED6DCD90281E5",
                },
            },
        }
    ]
}


def s3_event(key: str, name: str = "ObjectCreated:Put", etag: str = "abc123", size: int | None = 100) -> dict:
    """A raw S3 event for one object, its key form-encoded as S3 does."""
    from urllib.parse import quote_plus

    record = json.loads(json.dumps(AWS_S3_EVENT["Records"][0]))
    record["eventName"] = name
    record["s3"]["object"] = {"key": quote_plus(key, safe="/"), "eTag": etag, "sequencer": "0A1B2C3D4E5F"}
    if size is not None:
        record["s3"]["object"]["size"] = size
    return {"Records": [record]}


def sns_envelope(message: dict) -> dict:
    return {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:media-events",
        "Subject": "Amazon S3 Notification",
        "Message": json.dumps(message),
        "Timestamp": "2024-05-01T12:00:00.123Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQvi2egU3N858fiTDN6bkkOxYDVrY0Ad8L10Hs3zH81mtnPk5uvvolIC1CXGu43obcgFxeL3khZl8IKvO61GWB6jI9b5+gLPoBc1Q=",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=arn:aws:sns:us-east-1:123456789012:media-events:c9135db0",
    }


EVENTBRIDGE_EVENT = {
    "version": "0",
    "id": "17793124-05d4-b198-2fde-7ededc63b103",
    "detail-type": "Object Created",
    "source": "aws.s3",
    "account": "123456789012",
    "time": "2024-05-01T12:00:00Z",
    "region": "ca-central-1",
    "resources": ["arn:aws:s3:::media-in"],
    "detail": {
        "version": "0",
        "bucket": {"name": "media-in"},
        "object": {
            "key": "videos/my clip(v2).mp4",  # EventBridge does not encode keys: '+' here is a plus sign
            "size": 5,
            "etag": "b1946ac92492d2347c6235b4d2611184",
            "version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mppk5",
            "sequencer": "00617F08299329D189",
        },
        "request-id": "N4N7GDK58NMKJ12R",
        "requester": "123456789012",
        "source-ip-address": "1.2.3.4",
        "reason": "PutObject",
    },
}

MINIO_WEBHOOK_BODY = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "media-in/videos/my clip(v2).mp4",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": "2024-05-01T12:00:00.000Z",
            "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "172.17.0.1"},
            "responseElements": {
                "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
                "x-amz-request-id": "17C5B45B1D5B1F2E",
                "x-minio-deployment-id": "0170a4cc-dca6-4e72-86f1-c0cc760dff7f",
                "x-minio-origin-endpoint": "http://172.17.0.2:9000",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {
                    "name": "media-in",
                    "ownerIdentity": {"principalId": "minioadmin"},
                    "arn": "arn:aws:s3:::media-in",
                },
                "object": {
                    "key": "videos%2Fmy+clip%28v2%29.mp4",  # Go's url.QueryEscape: '/' too
                    "size": 224662,
                    "eTag": "5fc7298143efe1276d39a3466d4e255f-1",
                    "contentType": "video/mp4",
                    "userMetadata": {"content-type": "video/mp4"},
                    "sequencer": "17C5B45B1D6E7A3C",
                },
            },
            "source": {"host": "172.17.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"},
        }
    ],
}

TEST_EVENT = {
    "Service": "Amazon S3",
    "Event": "s3:TestEvent",
    "Time": "2024-05-01T12:00:00.000Z",
    "Bucket": "media-in",
    "RequestId": "5582815E1AEA5ADF",
    "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
}


# -- a recording stand-in for workers.producer.enqueue ------------------------------------------------


@dataclass
class Recorded:
    source: str
    job_id: str | None
    status: str
    reason: str | None = None


@dataclass
class FakeProducer:
    """Records each call; like the producer, a source it has seen before comes back ``skipped``."""

    fail: Exception | None = None
    reject: set[str] = field(default_factory=set)  # keys to reject
    calls: list[list[str]] = field(default_factory=list)
    jobs: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, sources: list[str]) -> list[Recorded]:
        with self.lock:
            self.calls.append(list(sources))
            if self.fail is not None:
                raise self.fail
            outcomes = []
            for source in sources:
                if split_s3_uri(source)[1] in self.reject:
                    outcomes.append(Recorded(source, None, "rejected", "not found"))
                elif source in self.jobs:
                    outcomes.append(Recorded(source, self.jobs[source], "skipped", "already queued"))
                else:
                    self.jobs[source] = f"job-{len(self.jobs)}"
                    outcomes.append(Recorded(source, self.jobs[source], "enqueued"))
            return outcomes

    @property
    def enqueued_keys(self) -> list[str]:
        """Keys of the objects that got a job, in order; a key twice here would be a duplicate job."""
        return [split_s3_uri(uri)[1] for uri in self.jobs]


def settings(**overrides: object) -> Settings:
    return Settings(**{"storage_url": "file:///tmp/omniq-test-store", **overrides})


# -- parsing ------------------------------------------------------------------------------------------


def test_raw_s3_event_key_is_decoded():
    (event,) = parse_message(json.dumps(AWS_S3_EVENT))
    assert event == ObjectEvent(
        "media-in",
        "videos/my clip(v2).mp4",
        "ObjectCreated:Put",
        1048576,
        "d41d8cd98f00b204e9800998ecf8427e",
        "0055AED6DCD90281E5",
        "s3",
    )
    assert event.is_created


def test_sns_envelope_is_unwrapped():
    (event,) = parse_message(json.dumps(sns_envelope(AWS_S3_EVENT)))
    assert (event.bucket, event.key, event.shape) == ("media-in", "videos/my clip(v2).mp4", "sns/s3")


def test_sns_to_lambda_records_are_unwrapped():
    envelope = sns_envelope(AWS_S3_EVENT)
    lambda_event = {"Records": [{"EventSource": "aws:sns", "EventVersion": "1.0", "Sns": envelope}]}
    assert [e.key for e in parse_message(lambda_event)] == ["videos/my clip(v2).mp4"]


def test_eventbridge_key_is_not_decoded():
    body = json.loads(json.dumps(EVENTBRIDGE_EVENT))
    body["detail"]["object"]["key"] = "videos/a+b%20c.mp4"
    (event,) = parse_message(body)
    assert (event.key, event.event_name, event.etag, event.shape) == (
        "videos/a+b%20c.mp4",
        "ObjectCreated:Put",
        "b1946ac92492d2347c6235b4d2611184",
        "eventbridge",
    )


def test_eventbridge_other_detail_types_are_not_creations():
    body = {**EVENTBRIDGE_EVENT, "detail-type": "Object Deleted"}
    (event,) = parse_message(body)
    assert not event.is_created


def test_minio_webhook_body():
    (event,) = parse_message(json.dumps(MINIO_WEBHOOK_BODY).encode())
    assert (event.bucket, event.key, event.event_name, event.shape) == (
        "media-in",
        "videos/my clip(v2).mp4",
        "ObjectCreated:Put",
        "minio",
    )


def test_minio_top_level_key_without_records():
    (event,) = parse_message({"EventName": "s3:ObjectCreated:Put", "Key": "media-in/videos/a b.mp4"})
    assert (event.bucket, event.key, event.event_name) == ("media-in", "videos/a b.mp4", "ObjectCreated:Put")


def test_test_event_and_subscription_confirmation_are_ignored(caplog):
    assert parse_message(TEST_EVENT) == []
    assert parse_message(sns_envelope(TEST_EVENT)) == []
    confirmation = {**sns_envelope({}), "Type": "SubscriptionConfirmation", "Token": "secret-ish"}
    with caplog.at_level(logging.WARNING, logger="workers.triggers.events"):
        assert parse_message(confirmation) == []
    assert "SubscriptionConfirmation" in caplog.text and "secret-ish" not in caplog.text


def test_removed_and_multipart_events():
    (removed,) = parse_message(s3_event("videos/a.mp4", "ObjectRemoved:Delete", size=None))
    assert not removed.is_created and removed.size is None
    (multipart,) = parse_message(s3_event("videos/big.mov", "ObjectCreated:CompleteMultipartUpload", "9f0e-3"))
    assert multipart.is_created and multipart.etag == "9f0e-3"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "not JSON"),
        ("[" * 100_000, "not JSON"),  # nesting deeper than the parser's recursion limit
        ("[1, 2]", "JSON list"),
        ({"hello": "world"}, "not an S3 event notification"),
        ({"Records": {"a": 1}}, "not a list"),
        ({"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "bkt"}}}]}, "s3.object.key"),
        ({"Records": [{"eventSource": "aws:sqs", "body": "{}"}]}, "no 'eventName'"),
        (s3_event("a.mp4") | {"Records": [{**s3_event("a.mp4")["Records"][0], "s3": {"bucket": {}}}]}, "bucket"),
        ({**sns_envelope({}), "Message": "not json"}, "SNS Message is not JSON"),
        ({"detail-type": "Object Created", "source": "aws.s3"}, "detail"),
        ({"EventName": "s3:ObjectCreated:Put", "Key": "no-slash"}, "bucket/key"),
    ],
)
def test_malformed_messages_say_why(body, reason):
    with pytest.raises(MalformedEvent, match=reason):
        parse_message(body)


def test_bad_size_is_malformed():
    body = s3_event("a.mp4")
    body["Records"][0]["s3"]["object"]["size"] = "lots"
    with pytest.raises(MalformedEvent, match="size"):
        parse_message(body)


# -- filters, URIs, batches ---------------------------------------------------------------------------


def event(key: str, size: int | None = 10, name: str = "ObjectCreated:Put", etag: str = "e1", bucket: str = "media-in"):
    return ObjectEvent(bucket, key, name, size, etag)


def test_key_filter_reasons():
    key_filter = KeyFilter.from_settings(
        settings(trigger_include_prefixes="in/, shows/", trigger_exclude_prefixes="in/private/")
    )
    assert key_filter.skip_reason(event("in/a.MP4")) is None
    assert key_filter.skip_reason(event("shows/s1/e1.flac")) is None
    assert "not a media file (.txt)" in key_filter.skip_reason(event("in/notes.txt"))
    assert "no extension" in key_filter.skip_reason(event("in/README"))
    assert "folder" in key_filter.skip_reason(event("in/new folder/", size=0))
    assert "empty" in key_filter.skip_reason(event("in/empty.mp4", size=0))
    assert "excluded prefix" in key_filter.skip_reason(event("in/private/a.mp4"))
    assert "INCLUDE_PREFIXES" in key_filter.skip_reason(event("elsewhere/a.mp4"))
    assert "not an object creation" in key_filter.skip_reason(event("in/a.mp4", name="ObjectRemoved:Delete"))


def test_omniqs_own_store_never_triggers():
    key_filter = KeyFilter.from_settings(settings(storage_url="s3://media-in/omniq"))
    assert "own store" in key_filter.skip_reason(event("omniq/work/j1/chunks/0/audio.wav"))
    assert key_filter.skip_reason(event("omniq-uploads/a.wav")) is None
    assert key_filter.skip_reason(event("omniq/work/a.wav", bucket="other")) is None
    at_root = KeyFilter.from_settings(settings(storage_url="s3://media-in"))
    assert "own store" in at_root.skip_reason(event("results/m1/x.wav"))


@pytest.mark.parametrize("key", ["videos/my clip(v2).mp4", "a/100%25 #1?.mp4", "ünï/cödé+plus.mp3"])
def test_uri_names_exactly_the_key(key):
    assert split_s3_uri(event(key).uri) == ("media-in", key)


def test_duplicate_events_in_one_batch_enqueue_once():
    producer = FakeProducer()
    events = [event("in/a.mp4"), event("in/a.mp4"), event("in/b.mp3"), event("in/c.txt")]
    outcomes = handle_events(events, KeyFilter.from_settings(settings()), producer)
    assert producer.calls == [["s3://media-in/in/a.mp4", "s3://media-in/in/b.mp3"]]
    assert [o.status for o in outcomes] == ["enqueued", "skipped", "enqueued", "ignored"]
    assert outcomes[0].job_id == outcomes[1].job_id


def test_out_of_order_events_name_the_current_object():
    """A late event for an overwritten object's old ETag enqueues the object as it is now, once."""
    producer = FakeProducer()
    key_filter = KeyFilter.from_settings(settings())
    newer, older = event("in/a.mp4", etag="v2"), event("in/a.mp4", etag="v1")
    handle_events([newer, older], key_filter, producer)  # both in one batch
    handle_events([older], key_filter, producer)  # or the old one alone, later
    assert producer.calls == [["s3://media-in/in/a.mp4"], ["s3://media-in/in/a.mp4"]]
    assert producer.enqueued_keys == ["in/a.mp4"]


def test_enqueue_failure_and_bad_answers_become_failed():
    key_filter = KeyFilter.from_settings(settings())
    down = handle_events([event("a.mp4"), event("b.txt")], key_filter, FakeProducer(fail=ConnectionError("Redis")))
    assert [o.status for o in down] == ["failed", "ignored"] and "ConnectionError" in down[0].reason
    short = handle_events([event("a.mp4")], key_filter, lambda sources: [])
    assert short[0].status == "failed" and "0 outcomes for 1" in short[0].reason


# -- queues -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue", "url", "endpoint", "region"),
    [
        (
            "sqs://https://sqs.eu-west-1.amazonaws.com/123456789012/media",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/media",
            None,
            "eu-west-1",
        ),
        (
            "sqs://sqs.ap-southeast-2.amazonaws.com/123456789012/media",
            "https://sqs.ap-southeast-2.amazonaws.com/123456789012/media",
            None,
            "ap-southeast-2",
        ),
        (
            "https://queue.amazonaws.com/123456789012/media",
            "https://queue.amazonaws.com/123456789012/media",
            None,
            "us-east-1",
        ),
        (
            "sqs://http://127.0.0.1:9324/000000000000/media",
            "http://127.0.0.1:9324/000000000000/media",
            "http://127.0.0.1:9324",
            None,
        ),
    ],
)
def test_parse_queue_urls(queue, url, endpoint, region):
    target = parse_queue(queue, settings())
    assert (target.url, target.name, target.endpoint_url, target.region) == (url, "media", endpoint, region)


def test_parse_queue_names_and_configured_endpoint():
    configured = settings(sqs_endpoint_url="http://elasticmq:9324", s3_region="eu-central-1")
    by_name = parse_queue("sqs://media-events", configured)
    assert (by_name.url, by_name.name, by_name.endpoint_url, by_name.region) == (
        None,
        "media-events",
        "http://elasticmq:9324",
        "eu-central-1",
    )
    assert parse_queue("http://localhost:4566/000000000000/q", configured).endpoint_url == "http://elasticmq:9324"
    with pytest.raises(ConfigError, match="empty"):
        parse_queue("sqs://", configured)


# -- webhook over real HTTP ---------------------------------------------------------------------------


@contextmanager
def running_webhook(**limits: float) -> Iterator[tuple[int, FakeProducer]]:
    """A webhook server on a free 127.0.0.1 port with a recording producer; yields (port, producer)."""
    producer = FakeProducer()
    server = make_webhook_server("127.0.0.1", 0, settings(), producer, TOKEN, **limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], producer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def webhook():
    with running_webhook() as started:
        yield started


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


def post(port: int, body: object, token: str | None = TOKEN, path: str = "/minio/events"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request(port, "POST", path, data, headers)


def connect(port: int) -> socket.socket:
    """A raw client socket whose every read and write gives up after 5 s."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_response(connection: socket.socket) -> tuple[int, http.client.HTTPMessage, bytes]:
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, response.headers, response.read()


def exchange(port: int, raw_request: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send bytes as they are (headers http.client would fix up included) and read the reply."""
    with connect(port) as connection:
        connection.sendall(raw_request)
        return read_response(connection)


def closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True


def seconds_until_closed(connection: socket.socket, limit: float) -> float:
    """Send a byte every 0.1 s until the server closes the connection (or ``limit`` seconds pass)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            connection.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([connection], [], [], 0.1)
        if readable:
            assert closed_by_server(connection), "the server answered instead of closing"
            break
    return time.monotonic() - started


def test_webhook_enqueues_a_minio_event(webhook):
    port, producer = webhook
    status, body = post(port, MINIO_WEBHOOK_BODY)
    assert status == 200
    assert {k: body[k] for k in ("events", "enqueued", "skipped", "ignored", "rejected", "failed")} == {
        "events": 1,
        "enqueued": 1,
        "skipped": 0,
        "ignored": 0,
        "rejected": 0,
        "failed": 0,
    }
    assert body["results"][0]["key"] == "videos/my clip(v2).mp4" and body["results"][0]["job_id"] == "job-0"
    assert producer.enqueued_keys == ["videos/my clip(v2).mp4"]
    status, again = post(port, MINIO_WEBHOOK_BODY, path="/")  # the same event twice: one job
    assert (status, again["skipped"], producer.enqueued_keys) == (200, 1, ["videos/my clip(v2).mp4"])


def test_webhook_needs_the_token(webhook, caplog):
    port, producer = webhook
    with caplog.at_level(logging.DEBUG):
        assert post(port, MINIO_WEBHOOK_BODY, token=None)[0] == 401
        assert post(port, MINIO_WEBHOOK_BODY, token="wrong")[0] == 401
        assert post(port, MINIO_WEBHOOK_BODY, token=TOKEN + "x")[0] == 401
        assert request(port, "POST", "/", json.dumps(MINIO_WEBHOOK_BODY).encode(), {"Authorization": TOKEN})[0] == 401
        status, _ = request(port, "POST", "/", b"{}", {"Authorization": f"bearer {TOKEN}"})  # scheme: any case
    assert status == 400
    assert producer.calls == []
    assert TOKEN not in caplog.text and "Authorization" not in caplog.text


def test_webhook_rejects_malformed_and_oversized_bodies(webhook):
    port, producer = webhook
    status, body = post(port, b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = post(port, {"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "bkt"}}}]})
    assert status == 400 and "s3.object.key" in body["error"]
    # a 2 MiB Content-Length is refused from the headers alone, before any of the body is read
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("POST", "/")
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.putheader("Content-Length", str(2 * 1024 * 1024))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    connection.close()
    assert producer.calls == []


def test_webhook_health_and_other_paths(webhook):
    port, _ = webhook
    assert request(port, "GET", "/healthz") == (200, {"status": "ok"})
    assert request(port, "GET", "/health")[0] == 200
    assert request(port, "GET", "/anything")[0] == 404
    assert request(port, "HEAD", "/minio/events")[0] == 200
    assert request(port, "POST", "/healthz", b"{}", {"Authorization": f"Bearer {TOKEN}"})[0] == 405


def test_webhook_answers_503_when_enqueue_fails(webhook):
    port, producer = webhook
    producer.fail = ConnectionError("Redis is down")
    status, body = post(port, MINIO_WEBHOOK_BODY)
    assert status == 503 and body["failed"] == 1


def test_webhook_answers_without_a_token_before_reading_the_body(webhook):
    """Only headers are sent: a server that waited for the 1 MiB body would not answer before the client's 5 s."""
    port, producer = webhook
    for authorization in ("", f"Authorization: Bearer {TOKEN}x\r\n"):
        with connect(port) as connection:
            head = f"POST / HTTP/1.1\r\nHost: omniq\r\n{authorization}Content-Length: {MAX_BODY_BYTES}\r\n\r\n"
            connection.sendall(head.encode())
            started = time.monotonic()
            status, headers, body = read_response(connection)
            assert (status, headers["WWW-Authenticate"], headers["Connection"]) == (401, "Bearer", "close")
            assert "bearer token" in json.loads(body)["error"]
            assert closed_by_server(connection) and time.monotonic() - started < 2
    assert producer.calls == []


def test_webhook_keeps_its_status_codes_for_bad_requests(webhook):
    port, producer = webhook
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    chunked = b"POST / HTTP/1.1\r\nHost: omniq\r\n%sTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert exchange(port, chunked % auth.encode())[0] == 411
    assert exchange(port, chunked % b"")[0] == 401  # the token is checked first
    for length in ("-1", "lots"):
        status, _, body = exchange(
            port, f"POST / HTTP/1.1\r\nHost: omniq\r\n{auth}Content-Length: {length}\r\n\r\n".encode()
        )
        assert status == 400 and "not a byte count" in json.loads(body)["error"]
    for method in ("PUT", "DELETE"):
        assert (
            exchange(port, f"{method} / HTTP/1.1\r\nHost: omniq\r\n{auth}Content-Length: 0\r\n\r\n".encode())[0] == 501
        )
    assert producer.calls == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nX-Slow: ",  # the headers never end
        f"POST / HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode(),  # nor the body
    ],
    ids=["headers", "body"],
)
def test_webhook_cuts_off_a_client_trickling_its_request(head):
    """A byte every 0.1 s never trips a per-read timeout; the request's overall deadline ends it."""
    deadline = 1.0
    with running_webhook(request_deadline=deadline) as (port, producer), connect(port) as connection:
        connection.sendall(head)
        elapsed = seconds_until_closed(connection, limit=deadline + 5)
        assert deadline - 0.1 < elapsed < deadline + 1.5
        assert producer.calls == []


def test_webhook_refuses_connections_over_its_cap_until_one_closes():
    with running_webhook(max_connections=2, request_deadline=10) as (port, _):
        held = [connect(port) for _ in range(2)]
        try:
            for connection in held:
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: omniq\r\n")  # the headers not ended yet
            status, headers, body = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: omniq\r\n\r\n")
            assert (status, headers["Retry-After"], headers["Connection"]) == (503, "5", "close")
            assert "too many connections" in json.loads(body)["error"]
            held[0].sendall(b"\r\n")  # a held connection is still served
            assert read_response(held[0])[0] == 200
        finally:
            for connection in held:
                connection.close()
        deadline = time.monotonic() + 5  # the server frees a slot just after its connection ends
        while (status := request(port, "GET", "/healthz")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200


def test_webhook_refuses_to_start_without_a_token():
    with pytest.raises(ConfigError, match="OMNIQ_WEBHOOK_TOKEN"):
        make_webhook_server("127.0.0.1", 0, settings(webhook_token=None), FakeProducer())
    server = make_webhook_server("127.0.0.1", 0, settings(webhook_token="from-settings"), FakeProducer())
    try:
        assert server.token == "from-settings"
    finally:
        server.server_close()


def test_webhook_command_serves_until_sigterm(tmp_path):
    """`omniq webhook` as a process (wired the way workers/cli/__init__.py wires it): no token → an error naming
    OMNIQ_WEBHOOK_TOKEN; with one → healthy, and SIGTERM stops it with exit status 0."""
    port = find_free_port()
    script = (
        "import argparse, logging, sys\n"
        "from pipeline.errors import OmniqError\n"
        "logging.basicConfig(level=logging.WARNING)  # as omniq's main() does\n"
        "from workers.cli.triggers import add_commands\n"
        "parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers())\n"
        "args = parser.parse_args(sys.argv[1:])\n"
        "try:\n    sys.exit(args.func(args))\n"
        "except OmniqError as error:\n    print(error, file=sys.stderr); sys.exit(2)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    env["OMNIQ_STORAGE_URL"] = tmp_path.as_uri()
    command = [sys.executable, "-c", script, "webhook", "--port", str(port)]
    missing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "OMNIQ_WEBHOOK_TOKEN" in missing.stderr
    env["OMNIQ_WEBHOOK_TOKEN"] = TOKEN
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert request(port, "GET", "/healthz") == (200, {"status": "ok"})
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "webhook listening on http://127.0.0.1:" in stderr and TOKEN not in stderr


# -- Lambda -------------------------------------------------------------------------------------------


def sqs_record(message_id: str, body: object) -> dict:
    return {
        "messageId": message_id,
        "receiptHandle": "AQEBwJnKyrHigUMZj6rYigCgxlaS3SLy0a...",
        "body": body if isinstance(body, str) else json.dumps(body),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1714564800000"},
        "messageAttributes": {},
        "md5OfBody": "e4e68fb7bd0e697a0ae8f1bb342846b3",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:media-events",
        "awsRegion": "us-east-1",
    }


def test_lambda_direct_s3_event():
    producer = FakeProducer()
    result = lambda_handler(AWS_S3_EVENT, None, enqueue_fn=producer, settings=settings())
    assert result["enqueued"] == 1 and producer.enqueued_keys == ["videos/my clip(v2).mp4"]
    assert lambda_handler(EVENTBRIDGE_EVENT, None, enqueue_fn=producer, settings=settings())["skipped"] == 1
    assert lambda_handler({"nonsense": 1}, None, enqueue_fn=producer, settings=settings())["malformed"]
    rejecting = FakeProducer(reject={"videos/my clip(v2).mp4"})
    with pytest.raises(TransientError, match="not found"):
        lambda_handler(AWS_S3_EVENT, None, enqueue_fn=rejecting, settings=settings())


def test_lambda_sqs_batch_reports_only_failed_messages():
    producer = FakeProducer(reject={"in/gone.mp4"})
    batch = {
        "Records": [
            sqs_record("m-ok", sns_envelope(s3_event("in/a.mp4"))),
            sqs_record("m-malformed", "{oops"),
            sqs_record("m-rejected", s3_event("in/gone.mp4")),
            sqs_record("m-test", TEST_EVENT),
            sqs_record("m-dup", s3_event("in/a.mp4")),
        ]
    }
    assert lambda_handler(batch, None, enqueue_fn=producer, settings=settings()) == {
        "batchItemFailures": [{"itemIdentifier": "m-rejected"}]
    }
    assert producer.calls == [["s3://media-in/in/a.mp4", "s3://media-in/in/gone.mp4"]]
    down = FakeProducer(fail=ConnectionError("Redis"))
    failures = lambda_handler(batch, None, enqueue_fn=down, settings=settings())["batchItemFailures"]
    assert [f["itemIdentifier"] for f in failures] == ["m-ok", "m-rejected", "m-dup"]


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_commands_parse():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    listen = parser.parse_args(["listen", "sqs://media-events", "--tag", "uploads", "--wait-seconds", "5"])
    assert (listen.func, listen.queue, listen.tag, listen.wait_seconds) == (
        cmd_listen,
        "sqs://media-events",
        "uploads",
        5,
    )
    webhook = parser.parse_args(["webhook", "--port", "9000"])
    assert (webhook.func, webhook.host, webhook.port, webhook.tag) == (cmd_webhook, "127.0.0.1", 9000, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["listen", "q", "--wait-seconds", "30"])
