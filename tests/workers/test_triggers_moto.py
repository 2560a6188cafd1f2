"""The SQS listener against a real endpoint: moto in server mode delivers bucket notifications over HTTP to
SQS (directly, through SNS, through EventBridge) the way AWS does, and the listener consumes them."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from pipeline import job
from pipeline.config import Settings
from tests.conftest import use_broker
from tests.moto_server import MotoServer
from tests.workers.test_triggers import FakeProducer
from workers.state import JobState
from workers.triggers import ListenStats, default_enqueue_fn, listen_sqs
from workers.triggers.events import parse_message

pytestmark = pytest.mark.slow

DEADLINE_SECONDS = 20.0


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_environment(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials moto accepts, for the clients omniq builds from the standard AWS chain."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto.region)


def queue_with_arn(moto: MotoServer, name: str, **attributes: str) -> tuple[str, str]:
    sqs = moto.client("sqs")
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


@pytest.fixture
def bucket(moto: MotoServer) -> SimpleNamespace:
    """A fresh bucket that notifies a fresh queue of every creation and removal (S3 sends a TestEvent first)."""
    name = f"media-{uuid.uuid4().hex[:12]}"
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=name)
    queue_url, queue_arn = queue_with_arn(moto, f"events-{name}")
    s3.put_bucket_notification_configuration(
        Bucket=name,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]
        },
    )
    return SimpleNamespace(name=name, s3=s3, sqs=moto.client("sqs"), queue_url=queue_url, queue_name=f"events-{name}")


def multipart_upload(s3: Any, bucket: str, key: str, data: bytes) -> str:
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
    part = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=data)
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    return s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def waiting(sqs: Any, queue_url: str) -> int:
    """Messages in the queue, visible or in flight."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return sum(int(attributes[name]) for name in names)


def run_listener(
    queue: str, settings: Settings, enqueue_fn: Any, until: Callable[[], bool], **options: Any
) -> ListenStats:
    """Run ``listen_sqs`` in a thread until ``until()`` holds (or the deadline passes), then stop it."""
    stop = threading.Event()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["stats"] = listen_sqs(queue, settings, enqueue_fn, stop=stop, wait_seconds=1, **options)
        except BaseException as error:  # re-raised in the test's thread
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not until() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.1)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive(), "listen_sqs did not stop within 10 s of being asked"
    if "error" in result:
        raise result["error"]
    return result["stats"]


def listener_settings(moto: MotoServer, tmp_path: Any, **overrides: Any) -> Settings:
    return Settings(
        **{
            "storage_url": (tmp_path / "store").as_uri(),
            "sqs_endpoint_url": moto.endpoint_url,
            "s3_endpoint_url": moto.endpoint_url,
            **overrides,
        }
    )


def test_listener_enqueues_each_media_upload_once(moto, bucket, tmp_path):
    s3, name = bucket.s3, bucket.name
    s3.put_object(Bucket=name, Key="videos/a.mp4", Body=b"video a")
    s3.put_object(Bucket=name, Key="notes/readme.txt", Body=b"not media")
    s3.put_object(Bucket=name, Key="videos/my clip(v2).mp4", Body=b"spaces and parentheses")
    s3.put_object(Bucket=name, Key="videos/100% #1?.mp3", Body=b"characters URLs care about")
    multipart_upload(s3, name, "uploads/big.mov", b"m" * 1024)  # moto: ObjectCreated:Put + CompleteMultipartUpload
    s3.put_object(Bucket=name, Key="videos/", Body=b"")  # a console "folder"
    s3.put_object(Bucket=name, Key="private/secret.mp4", Body=b"excluded")
    s3.delete_object(Bucket=name, Key="notes/readme.txt")  # ObjectRemoved:Delete
    messages = waiting(bucket.sqs, bucket.queue_url)
    assert messages == 10  # the TestEvent and nine object events

    producer = FakeProducer()
    settings = listener_settings(moto, tmp_path, trigger_exclude_prefixes="private/")
    stats = run_listener(
        f"sqs://{bucket.queue_url}", settings, producer, until=lambda: waiting(bucket.sqs, bucket.queue_url) == 0
    )

    assert sorted(producer.enqueued_keys) == [
        "uploads/big.mov",
        "videos/100% #1?.mp3",
        "videos/a.mp4",
        "videos/my clip(v2).mp4",
    ]
    assert (stats.enqueued, stats.skipped, stats.ignored) == (4, 1, 4)  # skipped: multipart's second event
    assert (stats.messages, stats.deleted, stats.kept, stats.malformed, stats.errors) == (10, 10, 0, 0, 0)
    assert waiting(bucket.sqs, bucket.queue_url) == 0


