"""``omniq view --serve`` serves only under its token, and only the source file the results were made from.

Each test starts the real command (a subprocess listening on a free loopback port) and talks HTTP to it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pipeline.config import Settings
from pipeline.sources import resolve_source
from pipeline.spec import put_json
from pipeline.storage import LocalStorage
from tests.workers.test_view_browser import serving
from workers.cli.view import file_fingerprint, make_server, open_processed_source, requested_resource

SECRET = b"root:x:0:0:this is not the media\n"
MEDIA = bytes(range(256)) * 2048  # 512 KiB: more than one copy block


@dataclass
class Results:
    store: Path
    media_id: str
    source: Path

    @property
    def manifest_path(self) -> Path:
        return self.store / "results" / self.media_id / "manifest.json"

    def edit_manifest(self, **fields: Any) -> None:
        self.manifest_path.write_text(json.dumps(json.loads(self.manifest_path.read_text()) | fields))


@pytest.fixture
def results(tmp_path: Path) -> Results:
    """A processed local source (``talk.mp4``) and the results a finished job leaves for it."""
    source = tmp_path / "media" / "talk.mp4"
    source.parent.mkdir()
    source.write_bytes(MEDIA)
    ref = resolve_source(str(source), Settings())
    storage = LocalStorage(tmp_path / "store")
    prefix = f"results/{ref.media_id}"
    span = {"index": 0, "start": 0.0, "end": 4.0}
    put_json(storage, f"{prefix}/transcript.json", {"segments": [{"start": 0.5, "end": 2.0, "text": "Hello."}]})
    put_json(storage, f"{prefix}/captions.json", {"chunks": [span | {"visual": "a pattern", "audio": "a tone"}]})
    put_json(storage, f"{prefix}/summary.json", {"summary": "A pattern.", "chunks": [span | {"summary": "part"}]})
    manifest = {"status": "done", "source": ref.uri, "fingerprint": ref.fingerprint, "media_id": ref.media_id}
    put_json(storage, f"{prefix}/manifest.json", manifest | {"chunks": 1, "duration_s": 4.0, "model": "tiny"})
    return Results(storage.root, ref.media_id, source)


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """The status and body of a GET, errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def assert_no_media_served(url: str, results: Results, note: str) -> None:
    """The page at ``url`` works with ``note`` in place of the player, and its media URL serves nothing."""
    status, body = fetch(url + "media")
    assert status == 404 and SECRET not in body and MEDIA[:1024] not in body
    status, page = fetch(url)
    assert status == 200 and b"Hello." in page
    assert b'id="player"' not in page and note.encode() in page


def test_the_token_serves_the_page_and_the_media(results: Results) -> None:
    with serving(results.media_id, "--out", str(results.store)) as url:
        match = re.fullmatch(r"http://127\.0\.0\.1:\d+/([A-Za-z0-9_-]{40,})/", url)
        assert match, url
        status, page = fetch(url)
        assert status == 200 and f'src="/{match.group(1)}/media"'.encode() in page
        assert fetch(url + "index.html") == (200, page)
        assert fetch(url + "media") == (200, MEDIA)
        assert fetch(url + "media", {"Range": "bytes=300000-300099"}) == (206, MEDIA[300000:300100])
        assert fetch(url + "media", {"Range": "bytes=-10"}) == (206, MEDIA[-10:])


def test_no_token_or_a_wrong_token_gets_nothing(results: Results) -> None:
    with serving(results.media_id, "--out", str(results.store)) as url:
        parts = urlsplit(url)
        root, token, wrong = f"{parts.scheme}://{parts.netloc}", parts.path.strip("/"), secrets.token_urlsafe(32)
        for path in ("/", "/index.html", "/media", f"/{wrong}/", f"/{wrong}/media", f"/{token[:-1]}/media",
                     f"/{token}x/media", f"/media/{token}", f"/x/{token}/media"):  # fmt: skip
            status, body = fetch(root + path)
            assert status == 404 and body == b"not found\n", path


