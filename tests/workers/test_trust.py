"""Trust boundaries (README "Security"): what a crafted S3 event or queue message can make omniq do.

Each test replays an input a review crafted against the real code and checks that it is refused at its cause.
"""

from __future__ import annotations

import json

import pytest

from pipeline.config import Settings
from pipeline.discover import Filters, discover
from pipeline.errors import ConfigError, LimitExceeded, TransientError
from pipeline.sources import fetch_source
from pipeline.storage import s3_client, split_s3_uri
from tests.workers.test_triggers import FakeProducer, s3_event, settings
from workers.events import KeyFilter, MalformedEvent, handle_messages, parse_message


def event_in(bucket: str, key: str) -> dict:
    body = s3_event(key)
    body["Records"][0]["s3"]["bucket"]["name"] = bucket
    return body


def minio_event(bucket_and_key: str) -> dict:
    return {"EventName": "s3:ObjectCreated:Put", "Key": bucket_and_key}


# -- S3 events -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bucket", "key", "overrides"),
    [
        # the include filter looked at the key alone: s3://private/hr/uploads/x.mp4 was enqueued
        ("private/hr", "uploads/x.mp4", {"trigger_include_prefixes": "uploads/"}),
        # the exclude filter too: s3://media/excluded/x.mp4 passed EXCLUDE_PREFIXES=excluded/
        ("media/excluded", "x.mp4", {"trigger_exclude_prefixes": "excluded/"}),
        # and the own-store filter: omniq's own chunk audio was enqueued
        ("omniq/store/work/j1/chunks/00000", "audio.wav", {"storage_url": "s3://omniq/store"}),
        # botocore refuses the name: an endless retry before, a malformed event now
        ("file:", "x.mp4", {}),
        ("a", "x.mp4", {}),
        ("Bucket..name", "x.mp4", {}),
    ],
)
def test_a_bucket_name_outside_s3s_rules_is_a_malformed_event(bucket, key, overrides):
    with pytest.raises(MalformedEvent, match="not a valid S3 bucket name"):
        parse_message(event_in(bucket, key))
    if "/" not in bucket:  # MinIO's "bucket/key" form cannot carry a '/' in the bucket
        with pytest.raises(MalformedEvent, match="not a valid S3 bucket name"):
            parse_message(minio_event(f"{bucket}/{key}"))
    producer = FakeProducer()
    (result,) = handle_messages(
        [json.dumps(event_in(bucket, key))], KeyFilter.from_settings(settings(**overrides)), producer
    )
    assert result.malformed and result.done and producer.calls == []  # dropped, never enqueued or retried


@pytest.mark.parametrize("bucket", ["media-in", "my.bucket.example", "Legacy_Bucket", "a1b"])
def test_valid_bucket_names_are_read(bucket):
    (event,) = parse_message(event_in(bucket, "in/a.mp4"))
    assert split_s3_uri(event.uri) == (bucket, "in/a.mp4")


def test_filters_read_the_uri_that_is_enqueued():
    """A hand-built event whose bucket holds a '/' (never from parse_message) is still not enqueued."""
    from workers.events import ObjectEvent

    key_filter = KeyFilter.from_settings(settings(trigger_include_prefixes="uploads/"))
    crafted = ObjectEvent("private/hr", "uploads/x.mp4", "ObjectCreated:Put", 10)  # s3://private/hr/uploads/x.mp4
    assert "OMNIQ_TRIGGER_INCLUDE_PREFIXES" in key_filter.skip_reason(crafted)  # its key is hr/uploads/x.mp4
    assert "not an S3 object" in key_filter.skip_reason(ObjectEvent("file:", "x.mp4", "ObjectCreated:Put", 10))


def test_trigger_buckets_allowlist():
    key_filter = KeyFilter.from_settings(settings(trigger_buckets="media-in, uploads"))
    producer = FakeProducer()
    bodies = [json.dumps(event_in("media-in", "a.mp4")), json.dumps(event_in("hr-private", "b.mp4"))]
    first, second = handle_messages(bodies, key_filter, producer)
    assert producer.calls == [["s3://media-in/a.mp4"]]
    assert first.outcomes[0].status == "enqueued"
    assert second.outcomes[0].status == "ignored" and "OMNIQ_TRIGGER_BUCKETS" in second.outcomes[0].reason
    assert second.done  # acknowledged: no redelivery can change the answer


@pytest.mark.parametrize("key", ["../../etc/passwd.mp4", "a/../../b.mp4", "/abs.mp4", "file:///x.mp4"])
def test_events_only_ever_name_s3_objects_and_keys_stay_literal(key):
    (event,) = parse_message(event_in("media-in", key))
    assert event.uri.startswith("s3://media-in/")
    assert split_s3_uri(event.uri) == ("media-in", key)  # '..' is part of the key, nothing is resolved


