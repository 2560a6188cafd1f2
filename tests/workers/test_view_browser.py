"""The result page in headless Chromium (a real video, file:// and served over HTTP), and ``omniq view --serve``."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.media.extract import ffmpeg_binary, run_ffmpeg
from pipeline.media.sample import make_sample
from pipeline.results.viewer import write_viewer
from pipeline.sources import resolve_source
from pipeline.spec import put_json
from pipeline.storage import LocalStorage
from tests.browser import chromium_page
from workers.cli.view import byte_range, check_loopback, write_launch_page

# Chromium is installed by .ci/run (Debian's package): a missing browser fails these tests, never skips them.

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
SEGMENTS = [(0.5, 3.5, "Hello and welcome."), (5.0, 8.5, "The second part <b>starts</b> here."), (9.0, 11.5, "Bye.")]
CHUNKS = [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]


@dataclass
class Store:
    root: Path
    media_id: str
    video: Path

    @property
    def page(self) -> Path:
        return self.root / "results" / self.media_id / "index.html"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A 12 s sample video and hand-made results for it (3 chunks, 3 segments), page written as finalize does."""
    base = tmp_path_factory.mktemp("view")
    video = make_sample(base / "media" / "sample talk.mp4", 12.0)
    frames = base / "frames"
    frames.mkdir()
    command = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-i", str(video), "-vf", "fps=1/4"]
    run_ffmpeg([*command, "-frames:v", "3", str(frames / "%d.jpg")], timeout=60, name=str(video))
    ref = resolve_source(str(video), Settings())
    storage = LocalStorage(base / "store")
    spans = [{"index": i, "start": a, "end": b} for i, (a, b) in enumerate(CHUNKS)]
    manifest: dict[str, Any] = {
        "status": "done",
        "source": ref.uri,
        "fingerprint": ref.fingerprint,
        "media_id": ref.media_id,
        "job_id": f"{ref.media_id}-0000000000",
        "duration_s": 12.0,
        "chunks": 3,
        "model": "tiny",
        "media": {"has_video": True, "has_audio": True, "width": 320, "height": 240},
        "random_weights": True,
        "notice": "Written by the tiny random-weight test model: this text is random.",
        "finished_at": "2026-01-01T00:00:00+00:00",
    }
    prefix = f"results/{ref.media_id}"
    put_json(storage, f"{prefix}/transcript.json", {"language": None, "segments": [
        {"start": a, "end": b, "text": text} for a, b, text in SEGMENTS
    ]})  # fmt: skip
    visual = ["A colour test pattern with a counter.", "<script>alert(1)</script>", "The pattern again."]
    put_json(storage, f"{prefix}/captions.json", {"chunks": [
        s | {"visual": visual[s["index"]], "audio": "A 440 Hz tone, then silence."} for s in spans
    ]})  # fmt: skip
    summaries = [s | {"summary": f"Part {s['index'] + 1} of the test pattern."} for s in spans]
    put_json(storage, f"{prefix}/summary.json", {"summary": "A test pattern with tone bursts.", "chunks": summaries})
    first_frames = {index: (frames / f"{index + 1}.jpg").read_bytes() for index in range(3)}
    write_viewer(storage, manifest, first_frames, Settings())
    put_json(storage, f"{prefix}/manifest.json", manifest)
    return Store(storage.root, ref.media_id, video)


def seek_by_clicking(page: Any, index: int) -> float:
    """Wait until the player can seek, click segment ``index`` and return the player's time after the seek."""
    page.wait_for_function(
        "() => { const p = document.querySelector('#player'); return p.seekable.length && p.seekable.end(0) > 10 }"
    )
    page.locator(".segment").nth(index).click()
    start = SEGMENTS[index][0]
    page.wait_for_function(
        f"() => {{ const t = document.querySelector('#player').currentTime; return t >= {start - 0.1} && t < {start + 2} }}"
    )
    page.wait_for_function(f"() => document.querySelectorAll('.segment')[{index}].classList.contains('current')")
    return float(page.evaluate("() => document.querySelector('#player').currentTime"))


