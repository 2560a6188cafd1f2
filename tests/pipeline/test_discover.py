from __future__ import annotations

import pytest

from pipeline.config import Settings
from pipeline.discover import Filters, discover, read_list_file
from pipeline.errors import ConfigError
from pipeline.sources import resolve_source


@pytest.fixture
def library(tmp_path):
    for name in ("a.mp4", "b.MP3", "notes.txt", "sub/c.mkv", "sub/deeper/d.wav", "sub/.hidden.mp4", ".cache/e.mp4"):
        path = tmp_path / "lib" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10)
    return tmp_path / "lib"


def _names(items):
    return sorted(item.uri.rsplit("/", 1)[-1] for item in items)


def test_directory_recursion_uses_media_extensions(library):
    settings = Settings()
    found = list(discover([str(library)], settings, Filters(settings.media_extension_set())))
    assert _names(found) == ["a.mp4", "b.MP3", "c.mkv", "d.wav"]  # no .txt, no hidden files or folders
    assert all(item.ref is not None and item.ref.uri.startswith("file:///") for item in found)


def test_files_the_filters_leave_out_are_counted_and_globs_expand(library):
    settings = Settings()
    ignored: list[str] = []
    list(discover([str(library)], settings, Filters(settings.media_extension_set()), ignored))
    assert [p.rsplit("/", 1)[-1] for p in ignored] == ["notes.txt"]  # not hidden files, not what --exclude left
    found = list(
        discover(
            [str(library / "sub" / "**" / "*.wav"), str(library / "[ab].*")],
            settings,
            Filters(settings.media_extension_set()),
        )
    )
    assert _names(found) == ["a.mp4", "b.MP3", "d.wav"]
    (nothing,) = discover([str(library / "*.flac")], settings, Filters(settings.media_extension_set()))
    assert nothing.ref is None and "no such file" in nothing.rejected  # a glob that matches nothing says so


def test_include_and_exclude_globs(library):
    settings = Settings()
    only_video = Filters(settings.media_extension_set(), include=("*.mp4", "*.mkv"))
    assert _names(discover([str(library)], settings, only_video)) == ["a.mp4", "c.mkv"]
    no_sub = Filters(settings.media_extension_set(), exclude=("sub/*",))
    assert _names(discover([str(library)], settings, no_sub)) == ["a.mp4", "b.MP3"]


def test_named_files_are_taken_as_given_and_missing_ones_rejected(library):
    settings = Settings()
    found = list(
        discover(
            [str(library / "notes.txt"), str(library / "gone.mp4"), "ftp://x/y.mp4"], settings, Filters(frozenset())
        )
    )
    assert found[0].ref is not None
    assert found[1].ref is None and "gone.mp4" in found[1].rejected
    assert found[2].ref is None and "unsupported" in found[2].rejected


def test_list_file_plain_and_jsonl(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text('# library\n/data/a.mp4\n\n{"uri": "s3://b/k.mp4", "note": 1}\n  /data/b.mp3  \n')
    assert list(read_list_file(listing)) == ["/data/a.mp4", "s3://b/k.mp4", "/data/b.mp3"]
    listing.write_text('{"url": "x"}\n')
    with pytest.raises(ConfigError, match="list.txt:1"):
        list(read_list_file(listing))
    with pytest.raises(ConfigError, match="cannot read"):
        list(read_list_file(tmp_path / "missing.txt"))


def test_s3_prefix_listing_pages_and_matches_head_fingerprints(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    settings = Settings(s3_endpoint_url=s3_server.endpoint_url)
    client = s3_server.client()
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"media/{i:05d}.mp4" for i in range(1003)] + ["media/readme.txt", "other/x.mp4", "media/empty.mp4"]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b"" if "empty" in k else b"v" + k.encode()),
                keys,
            )
        )
    found = list(discover([f"s3://{s3_bucket}/media/"], settings, Filters(settings.media_extension_set())))
    assert len(found) == 1003  # past one 1000-key page; .txt, empty objects and other prefixes left out
    assert all(item.ref for item in found)
    head = resolve_source(found[7].uri, settings)  # the listing's fingerprint equals a HEAD's: same media id
    assert head == found[7].ref
    single = list(discover([f"s3://{s3_bucket}/media/00001.mp4"], settings, Filters(settings.media_extension_set())))
    assert [item.uri for item in single] == [f"s3://{s3_bucket}/media/00001.mp4"]
