"""S3Storage against a real S3 server over HTTP (SeaweedFS, signatures enforced)."""

from __future__ import annotations

import pytest

from pipeline.config import Settings
from pipeline.errors import PermanentError, SourceNotFound
from pipeline.sources import fetch_source, resolve_source
from pipeline.storage import S3Storage, open_storage


@pytest.fixture
def s3_settings(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return Settings(s3_endpoint_url=s3_server.endpoint_url, s3_region=s3_server.region)


def test_put_get_skip_identical_list_delete(s3_server, s3_bucket, s3_settings):
    storage = open_storage(f"s3://{s3_bucket}/omniq/data", s3_settings)
    assert isinstance(storage, S3Storage)
    assert storage.put_bytes("results/m1/manifest.json", b'{"a": 1}', "application/json") is True
    assert storage.put_bytes("results/m1/manifest.json", b'{"a": 1}') is False  # identical: no second PUT
    assert storage.get_bytes("results/m1/manifest.json") == b'{"a": 1}'
    assert storage.exists("results/m1/manifest.json") and not storage.exists("results/m1/nope.json")
    assert storage.uri("results/m1/manifest.json") == f"s3://{s3_bucket}/omniq/data/results/m1/manifest.json"
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="omniq/data/results/m1/manifest.json")
    assert head["ContentType"] == "application/json"
    with pytest.raises(SourceNotFound):
        storage.get_bytes("results/m1/nope.json")


def test_listing_and_deleting_more_than_one_page(s3_bucket, s3_settings):
    storage = open_storage(f"s3://{s3_bucket}/p", s3_settings)
    for index in range(1005):  # past the 1000-key page and delete batch size
        storage.client.put_object(Bucket=s3_bucket, Key=f"p/work/j/chunks/{index:05d}.json", Body=b"x")
    storage.put_bytes("results/keep.json", b"{}")
    assert sum(1 for _ in storage.list_keys("work/j")) == 1005
    assert storage.delete_prefix("work/j") == 1005
    assert list(storage.list_keys("work/j")) == []
    assert list(storage.list_keys("results")) == ["results/keep.json"]


def test_s3_source_fingerprint_and_download(s3_server, s3_bucket, s3_settings, tmp_path):
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/a b.mp3", Body=b"0123456789")
    ref = resolve_source(f"s3://{s3_bucket}/in/a b.mp3", s3_settings)
    assert ref.size_bytes == 10 and "etag=" in ref.fingerprint
    path = fetch_source(ref.uri, tmp_path, s3_settings)
    assert path.read_bytes() == b"0123456789"
    with pytest.raises(SourceNotFound, match="missing.mp4"):
        resolve_source(f"s3://{s3_bucket}/in/missing.mp4", s3_settings)


def test_wrong_credentials_are_a_clear_permanent_error(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage = open_storage(f"s3://{s3_bucket}/x", Settings(s3_endpoint_url=s3_server.endpoint_url))
    with pytest.raises(PermanentError, match="credentials|access denied|not found"):
        storage.put_bytes("a.json", b"{}")


def test_s3_uris_carry_keys_verbatim(s3_server, s3_bucket, s3_settings, tmp_path):
    key = "in/50% off #1?.mp3"  # what the AWS CLI accepts as s3://bucket/in/50% off #1?.mp3
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"abc")
    ref = resolve_source(f"s3://{s3_bucket}/{key}", s3_settings)
    assert ref.uri == f"s3://{s3_bucket}/{key}" and ref.name == "50% off #1?.mp3"
    assert fetch_source(ref.uri, tmp_path, s3_settings).read_bytes() == b"abc"