def test_messages_stay_queued_while_enqueue_fails(moto, bucket, tmp_path):
    """Redis down: nothing is deleted, SQS delivers the upload again after the visibility timeout."""
    bucket.s3.put_object(Bucket=bucket.name, Key="videos/a.mp4", Body=b"video a")
    producer = FakeProducer(fail=ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."))
    stats = run_listener(
        bucket.queue_name,  # a bare name, looked up with GetQueueUrl
        listener_settings(moto, tmp_path),
        producer,
        until=lambda: len(producer.calls) >= 2,
        visibility_timeout=1,
    )
    assert len(producer.calls) >= 2 and stats.failed >= 2
    assert stats.deleted == 1  # only the TestEvent, which needs no job
    time.sleep(1.1)  # let the last receive's visibility timeout lapse
    (message,) = bucket.sqs.receive_message(
        QueueUrl=bucket.queue_url, WaitTimeSeconds=1, AttributeNames=["ApproximateReceiveCount"]
    )["Messages"]
    assert int(message["Attributes"]["ApproximateReceiveCount"]) >= 3
    assert [e.key for e in parse_message(message["Body"])] == ["videos/a.mp4"]


def test_sns_and_eventbridge_deliveries(moto, tmp_path):
    """S3 → SNS → SQS and S3 → EventBridge → SQS: the envelopes moto builds like AWS, each upload once."""
    name = f"media-{uuid.uuid4().hex[:12]}"
    s3, sns, events = moto.client("s3"), moto.client("sns"), moto.client("events")
    s3.create_bucket(Bucket=name)
    sns_queue, sns_queue_arn = queue_with_arn(moto, f"sns-{name}")
    topic = sns.create_topic(Name=f"topic-{name}")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=sns_queue_arn)
    eb_queue, eb_queue_arn = queue_with_arn(moto, f"eb-{name}")
    events.put_rule(
        Name=f"rule-{name}", EventPattern=json.dumps({"source": ["aws.s3"], "resources": [f"arn:aws:s3:::{name}"]})
    )
    events.put_targets(Rule=f"rule-{name}", Targets=[{"Id": "omniq", "Arn": eb_queue_arn}])
    s3.put_bucket_notification_configuration(
        Bucket=name,
        NotificationConfiguration={
            "TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}],
            "EventBridgeConfiguration": {},
        },
    )
    s3.put_object(Bucket=name, Key="in/my talk.mp4", Body=b"talk")
    s3.put_object(Bucket=name, Key="in/slides.pdf", Body=b"pdf")
    sqs = moto.client("sqs")

    shapes = set()
    for queue in (sns_queue, eb_queue):  # peek: VisibilityTimeout=0 leaves them for the listener
        for message in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, VisibilityTimeout=0)["Messages"]:
            shapes |= {(e.shape, e.key) for e in parse_message(message["Body"]) if e.is_created}
    assert shapes == {
        ("sns/s3", "in/my talk.mp4"),
        ("sns/s3", "in/slides.pdf"),
        ("eventbridge", "in/my talk.mp4"),
        ("eventbridge", "in/slides.pdf"),
    }

    settings = listener_settings(moto, tmp_path)
    for queue in (sns_queue, eb_queue):
        producer = FakeProducer()
        stats = run_listener(queue, settings, producer, until=lambda q=queue: waiting(sqs, q) == 0)
        assert producer.enqueued_keys == ["in/my talk.mp4"]
        assert stats.deleted == stats.messages and stats.kept == 0 and waiting(sqs, queue) == 0