def test_page_renders_plays_and_stays_offline(store: Store) -> None:
    requests: list[str] = []
    dialogs: list[str] = []
    errors: list[str] = []  # CSP violations are logged as console errors
    with chromium_page() as page:  # as a user opens it: no --allow-file-access-from-files
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(store.page.as_uri())
        assert page.title().startswith("sample talk.mp4")
        assert page.locator("#summary-text").inner_text() == "A test pattern with tone bursts."
        assert page.locator("#random-weights").is_visible()
        assert page.locator(".segment").count() == len(SEGMENTS)
        assert page.locator(".chunk").count() == len(CHUNKS)
        assert page.locator(".chunk img.thumb").count() == 3
        assert page.locator(".chunk").nth(1).locator(".visual").inner_text().endswith("<script>alert(1)</script>")
        assert page.locator(".segment").nth(1).inner_text().endswith("The second part <b>starts</b> here.")
        assert page.evaluate("() => document.querySelector('#player').tagName") == "VIDEO"
        assert abs(seek_by_clicking(page, 1) - SEGMENTS[1][0]) < 1.5
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)
    assert dialogs == [] and errors == []
    assert requests and all(url.startswith("file://") for url in requests), requests
    assert store.video.as_uri() in requests


VIEW = [sys.executable, "-m", "workers.cli", "view"]


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> Iterator[str]:
    """``omniq view ARGS --serve --port 0 --no-open`` running; yields the URL it prints (within ``timeout_s``)."""
    process = subprocess.Popen(
        [*VIEW, *args, "--serve", "--port", "0", "--no-open"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+/\S*", line)
        assert match, f"no URL in {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        yield match.group(0)
    finally:
        process.terminate()
        process.wait(timeout=10)


def omniq_view(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIEW, *args, "--no-open"], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def served(store: Store) -> Iterator[str]:
    """``omniq view MEDIA_ID --out STORE --serve --port 0`` running; yields its URL."""
    with serving(store.media_id, "--out", str(store.root)) as url:
        yield url


def test_view_serves_the_page_and_the_media(served: str, store: Store) -> None:
    with urllib.request.urlopen(served, timeout=10) as response:
        assert response.status == 200
        html = response.read().decode()
    token_path = served.split("/", 3)[3]  # http://127.0.0.1:PORT/<token>/
    assert html.count('class="segment"') == len(SEGMENTS) and f'src="/{token_path}media"' in html
    request = urllib.request.Request(served + "media", headers={"Range": "bytes=100-199"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-199/{store.video.stat().st_size}"
        assert response.read() == store.video.read_bytes()[100:200]


def test_served_page_seeks_in_chromium(served: str) -> None:
    requests: list[str] = []
    with chromium_page() as page:
        page.on("request", lambda request: requests.append(request.url))
        page.goto(served)
        assert abs(seek_by_clicking(page, 2) - SEGMENTS[2][0]) < 1.5
    assert all(url.startswith(served) for url in requests), requests


def test_a_link_to_a_moment_opens_the_page_there_and_plays(served: str, store: Store) -> None:
    """``index.html#t=START`` (what ``omniq search`` prints for a hit and ``omniq view --at`` opens) seeks the
    player to that moment as the page loads, and again when the fragment changes."""
    with chromium_page() as page:
        page.goto(served + "#t=9.0")
        page.wait_for_function("() => Math.abs(document.querySelector('#player').currentTime - 9) < 1.0")
        page.wait_for_function("() => document.querySelectorAll('.segment')[2].classList.contains('current')")
        page.evaluate("() => { location.hash = '#t=5.5'; }")
        page.wait_for_function("() => Math.abs(document.querySelector('#player').currentTime - 5.5) < 1.0")
    at = omniq_view(store.media_id, "--out", str(store.root), "--at", "9")
    assert at.returncode == 0 and at.stdout.strip() == f"{store.page}#t=9.0"
    with serving(store.media_id, "--out", str(store.root), "--at", "9") as url:
        assert url.endswith("/#t=9.0")
    assert omniq_view(store.media_id, "--out", str(store.root), "--at", "-1").returncode == 2


def test_the_launch_page_forwards_chromium_to_the_served_page(served: str) -> None:
    launch_page = write_launch_page(served)
    try:
        assert launch_page.stat().st_mode & 0o777 == 0o600  # it holds the token: other users must not read it
        with chromium_page() as page:
            page.goto(launch_page.as_uri())
            page.wait_for_url(served)
            assert page.locator(".segment").count() == len(SEGMENTS)
    finally:
        launch_page.unlink()


def test_s3_results_are_served_with_a_presigned_media_url(
    store: Store, s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    client = s3_server.client()
    key = "videos/sample talk #1.mp4"
    client.upload_file(str(store.video), s3_bucket, key)
    results = store.page.parent
    for path in results.rglob("*"):
        if path.is_file() and path.name != "index.html":
            client.upload_file(str(path), s3_bucket, f"omniq/{path.relative_to(store.root).as_posix()}")
    manifest = json.loads((results / "manifest.json").read_text()) | {"source": f"s3://{s3_bucket}/{key}"}
    client.put_object(Bucket=s3_bucket, Key=f"omniq/results/{store.media_id}/manifest.json", Body=json.dumps(manifest))
    env = dict(os.environ, OMNIQ_S3_ENDPOINT_URL=s3_server.endpoint_url, AWS_ACCESS_KEY_ID=s3_server.access_key)
    env |= {"AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "HOME": str(tmp_path)}
    with serving(store.media_id, "--out", f"s3://{s3_bucket}/omniq", env=env) as url:
        with urllib.request.urlopen(url, timeout=10) as response:
            html = response.read().decode()
        media = unescape(re.search(r'<video id="player"[^>]* src="([^"]+)"', html).group(1))
        assert media.startswith(f"{s3_server.endpoint_url}/{s3_bucket}/videos/sample%20talk%20%231.mp4?")
        with urllib.request.urlopen(media, timeout=10) as response:
            assert response.read() == store.video.read_bytes()
        assert html.count('class="thumb"') == 3
        with chromium_page() as page:
            page.goto(url)
            assert abs(seek_by_clicking(page, 1) - SEGMENTS[1][0]) < 1.5


def test_view_by_source_and_its_errors(store: Store) -> None:
    by_source = omniq_view(str(store.video), "--out", str(store.root))
    assert by_source.returncode == 0 and by_source.stdout.strip() == str(store.page)
    missing = omniq_view("f" * 20, "--out", str(store.root))
    assert missing.returncode == 2 and missing.stderr.startswith("omniq: no results for 'ffffffffffffffffffff'")
    refused = omniq_view(store.media_id, "--out", str(store.root), "--serve", "--host", "0.0.0.0")
    assert refused.returncode == 2 and "only listens on this machine" in refused.stderr


@pytest.mark.parametrize(
    ("header", "span"),
    [
        (None, None),
        ("bytes=0-", (0, 999)),
        ("bytes=100-199", (100, 199)),
        ("bytes=900-5000", (900, 999)),
        ("bytes=-10", (990, 999)),
        ("bytes=0-1,5-6", None),  # several ranges: the whole file, as RFC 9110 allows
        ("items=0-1", None),
    ],
)
def test_byte_range(header: str | None, span: tuple[int, int] | None) -> None:
    assert byte_range(header, 1000) == span


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5-3"])
def test_unsatisfiable_byte_range(header: str) -> None:
    with pytest.raises(ValueError, match="outside 1000 bytes"):
        byte_range(header, 1000)


def test_only_loopback_hosts() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_loopback(host)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(ConfigError, match="no authentication"):
            check_loopback(host)


def test_long_unbroken_words_wrap_inside_their_cards(tmp_path: Path) -> None:
    """A summary or transcript row with one 400-character token stays in its card: no page-wide overflow and no
    horizontal scroller in the transcript."""
    from tests.pipeline.test_viewer import page as render_page
    from tests.pipeline.test_viewer import results

    token = "x" * 400
    docs = results()
    docs["summary"]["summary"] = f"Before {token} after."
    docs["transcript"]["segments"][0]["text"] = f"Look: {token}"
    docs["captions"]["chunks"][0]["visual"] = token
    path = tmp_path / "index.html"
    path.write_text(render_page(docs))
    with chromium_page() as page:
        page.set_viewport_size({"width": 1000, "height": 800})
        page.goto(path.as_uri())
        overflow = page.evaluate(
            """() => {
              const out = (el) => el.getBoundingClientRect().right - el.closest('section').getBoundingClientRect().right;
              const list = document.querySelector('#transcript-list');
              return {
                page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
                summary: out(document.querySelector('#summary-text')),
                segment: out(document.querySelector('.segment .text')),
                transcript: list.scrollWidth - list.clientWidth,
              };
            }"""
        )
    assert overflow["page"] <= 0 and overflow["summary"] <= 1 and overflow["segment"] <= 1, overflow
    assert overflow["transcript"] <= 0, overflow


# -- the page's search box ------------------------------------------------------------------------------


def test_the_page_searches_itself_by_words_offline_and_jumps_to_the_moment(store: Store) -> None:
    requests: list[str] = []
    errors: list[str] = []
    with chromium_page() as page:
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: message.type == "error" and errors.append(message.text))
        page.goto(store.page.as_uri())
        assert page.locator("#search-mode option").all_inner_texts() == ["words"]
        assert "omniq view MEDIA --serve" in page.locator("#search-note").inner_text()
        page.wait_for_function(
            "() => { const p = document.querySelector('#player'); return p.seekable.length && p.seekable.end(0) > 10 }"
        )
        page.fill("#search-box", "SECOND start")  # every word, case folded, as the start of a word
        page.wait_for_function("() => document.querySelectorAll('#search-results .hit').length === 1")
        hit = page.locator("#search-results .hit")
        assert hit.locator("mark").all_inner_texts() == ["second", "starts"]
        assert hit.locator(".label").text_content() == "transcript" and hit.locator(".time").inner_text() == "0:05"
        hit.click()
        page.wait_for_function("() => Math.abs(document.querySelector('#player').currentTime - 5.0) < 1.0")
        page.fill("#search-box", "pattern")
        page.wait_for_function("() => document.querySelectorAll('#search-results .hit').length === 5")
        kinds = page.locator("#search-results .hit .label").all_text_contents()
        assert sorted(set(kinds)) == ["caption", "summary"]
        page.fill("#search-box", "submarine")
        page.wait_for_function("() => document.querySelector('#search-status').textContent.includes('No moment')")
        assert page.locator("#search-results .hit").count() == 0
        page.fill("#search-box", "<script>")  # text, never markup
        page.wait_for_function("() => document.querySelectorAll('#search-results .hit').length === 1")
        assert page.locator("#search-results .hit .text").inner_text().startswith("<script>alert(1)</script> | ")
    assert errors == [] and all(url.startswith(("file://", "data:")) for url in requests), requests


def test_the_served_page_searches_by_meaning_through_the_index(store: Store, tmp_path: Path) -> None:
    from pipeline.search import open_index, rebuild_index
    from tests.conftest import EMBEDDING_MODEL

    index_url = f"sqlite:///{tmp_path}/index.sqlite"
    env = dict(os.environ, OMNIQ_EMBEDDING_MODEL=EMBEDDING_MODEL, OMNIQ_INDEX_URL=index_url)
    settings = Settings(embedding_model=EMBEDDING_MODEL, index_url=index_url)
    with open_index(index_url, settings) as index:
        rebuild_index(LocalStorage(store.root), index)
    with serving(store.media_id, "--out", str(store.root), env=env) as url:
        for asked, status, message in (
            ("?q=%20&mode=hybrid", 400, "empty"),
            ("?q=hello&mode=fuzzy", 400, "search mode 'fuzzy'"),
        ):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + "search" + asked, timeout=30)
            assert refused.value.code == status and message in json.loads(refused.value.read())["error"]
        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(url.rsplit("/", 2)[0] + "/search?q=hello", timeout=30)
        assert no_token.value.code == 404
        with urllib.request.urlopen(url + "search?" + "q=" + "hello+" * 300 + "&mode=words", timeout=60) as answer:
            assert "searched for its first 1000" in json.loads(answer.read())["notice"]
        with chromium_page() as page:
            page.goto(url)
            assert page.locator("#search-mode").input_value() == "hybrid"
            page.fill("#search-box", "greetings, everybody")  # no word of "Hello and welcome."
            page.wait_for_function(
                "() => { const h = document.querySelector('#search-results .hit'); "
                "return h && h.dataset.mode === 'meaning' }",
                timeout=60_000,  # the first query waits for the model to load
            )
            first = page.locator("#search-results .hit").first
            assert first.locator(".text").inner_text() == "Hello and welcome."
            first.click()
            page.wait_for_function("() => Math.abs(document.querySelector('#player').currentTime - 0.5) < 1.0")
