"""Trust boundaries (README "Security"): what a crafted S3 event or queue message can make omniq do.

Each test replays an input a review crafted against the real code and checks that it is refused at its cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Settings, config_hash_of
from pipeline.discover import Filters, discover
from pipeline.errors import ConfigError, LimitExceeded, MalformedMessage, TransientError
from pipeline.media.sample import make_sample
from pipeline.sources import SourceRef, fetch_source, job_id_for
from pipeline.spec import JobSpec, check_input, make_spec, settings_for, staged_input_key
from pipeline.storage import LocalStorage, s3_client, split_s3_uri
from tests.workers.test_triggers import FakeProducer, s3_event, settings
from workers.messages import check_message
from workers.producer import enqueue
from workers.state import JobState
from workers.triggers.events import KeyFilter, MalformedEvent, handle_messages, parse_message


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
    from workers.triggers.events import ObjectEvent

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


# -- queue messages --------------------------------------------------------------------------------------


def forged_spec(source: str, fingerprint: str = "size=1;mtime_ns=1", input_uri: str | None = None, **config) -> dict:
    """A spec whose ids follow from its content, as anyone who reads the code can compute them."""
    base = Settings(model="tiny").effective_config() | config
    media_id = SourceRef(source, fingerprint, 0).media_id
    return {
        "job_id": job_id_for(media_id, config_hash_of(base)),
        "media_id": media_id,
        "source": source,
        "input_uri": input_uri or source,
        "fingerprint": fingerprint,
        "config": base,
        "tag": None,
        "priority": 5,
        "run_id": None,
    }


def test_a_spec_carries_only_output_shaping_settings():
    for setting, value in [
        ("s3_endpoint_url", "http://attacker.example"),
        ("max_file_bytes", 10**15),
        ("storage_url", "file:///"),
        ("local_source_roots", "/"),
    ]:
        with pytest.raises(MalformedMessage, match=f"only output-shaping settings; not \\['{setting}'\\]"):
            JobSpec.from_dict(forged_spec("s3://media-in/a.mp4", **{setting: value}))
    spec = JobSpec.from_dict(forged_spec("s3://media-in/a.mp4"))
    # a spec built by hand with more in its config still applies only the output-shaping settings
    spec.config["s3_endpoint_url"] = "http://attacker.example"
    worker = Settings(model="tiny", s3_endpoint_url="http://s3.internal:8333", max_file_bytes=1000)
    applied = settings_for(spec, worker)
    assert (applied.s3_endpoint_url, applied.max_file_bytes) == ("http://s3.internal:8333", 1000)


def test_output_settings_from_a_message_are_validated_like_the_environment():
    spec = JobSpec.from_dict(forged_spec("s3://media-in/a.mp4", fps=1000, frame_max_pixels=10**9))
    with pytest.raises(MalformedMessage, match="fps.*less than or equal to 30.*frame_max_pixels"):
        settings_for(spec, Settings(model="tiny"))
    assert settings_for(JobSpec.from_dict(forged_spec("s3://m-in/a.mp4", fps=1.0)), Settings()).fps == 1.0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"media_id": "0" * 20}, "ids do not follow"),
        ({"job_id": "0" * 20 + "-" + "0" * 10}, "ids do not follow"),
        ({"fingerprint": "size=2"}, "ids do not follow"),  # the content named is not the one the ids name
        ({"extra": 1}, "unknown \\['extra'\\]"),
        ({"priority": 99}, "priority"),
        ({"priority": True}, "priority"),
        ({"tag": "x" * 500}, "tag"),
        ({"tag": "a\x1b[31mred"}, "tag"),
        ({"run_id": "../x"}, "run_id"),
        ({"source": 7}, "'source' must be"),
    ],
)
def test_a_spec_whose_fields_or_ids_are_not_omniqs_is_malformed(change, reason):
    with pytest.raises(MalformedMessage, match=reason):
        JobSpec.from_dict(forged_spec("s3://media-in/a.mp4") | change)


def test_messages_are_checked_before_anything_acts_on_them(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    worker = Settings(model="tiny")
    good = forged_spec("s3://media-in/a.mp4")
    common = {"job_id": good["job_id"], "source": good["source"]}
    check_message("omniq.ingest", (), {**common, "spec": good}, worker, storage)  # passes
    refused = [
        ("omniq.ingest", {**common, "spec": good | {"input_uri": "file:///etc/passwd"}}, "neither its source"),
        ("omniq.ingest", {**common, "spec": good, "extra": 1}, "keyword arguments"),
        ("omniq.ingest", {**common, "spec": forged_spec("s3://media-in/b.mp4")}, "names another job"),
        ("omniq.ingest", {**common, "spec": forged_spec("s3://media-in/a.mp4", fps=99.0)}, "names another job"),
        ("omniq.infer", {"job_id": "../../x", "source": "s", "chunks": [0]}, "not an omniq job id"),
        ("omniq.infer", {**common, "chunks": "0"}, "chunks"),
        ("omniq.infer", {**common, "chunks": [0], "unit": "finalize"}, "not an infer unit"),
        ("omniq.finalize", {**common, "model": "x"}, "keyword arguments"),
    ]
    for task, kwargs, reason in refused:
        with pytest.raises(MalformedMessage, match=reason):
            check_message(task, (), kwargs, worker, storage)


def test_local_inputs_are_read_only_from_the_store_or_allowed_folders(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    library = tmp_path / "library"
    library.mkdir()
    (library / "talk.mp4").write_bytes(b"media")
    (tmp_path / "secret.mp4").write_bytes(b"secret")
    (library / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    allowed = Settings(model="tiny", local_source_roots=str(library))
    for name in ("talk.mp4",):
        check_input(JobSpec.from_dict(forged_spec((library / name).as_uri())), allowed, storage)
    for path in (Path("/etc/passwd"), tmp_path / "secret.mp4", library / "escape.mp4", library / ".." / "secret.mp4"):
        with pytest.raises(ConfigError, match="OMNIQ_LOCAL_SOURCE_ROOTS"):
            check_input(JobSpec.from_dict(forged_spec(f"file://{path}")), allowed, storage)
    # the producer's copy in the store is always readable
    spec = JobSpec.from_dict(forged_spec((tmp_path / "secret.mp4").as_uri()))
    staged = JobSpec.from_dict(
        forged_spec(spec.source, input_uri=storage.uri(staged_input_key(spec.job_id, "secret.mp4")))
    )
    check_input(staged, Settings(model="tiny"), storage)
    # but not another job's, or anything else in the store
    other = storage.uri(staged_input_key("0" * 20 + "-" + "1" * 10, "secret.mp4"))
    for uri in (other, storage.uri("results/x/transcript.json")):
        with pytest.raises(MalformedMessage, match="neither its source"):
            check_input(JobSpec.from_dict(forged_spec(spec.source, input_uri=uri)), Settings(), storage)


def test_the_producer_stages_local_sources_in_a_local_store(tmp_path, broker):
    """Workers read local files only from their store: the producer links (or copies) the source there."""
    url, client, state = broker
    source = make_sample(tmp_path / "in" / "my clip #1%.mp4", 2.0, size="64x48")  # names URIs encode
    storage = LocalStorage(tmp_path / "store")
    settings = Settings(model="tiny", broker_url=url, storage_url=storage.url)
    (outcome,) = enqueue([str(source)], settings, storage, state)
    assert outcome.status == "enqueued"
    spec = JobSpec.from_dict(json.loads(client.hget(JobState.key(outcome.job_id), "spec")))
    staged = storage.path(staged_input_key(spec.job_id, "my clip #1%.mp4"))
    assert spec.input_uri == staged.as_uri() and spec.source == source.resolve().as_uri()
    assert staged.stat().st_ino == source.stat().st_ino  # a hard link: no copy on the same file system
    check_input(spec, settings, storage)
    # a source under OMNIQ_LOCAL_SOURCE_ROOTS is read in place
    rooted = settings.model_copy(update={"local_source_roots": str(tmp_path / "in")})
    other = make_sample(tmp_path / "in" / "other.mp4", 1.0, size="64x48")
    (again,) = enqueue([str(other)], rooted, storage, state)
    spec = JobSpec.from_dict(json.loads(client.hget(JobState.key(again.job_id), "spec")))
    assert spec.input_uri == spec.source


def test_tags_are_checked_where_they_are_given(tmp_path):
    source = make_sample(tmp_path / "a.mp4", 1.0, size="64x48")
    with pytest.raises(ConfigError, match="--tag"):
        make_spec(str(source), Settings(), tag="t" * 300)


def test_a_malformed_gpu_message_takes_no_lease_on_receipt(monkeypatch, tmp_path):
    """A GPU worker takes a unit's lease when a message arrives; a forged one must not hold a real unit's."""
    import fakeredis

    from workers import runtime, tasks
    from workers.reliability.leases import Leases, lease_key
    from workers.steps import base as steps_base

    state = JobState(fakeredis.FakeRedis(decode_responses=True))
    leases = Leases(state, 45, 10)
    monkeypatch.setattr(runtime, "state", lambda: state)
    monkeypatch.setattr(runtime, "leases", lambda: leases)
    monkeypatch.setattr(runtime, "settings", lambda: Settings(model="tiny"))
    monkeypatch.setattr(runtime, "storage", lambda: LocalStorage(tmp_path))
    spec = forged_spec("s3://media-in/a.mp4")
    real = {"job_id": spec["job_id"], "source": spec["source"], "chunks": [0], "unit": "infer-0", "model": "tiny"}
    try:
        tasks.lease_on_receipt("forged", "omniq.infer", real | {"chunks": [0], "extra": "x"})
        assert not state.redis.exists(lease_key(spec["job_id"], "infer-0"))
        tasks.lease_on_receipt("real", "omniq.infer", real)
        assert state.redis.exists(lease_key(spec["job_id"], "infer-0"))  # the check is what kept the other out
    finally:
        leases.release_all()
        steps_base._received.clear()