# -- with the real producer: Redis job state and the Celery broker ------------------------------------


@pytest.fixture
def broker(redis_url):
    """A clean Redis database for this test, used as broker and job state."""
    url = redis_url.rsplit("/", 1)[0] + "/6"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()

    previous = use_broker(url)
    yield url, client
    client.flushdb()
    use_broker(previous)


def queued_messages(client: redis.Redis, queue: str = "media") -> int:
    return sum(client.llen(key) for key in [queue] + [f"{queue}:{p}" for p in range(1, 10)])


def test_duplicate_and_out_of_order_events_make_one_job_per_object(moto, bucket, broker, tmp_path):
    """Every event arrives alone (one message per receive), old after new, some twice: one job per object,
    for the content the object has now."""
    url, client = broker
    s3, name = bucket.s3, bucket.name
    s3.put_object(Bucket=name, Key="in/talk.mp4", Body=b"first take")
    multipart_upload(s3, name, "in/big.mov", b"b" * 2048)
    s3.put_object(Bucket=name, Key="in/talk.mp4", Body=b"second take, overwriting the first")
    current = s3.head_object(Bucket=name, Key="in/talk.mp4")["ETag"].strip('"')

    by_kind = {}  # take the five messages S3 sent, to send them back in a worse order
    while waiting(bucket.sqs, bucket.queue_url):
        for message in bucket.sqs.receive_message(QueueUrl=bucket.queue_url, MaxNumberOfMessages=10)["Messages"]:
            events = parse_message(message["Body"])
            kind = "test" if not events else f"{events[0].key}:{events[0].event_name}:{events[0].etag == current}"
            by_kind[kind] = message["Body"]
            bucket.sqs.delete_message(QueueUrl=bucket.queue_url, ReceiptHandle=message["ReceiptHandle"])
    order = [
        "in/talk.mp4:ObjectCreated:Put:True",  # the newest event first
        "in/big.mov:ObjectCreated:CompleteMultipartUpload:False",
        "in/talk.mp4:ObjectCreated:Put:False",  # the overwritten content's event, late
        "in/big.mov:ObjectCreated:Put:False",
        "in/talk.mp4:ObjectCreated:Put:False",  # and again
        "test",
    ]
    assert sorted(by_kind) == sorted(set(order))
    for kind in order:
        bucket.sqs.send_message(QueueUrl=bucket.queue_url, MessageBody=by_kind[kind])

    settings = listener_settings(moto, tmp_path, broker_url=url)
    stats = run_listener(
        bucket.queue_url,
        settings,
        default_enqueue_fn(settings, tag="uploads"),
        until=lambda: waiting(bucket.sqs, bucket.queue_url) == 0,
        max_messages=1,
    )

    jobs = JobState(client).recent()
    assert sorted(j["source"] for j in jobs) == [f"s3://{name}/in/big.mov", f"s3://{name}/in/talk.mp4"]
    assert all(j["status"] == "queued" for j in jobs)
    talk = job.make_spec(f"s3://{name}/in/talk.mp4", settings)
    assert talk.fingerprint.startswith(f"etag={current};") and talk.job_id in {j["job_id"] for j in jobs}
    assert queued_messages(client) == 2  # one ingest message per object
    assert (stats.enqueued, stats.skipped, stats.ignored, stats.rejected, stats.failed) == (2, 3, 0, 0, 0)
    assert (stats.messages, stats.deleted) == (6, 6) and waiting(bucket.sqs, bucket.queue_url) == 0
