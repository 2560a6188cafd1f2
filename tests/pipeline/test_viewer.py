"""The result page: escaping, the Content-Security-Policy, players, thumbnails and media URLs (real S3)."""

from __future__ import annotations

import base64
import io
import re
import urllib.request
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.config import Settings
from pipeline.results.viewer import (
    SCRIPT,
    SCRIPT_HASH,
    STYLE,
    content_security_policy,
    load_viewer_inputs,
    media_url_for,
    render_viewer,
    thumbnail_jpeg,
    write_viewer,
)
from pipeline.spec import put_json
from pipeline.storage import LocalStorage

EVIL = "<script>alert(1)</script>"


def results(segments: int = 3, chunks: int = 3, **manifest: Any) -> dict[str, Any]:
    """Result documents in the documented format: ``chunks`` chunks of 4 s, ``segments`` segments."""
    spans = [(4.0 * i, 4.0 * (i + 1)) for i in range(chunks)]
    return {
        "manifest": {
            "status": "done",
            "source": "file:///media/talk%20one.mp4",
            "media_id": "0123456789abcdef0123",
            "duration_s": 4.0 * chunks,
            "chunks": chunks,
            "model": "tiny",
            "media": {"has_video": True, "has_audio": True},
            "random_weights": False,
        }
        | manifest,
        "transcript": {
            "language": None,
            "segments": [{"start": 1.0 + 2 * i, "end": 2.5 + 2 * i, "text": f"words {i}"} for i in range(segments)],
        },
        "captions": {
            "chunks": [
                {"index": i, "start": a, "end": b, "visual": f"a test pattern {i}", "audio": "a tone"}
                for i, (a, b) in enumerate(spans)
            ]
        },
        "summary": {
            "summary": "A test pattern with tones.",
            "chunks": [{"index": i, "start": a, "end": b, "summary": f"part {i}"} for i, (a, b) in enumerate(spans)],
        },
    }


def page(docs: dict[str, Any], thumbnails: dict[int, bytes] | None = None, media_url: str | None = None) -> str:
    return render_viewer(
        docs["manifest"], docs["transcript"], docs["captions"], docs["summary"], thumbnails or {}, media_url
    )