def test_uris_with_invalid_buckets_are_refused_everywhere():
    for uri in ("s3://file:/x.mp4", "s3://a/x.mp4", "s3://b@evil.com/x.mp4"):
        with pytest.raises(ConfigError, match="not a valid S3 bucket name"):
            split_s3_uri(uri)


# -- sizes of S3 sources --------------------------------------------------------------------------------


@pytest.fixture
def s3_settings(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return Settings(s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region, max_file_bytes=1000)


def count_calls(client, operation: str) -> list[str]:
    """Every ``operation`` the client sends from now on (botocore's own event hooks; nothing is replaced)."""
    calls: list[str] = []
    client.meta.events.register(f"before-call.s3.{operation}", lambda **_: calls.append(operation))
    return calls


def test_an_object_over_the_limit_is_rejected_at_enqueue(s3_server, s3_bucket, s3_settings):
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/big.mp4", Body=b"x" * 5000)
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/small.mp4", Body=b"x" * 500)
    filters = Filters(s3_settings.media_extension_set())
    listed = {d.uri: d for d in discover([f"s3://{s3_bucket}/in/"], s3_settings, filters)}
    named = next(discover([f"s3://{s3_bucket}/in/big.mp4"], s3_settings, filters))
    for big in (listed[f"s3://{s3_bucket}/in/big.mp4"], named):
        assert big.ref is None and "5000 bytes is over the limit of 1000" in big.rejected
        assert "OMNIQ_MAX_FILE_BYTES" in big.rejected
    assert listed[f"s3://{s3_bucket}/in/small.mp4"].ref is not None


def test_an_object_over_the_limit_is_never_downloaded(s3_server, s3_bucket, s3_settings, tmp_path):
    """The object grew after it was enqueued: the worker's HEAD sees it and no GET is sent."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/grew.mp4", Body=b"x" * 5 * 1024 * 1024)
    gets = count_calls(s3_client(s3_settings), "GetObject")
    with pytest.raises(LimitExceeded, match=r"in/grew.mp4: 5242880 bytes is over the limit of 1000"):
        fetch_source(f"s3://{s3_bucket}/in/grew.mp4", tmp_path, s3_settings, name=f"s3://{s3_bucket}/in/grew.mp4")
    assert gets == [] and list(tmp_path.iterdir()) == []


def test_a_download_that_grows_past_the_limit_is_stopped(s3_server, s3_bucket, s3_settings, tmp_path):
    """Whatever a HEAD said (here: a HEAD that understates the size), the bytes that arrive are counted."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/liar.mp4", Body=b"x" * 300_000)
    client = s3_client(s3_settings)

    def understate(parsed, **_):
        parsed["ContentLength"] = 500

    client.meta.events.register("after-call.s3.HeadObject", understate)
    try:
        with pytest.raises(LimitExceeded, match="over the limit of 1000"):
            fetch_source(f"s3://{s3_bucket}/in/liar.mp4", tmp_path, s3_settings)
    finally:
        client.meta.events.unregister("after-call.s3.HeadObject", understate)
    assert list(tmp_path.iterdir()) == []  # the partial download is gone


def test_an_object_replaced_during_the_download_is_read_again(s3_server, s3_bucket, s3_settings, tmp_path):
    """A large object is read in ranges that all name the version measured (s3transfer sends If-Match): a
    replaced object is a transient error, and the retry reads the new one whole."""
    settings = s3_settings.model_copy(update={"max_file_bytes": 64 * 1024**2})
    size = 9 * 1024 * 1024  # over s3transfer's 8 MiB threshold: ranged GETs
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/swap.mp4", Body=b"a" * size)
    client = s3_client(settings)
    versions = iter(range(1, 100))

    def replace(**_):  # a new version after every HEAD
        s3_server.client().put_object(Bucket=s3_bucket, Key="in/swap.mp4", Body=b"b" * (size + next(versions)))

    client.meta.events.register("after-call.s3.HeadObject", replace)
    try:
        with pytest.raises(TransientError, match="changed while it was read"):
            fetch_source(f"s3://{s3_bucket}/in/swap.mp4", tmp_path, settings)
    finally:
        client.meta.events.unregister("after-call.s3.HeadObject", replace)
    newest = s3_server.client().get_object(Bucket=s3_bucket, Key="in/swap.mp4")["Body"].read()
    assert fetch_source(f"s3://{s3_bucket}/in/swap.mp4", tmp_path, settings).read_bytes() == newest
