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


def test_ranged_reads(s3_bucket, s3_settings):
    storage = open_storage(f"s3://{s3_bucket}/r", s3_settings)
    storage.put_bytes("a.bin", bytes(range(100)))
    assert storage.get_range("a.bin", 10, 5) == bytes(range(10, 15))
    assert storage.get_range("a.bin", 95, 50) == bytes(range(95, 100))  # shorter at the end
    assert storage.get_range("a.bin", 200, 5) == b""
    with pytest.raises(SourceNotFound):
        storage.get_range("missing.bin", 0, 5)


class RequestLog:
    """Every HTTP request a boto3 client sends (method and path), recorded through botocore's events."""

    def __init__(self, client) -> None:
        self.client = client
        self.requests: list[tuple[str, str]] = []

    def _record(self, request, **_) -> None:
        self.requests.append((request.method, request.url.split("?")[0]))

    def __enter__(self) -> RequestLog:
        self.requests.clear()
        self.client.meta.events.register("before-send.s3", self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.client.meta.events.unregister("before-send.s3", self._record)

    def under(self, part: str) -> list[tuple[str, str]]:
        return [r for r in self.requests if part in r[1]]


def test_requests_per_chunk_at_ingest_inference_and_finalize(s3_bucket, s3_settings, tiny_cache_dir, tmp_path):
    from pipeline.engines.omni import OmniEngine
    from pipeline.job import finalize, infer_chunks, ingest, make_spec, summarize
    from pipeline.media.sample import make_sample

    settings = s3_settings.model_copy(
        update={"model": "tiny", "cache_dir": tiny_cache_dir, "chunk_seconds": 10.0, "fps": 2.0,
                "frame_max_pixels": 96 * 96, "transcript_max_new_tokens": 4, "caption_max_new_tokens": 4,
                "summary_max_new_tokens": 4, "device": "cpu"}
    )  # fmt: skip
    storage = open_storage(f"s3://{s3_bucket}/lib", settings)
    spec = make_spec(str(make_sample(tmp_path / "a.mp4", 33.0)), settings)
    log = RequestLog(storage.client)
    with log:
        plan = ingest(spec, settings, storage)
    chunks = len(plan.chunks)
    assert chunks == 4 and plan.frame_shape
    assert log.under("/chunks/") == [("PUT", log.under("/chunks/")[i][1]) for i in range(chunks)]  # 1 PUT each
    assert len(log.requests) <= chunks + 3  # plus the plan's HEAD, its HEAD-then-PUT
    with log:
        infer_chunks(plan, [c.index for c in plan.chunks], OmniEngine(settings), storage, settings)
    methods = sorted(method for method, _ in log.under("/chunks/"))
    assert methods == sorted(["HEAD", "GET", "PUT"] * chunks)  # result absent?, the pack, the result
    summarize(plan, OmniEngine(settings), storage, settings)
    with log:
        finalize(plan, storage, settings, {})
    packs = log.under("media.pack")
    assert len(packs) == chunks and {m for m, _ in packs} == {"GET"}  # one ranged GET per thumbnail