class Elements(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def with_class(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for _, attrs in self.tags if name in (attrs.get("class") or "").split()]

    def named(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def jpeg(width: int = 640, height: int = 360) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_model_text_is_escaped_everywhere() -> None:
    docs = results()
    docs["captions"]["chunks"][0]["visual"] = EVIL
    docs["transcript"]["segments"][1]["text"] = EVIL + '" onclick="x'
    docs["summary"]["summary"] = EVIL
    docs["summary"]["chunks"][2]["summary"] = "<img src=x onerror=alert(1)>"
    docs["manifest"]["source"] = "file:///tmp/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E.mp4"
    html = page(docs, media_url="file:///tmp/a.mp4")
    elements = Elements(html)
    assert len(elements.named("script")) == 1  # only the page's own script
    assert elements.named("img") == []
    assert not any("onclick" in attrs or "onerror" in attrs for _, attrs in elements.tags)
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3  # caption, segment, summary
    # chunk summary, file name in title and h1, and the source path in the facts
    assert html.count("&lt;img src=x onerror=alert(1)&gt;") == 4


def test_the_source_is_shown_as_people_write_it() -> None:
    docs = results()
    docs["manifest"]["source"] = "file:///media/talk%20%C3%A4%20b.mp4"
    html = page(docs)
    assert "/media/talk ä b.mp4" in html and "%20" not in html.split("<script")[0]


def test_csp_pins_inline_code_and_allows_no_network() -> None:
    media = "https://bucket.s3.amazonaws.com/videos/a.mp4?X-Amz-Signature=abc&X-Amz-Expires=3600"
    html = page(results(), media_url=media)
    policy = Elements(html).named("meta")[1]
    assert policy["http-equiv"] == "Content-Security-Policy"
    assert policy["content"] == content_security_policy(media)
    assert "default-src 'none'" in policy["content"]
    assert "media-src https://bucket.s3.amazonaws.com;" in policy["content"]
    assert f"script-src {SCRIPT_HASH};" in policy["content"]
    assert "unsafe-inline" not in policy["content"]
    assert f"<script>{SCRIPT}</script>" in html and f"<style>{STYLE}</style>" in html
    for url in re.findall(r"https?://[^\s\"'<>]+", unescape(html)):
        assert media.startswith(url.rstrip(";")), url
    assert 'src="' + media.replace("&", "&amp;") + '"' in html


@pytest.mark.parametrize(
    ("media_url", "allowed"),
    [
        ("file:///srv/a.mp4", "media-src file:;"),
        ("http://127.0.0.1:9000/b/a.mp4?sig=1", "media-src http://127.0.0.1:9000;"),
        ("/media", "media-src 'self';"),
        (None, None),
    ],
)
def test_media_src_follows_the_player(media_url: str | None, allowed: str | None) -> None:
    policy = content_security_policy(media_url)
    if allowed is None:
        assert "media-src" not in policy
    else:
        assert allowed in policy


def test_media_url_must_be_playable_scheme() -> None:
    with pytest.raises(ValueError, match="media URL"):
        page(results(), media_url="javascript:alert(1)")


def test_one_element_per_segment_and_chunk() -> None:
    elements = Elements(page(results(segments=5, chunks=3), media_url="file:///a.mp4"))
    segments = elements.with_class("segment")
    assert [(s["data-start"], s["data-end"]) for s in segments] == [
        ("1.000", "2.500"),
        ("3.000", "4.500"),
        ("5.000", "6.500"),
        ("7.000", "8.500"),
        ("9.000", "10.500"),
    ]
    assert [c["data-index"] for c in elements.with_class("chunk")] == ["0", "1", "2"]


def test_video_audio_or_no_player() -> None:
    assert len(Elements(page(results(), media_url="file:///a.mp4")).named("video")) == 1
    audio_only = results(media={"has_video": False, "has_audio": True})
    elements = Elements(page(audio_only, media_url="file:///a.mp3"))
    assert [a["id"] for a in elements.named("audio")] == ["player"] and not elements.named("video")
    html = page(results(), media_url=None)
    assert 'id="player"' not in html
    assert "not reachable from this page" in html and "omniq view 0123456789abcdef0123" in html


def test_a_player_note_says_why_there_is_no_player() -> None:
    docs = results()
    args = (docs["manifest"], docs["transcript"], docs["captions"], docs["summary"], {})
    html = render_viewer(*args, None, "The source <b>changed</b>; the player is off.")
    assert '<p class="note" id="no-player">The source &lt;b&gt;changed&lt;/b&gt;; the player is off.</p>' in html
    assert 'id="player"' not in html and "not reachable from this page" not in html
    played = render_viewer(*args, "/tok3n/media", "unused")
    assert [v["src"] for v in Elements(played).named("video")] == ["/tok3n/media"] and "unused" not in played


def test_random_weights_banner() -> None:
    assert 'id="random-weights"' not in page(results())
    html = page(results(random_weights=True, notice="Random <b>text</b>."))
    assert '<p class="banner" id="random-weights" role="alert">Random &lt;b&gt;text&lt;/b&gt;.</p>' in html


def test_thumbnails_are_embedded_data_uris() -> None:
    small = thumbnail_jpeg(jpeg())
    with Image.open(io.BytesIO(small)) as image:
        assert image.format == "JPEG" and image.size == (160, 90)
    elements = Elements(page(results(), thumbnails={0: small, 2: small}))
    images = elements.named("img")
    assert len(images) == 2
    assert images[0]["src"] == "data:image/jpeg;base64," + base64.b64encode(small).decode()
    title = re.search(r"<title>(.*)</title>", page(results())).group(1)
    assert title.startswith("talk one.mp4")


def test_write_viewer_stores_thumbnails_and_page(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    video = tmp_path / "talk.mp4"
    video.write_bytes(b"not really a video")
    docs = results(source=video.as_uri())
    prefix = "results/0123456789abcdef0123"
    for name in ("transcript", "captions", "summary"):
        put_json(storage, f"{prefix}/{name}.json", docs[name])
    frames = {0: jpeg(), 2: b"not a jpeg"}  # chunk 1 has none; chunk 2's frame is unreadable: no thumbnail
    key = write_viewer(storage, docs["manifest"], frames, Settings())
    assert key == f"{prefix}/index.html"
    html = storage.get_bytes(key).decode()
    assert len(Elements(html).named("img")) == 1 and f'src="{video.as_uri()}"' in html
    assert storage.exists(f"{prefix}/thumbnails/00000.jpg")
    assert write_viewer(storage, docs["manifest"], frames, Settings()) == key
    assert storage.get_bytes(key).decode() == html  # deterministic: a redelivered finalize changes nothing
    put_json(storage, f"{prefix}/manifest.json", docs["manifest"])
    assert load_viewer_inputs(storage, "0123456789abcdef0123").thumbnails.keys() == {0}


def test_media_url_for_local_sources(tmp_path: Path) -> None:
    video = tmp_path / "a b.mp4"
    video.write_bytes(b"x")
    assert media_url_for({"source": video.as_uri()}, Settings()) == video.as_uri()
    assert media_url_for({"source": (tmp_path / "gone.mp4").as_uri()}, Settings()) is None
    assert media_url_for({"source": "s3://bucket/a.mp4"}, Settings(), presign=False) is None
    assert media_url_for({}, Settings()) is None


def test_presigned_url_for_s3_source_plays_the_object(
    s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    key = "videos/my talk #1.mp4"  # s3:// URIs carry keys verbatim
    body = b"\x00\x01media bytes" * 100
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=body)
    settings = Settings(s3_endpoint_url=s3_server.endpoint_url)
    url = media_url_for({"source": f"s3://{s3_bucket}/{key}"}, settings, expires_s=600)
    assert url is not None and url.startswith(f"{s3_server.endpoint_url}/{s3_bucket}/")
    assert "X-Amz-Expires=600" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == body
    html = page(results(), media_url=url)
    assert f"media-src {s3_server.endpoint_url};" in html
