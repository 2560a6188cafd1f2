"""Trust boundaries (README "Security"): what a crafted S3 event or queue message can make omniq do.

Each test replays an input a review crafted against the real code and checks that it is refused at its cause.
"""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.storage import split_s3_uri
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
    (result,) = handle_messages([json.dumps(event_in(bucket, key))], KeyFilter.from_settings(settings(**overrides)), producer)
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