@pytest.mark.parametrize("fingerprint", ["kept", "the other file's"])
def test_a_manifest_naming_another_file_is_not_served(results: Results, tmp_path: Path, fingerprint: str) -> None:
    secret = tmp_path / "passwd"
    secret.write_bytes(SECRET)
    results.edit_manifest(source=secret.as_uri())
    if fingerprint != "kept":  # whoever edits the manifest can stat the file too
        results.edit_manifest(fingerprint=file_fingerprint(secret.stat()))
    with serving(results.media_id, "--out", str(results.store)) as url:
        assert_no_media_served(url, results, "is not the file that was")


@pytest.mark.parametrize("change", ["grown", "touched", "replaced", "a symlink to another file"])
def test_a_source_changed_after_processing_is_not_served(results: Results, tmp_path: Path, change: str) -> None:
    status = results.source.stat()
    if change == "grown":
        with results.source.open("ab") as handle:
            handle.write(SECRET)
    elif change == "touched":  # same bytes, so only the mtime tells
        os.utime(results.source, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    elif change == "replaced":
        replacement = tmp_path / "replacement.mp4"
        replacement.write_bytes(SECRET.ljust(len(MEDIA), b"#"))  # the same size
        os.utime(replacement, ns=(status.st_atime_ns, status.st_mtime_ns - 1_000_000_000))  # an older copy
        os.replace(replacement, results.source)
    else:
        secret = tmp_path / "passwd"
        secret.write_bytes(SECRET)
        results.source.unlink()
        results.source.symlink_to(secret)
    note = "cannot be opened here" if change.startswith("a symlink") else "changed since it was processed"
    with serving(results.media_id, "--out", str(results.store)) as url:
        assert_no_media_served(url, results, note)


def test_a_source_changed_while_serving_is_gone(results: Results) -> None:
    with serving(results.media_id, "--out", str(results.store)) as url:
        assert fetch(url + "media", {"Range": "bytes=0-99"}) == (206, MEDIA[:100])
        with results.source.open("r+b") as handle:
            handle.write(SECRET)
        status, body = fetch(url + "media")
        assert status == 410 and SECRET not in body and MEDIA[:1024] not in body


def test_a_missing_source_leaves_the_page_without_a_player(results: Results) -> None:
    results.source.unlink()
    with serving(results.media_id, "--out", str(results.store)) as url:
        assert_no_media_served(url, results, "cannot be opened here (No such file or directory)")


@pytest.mark.timeout(30)
def test_only_regular_files_are_opened(results: Results, tmp_path: Path) -> None:
    manifest = json.loads(results.manifest_path.read_text())
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)  # opening one for reading would wait for a writer
    for path in (fifo, tmp_path):
        edited = manifest | {"source": path.as_uri(), "fingerprint": file_fingerprint(path.stat())}
        with pytest.raises(ValueError, match="is not a regular file"):
            open_processed_source(edited, results.media_id)
    media = open_processed_source(manifest, results.media_id)
    try:
        assert media.current_size() == len(MEDIA) and media.read(1000, 5) == MEDIA[1000:1005]
    finally:
        media.close()


def test_the_fingerprint_is_the_one_sources_record(results: Results) -> None:
    status = results.source.stat()
    assert file_fingerprint(status) == resolve_source(str(results.source), Settings()).fingerprint


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/tok3n/", "/"),
        ("/tok3n", "/"),
        ("/tok3n/media?x=1", "/media"),
        ("/tok3n/index.html", "/index.html"),
        ("/", None),
        ("/media", None),
        ("/tok3/media", None),
        ("/tok3nn/media", None),
        ("/%74ok3n/media", None),  # not decoded: the token is exactly the path's first part
        ("/t\u00f6k3n/", None),
    ],
)
def test_requested_resource(path: str, resource: str | None) -> None:
    assert requested_resource(path, "tok3n") == resource


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_server_listens_on_loopback_only(host: str) -> None:
    server = make_server(b"page", None, "tok3n", host, 0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
