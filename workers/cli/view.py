"""``omniq view MEDIA_ID_OR_SOURCE``: open a finished job's page, or serve it on a local HTTP server.

The page is rendered again from the stored results with a fresh media URL (the local file, or a presigned
S3 URL), so it plays even when the stored ``index.html`` cannot. ``add_commands`` adds the command to the
``omniq`` parser; the page itself comes from ``pipeline.results.viewer``.

``--serve`` listens on a loopback address only, and only under a random path (``/<token>/``) that it prints
and opens, since other users of this machine can reach a loopback port too. It streams the local source
only while that file is still the one the results were made from (see ``open_processed_source``): a
manifest names the file, and a manifest is not trusted to choose which files the server reads.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import mimetypes
import os
import re
import secrets
import socket
import sys
import tempfile
import webbrowser
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from stat import S_ISREG
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.config import Settings
from pipeline.errors import ConfigError, OmniqError, SourceNotFound
from pipeline.results.viewer import PAGE_NAME, ViewerInputs, load_viewer_inputs, media_url_for, render_viewer
from pipeline.sources import SourceRef, local_path, resolve_source
from pipeline.spec import get_json, results_prefix
from pipeline.storage import LocalStorage, Storage, open_storage

MEDIA_ID = re.compile(r"[0-9a-f]{20}")
MEDIA_NAME = "media"  # ``--serve`` streams a local source file at /<token>/media
SEARCH_NAME = "search"  # and answers the page's search box at /<token>/search?q=...&mode=...
SEARCH_LIMIT = 20
COPY_BLOCK = 256 * 1024


def add_commands(subparsers: Any) -> None:  # argparse's _SubParsersAction is private
    """Add ``view`` to the subcommands of the ``omniq`` parser."""
    view = subparsers.add_parser(
        "view",
        help="open a finished job's page (summary, timeline, transcript, player) in a browser",
        description="Renders results/<media-id>/index.html again with a playable media link and opens it; "
        "with --serve (always for S3 stores) serves it on a local HTTP server until Ctrl-C.",
    )
    view.add_argument("target", metavar="MEDIA_ID_OR_SOURCE", help="a media id, or the file/URI that was processed")
    view.add_argument("--out", help="results directory or s3://bucket/prefix (default: OMNIQ_STORAGE_URL)")
    view.add_argument("--serve", action="store_true", help="serve the page over HTTP instead of writing a file")
    view.add_argument("--host", default="127.0.0.1", help="loopback address to serve on (default 127.0.0.1)")
    view.add_argument("--port", type=int, default=0, help="port to serve on (default 0: any free port)")
    view.add_argument("--no-open", action="store_true", help="print the path or URL without opening a browser")
    view.add_argument(
        "--at", type=_seconds, metavar="SECONDS", help="open the page at this moment (index.html#t=SECONDS)"
    )
    view.set_defaults(func=cmd_view)

    transcript = subparsers.add_parser(
        "transcript",
        help="print what was said in a finished job: one line per subtitle cue, with its start time",
        description="Prints results/<media-id>/transcript.txt (or --json: transcript.json, with word times).",
    )
    transcript.add_argument(
        "target", metavar="MEDIA_ID_OR_SOURCE", help="a media id, or the file/URI that was processed"
    )
    transcript.add_argument("--out", help="results directory or s3://bucket/prefix (default: OMNIQ_STORAGE_URL)")
    transcript.add_argument("--lines", type=int, help="print only the first N lines")
    transcript.add_argument("--json", action="store_true", help="print transcript.json")
    transcript.set_defaults(func=cmd_transcript)


def _results_of(args: argparse.Namespace) -> tuple[Settings, Storage, str]:
    """The settings (with ``--out``), the store and the media id that ``args.target`` names."""
    settings = Settings()
    if args.out:
        settings = settings.model_copy(update={"storage_url": args.out})
    storage = open_storage(settings.storage_url, settings)
    return settings, storage, find_media_id(args.target, storage, settings)


def cmd_transcript(args: argparse.Namespace) -> int:
    """Print a finished job's transcript, and who wrote it."""
    _, storage, media_id = _results_of(args)
    prefix = results_prefix(media_id)
    if args.json:
        print(storage.get_bytes(f"{prefix}/transcript.json").decode(), end="")
        return 0
    document = json.loads(storage.get_bytes(f"{prefix}/transcript.json"))
    lines = storage.get_bytes(f"{prefix}/transcript.txt").decode().splitlines()
    shown = lines[: args.lines] if args.lines is not None else lines
    writer = {"whisper": "Whisper", "omni": "Qwen3-Omni"}.get(document.get("transcriber"), "the model")
    timed = "word" if document.get("times") == "words" else "utterance"
    print(f"# {len(lines)} cues written by {writer}, with {timed} times"
          + (f"; random text: {document['notice']}" if document.get("notice") else ""))  # fmt: skip
    for line in shown:
        print(line)
    if len(shown) < len(lines):
        print(f"# ... {len(lines) - len(shown)} more (omniq transcript {args.target})")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    """Find the job's results, render its page and open or serve it."""
    settings, storage, media_id = _results_of(args)
    inputs = load_viewer_inputs(storage, media_id)
    if args.serve or not isinstance(storage, LocalStorage):
        return serve_viewer(inputs, media_id, settings, args.host, args.port, open_browser=not args.no_open, at=args.at)
    media_url = media_url_for(inputs.manifest, settings)
    page = render_viewer(
        inputs.manifest, inputs.transcript, inputs.captions, inputs.summary, inputs.thumbnails, media_url
    )
    if media_url is None or media_url.startswith("file:"):
        key = f"{results_prefix(media_id)}/{PAGE_NAME}"
        storage.put_bytes(key, page.encode(), "text/html; charset=utf-8")
        path = storage.path(key)
    else:  # a presigned URL expires and is a credential of sorts: never into the results, and private
        fd, name = tempfile.mkstemp(prefix=f"omniq-view-{media_id}-", suffix=".html")
        with os.fdopen(fd, "wb") as handle:
            handle.write(page.encode())
        path = Path(name)
    moment = moment_fragment(args.at)
    print(f"{path}{moment}" if moment else path, flush=True)
    if not args.no_open:
        webbrowser.open(path.as_uri() + moment)
    return 0


def moment_fragment(seconds: float | None) -> str:
    """``#t=12.3``: the page fragment that opens the viewer at that moment (empty for None)."""
    return "" if seconds is None else f"#t={seconds:.1f}"


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a time in seconds (0 or more)")
    return value


def serve_viewer(
    inputs: ViewerInputs,
    media_id: str,
    settings: Settings,
    host: str,
    port: int,
    *,
    open_browser: bool,
    at: float | None = None,
) -> int:
    """Serve the page (and a local source that is still the processed file) on ``host`` until Ctrl-C."""
    check_loopback(host)
    token = secrets.token_urlsafe(32)
    source = str(inputs.manifest.get("source") or "")
    with ExitStack() as cleanup:
        media: SourceFile | None = None
        media_url, player_note = None, None
        if source and local_path(source) is not None:
            try:
                media = open_processed_source(inputs.manifest, media_id)
                cleanup.callback(media.close)
                media_url = f"/{token}/{MEDIA_NAME}"
            except ValueError as error:
                player_note = str(error)
        else:
            media_url = media_url_for(inputs.manifest, settings)
        search = media_search(media_id, settings)
        if search is not None:
            cleanup.callback(search.close)
        page = render_viewer(
            inputs.manifest,
            inputs.transcript,
            inputs.captions,
            inputs.summary,
            inputs.thumbnails,
            media_url,
            player_note,
            f"/{token}/{SEARCH_NAME}" if search is not None else None,
        )
        server = make_server(page.encode(), media, token, host, port, search)
        cleanup.callback(server.server_close)
        address = f"[{host}]" if ":" in host else host
        url = f"http://{address}:{server.server_address[1]}/{token}/{moment_fragment(at)}"
        print(f"serving {url} (Ctrl-C stops)", flush=True)
        if open_browser:
            launch_page = write_launch_page(url)
            cleanup.callback(launch_page.unlink, missing_ok=True)
            webbrowser.open(launch_page.as_uri())
        with suppress(KeyboardInterrupt):
            server.serve_forever()
    return 0


def write_launch_page(url: str) -> Path:
    """A private (0600) temporary page that forwards the browser to ``url``.

    The browser opens this file rather than the URL because command lines (the browser's, xdg-open's) are
    visible to every user of the machine, and the URL holds the token; Jupyter does the same.
    """
    fd, name = tempfile.mkstemp(prefix="omniq-view-", suffix=".html")
    link = escape(url)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(
            '<!DOCTYPE html>\n<meta charset="utf-8">\n<meta name="referrer" content="no-referrer">\n'
            f'<meta http-equiv="refresh" content="0;url={link}">\n<title>omniq view</title>\n'
            f'<p><a href="{link}">Open the omniq viewer</a></p>\n'
        )
    return Path(name)


def file_fingerprint(status: os.stat_result) -> str:
    """A local file's fingerprint as ``pipeline.sources.resolve_source`` takes it (and manifests record it)."""
    return f"size={status.st_size};mtime_ns={status.st_mtime_ns}"


@dataclass(frozen=True)
class SourceFile:
    """The processed local source, opened once; each request checks first that it is still that file.

    Serving from the descriptor checked at start means a path swapped afterwards (a rename, a symlink)
    changes nothing served, and a change to the file itself (its size or mtime) stops the serving.
    """

    path: Path
    descriptor: int
    fingerprint: str

    def current_size(self) -> int | None:
        """The file's size, or None when it changed since it was checked."""
        status = os.fstat(self.descriptor)
        return status.st_size if file_fingerprint(status) == self.fingerprint else None

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.descriptor, size, offset)  # positional: safe from the server's threads at once

    def close(self) -> None:
        os.close(self.descriptor)


def open_processed_source(manifest: dict[str, Any], media_id: str) -> SourceFile:
    """The local source the results of ``media_id`` were made from, opened, if this is still that file.

    It must be a regular file (not a symlink, device, FIFO or folder) whose fingerprint (size and mtime) is
    the manifest's, and naming it as omniq names sources (its URI and that fingerprint) must give
    ``media_id``. A manifest edited to name another file, or a file changed or replaced since, fails: its bytes
    are not this job's media. Raises ValueError with the reason, which the page shows instead of the player.
    """
    source = str(manifest.get("source") or "")
    path = local_path(source)
    if path is None:
        raise ValueError(f"The source {source} is not a local file, so this page has no player.")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise ValueError(
            f"The source file {path} cannot be opened here ({error.strerror}), so the player is off; "
            "run omniq view where the processed file can be read."
        ) from error
    status = os.fstat(descriptor)
    fingerprint = file_fingerprint(status)
    if not S_ISREG(status.st_mode):
        os.close(descriptor)
        raise ValueError(f"The source {path} is not a regular file, so the player is off.")
    named = SourceRef(source, fingerprint, status.st_size).media_id  # as the job named it, if it is the file
    if fingerprint != manifest.get("fingerprint") or named != media_id:
        os.close(descriptor)
        raise ValueError(
            f"The source file {path} changed since it was processed (or is not the file that was), so the "
            "player is off: process it again to play it here."
        )
    return SourceFile(path, descriptor, fingerprint)


def find_media_id(target: str, storage: Storage, settings: Settings) -> str:
    """The media id of ``target``: a media id with results, or a source whose results are in ``storage``.

    A source is found by its current media id, else by the newest done manifest naming it as its source
    (the file may have changed or gone since it was processed).
    """
    if MEDIA_ID.fullmatch(target) and storage.exists(f"{results_prefix(target)}/manifest.json"):
        return target
    uri = _source_uri(target)
    try:
        ref = resolve_source(target, settings)
        uri = ref.uri
        if storage.exists(f"{results_prefix(ref.media_id)}/manifest.json"):
            return ref.media_id
    except OmniqError:  # gone, unreadable or unreachable: the manifests still name it
        pass
    newest: tuple[str, str] | None = None
    for key in storage.list_keys("results"):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != "manifest.json":
            continue
        manifest = get_json(storage, key)
        if manifest.get("source") == uri and manifest.get("status") in ("done", "partial"):
            finished = str(manifest.get("finished_at") or "")
            if newest is None or finished > newest[0]:
                newest = (finished, parts[1])
    if newest is not None:
        return newest[1]
    raise SourceNotFound(
        f"no results for {target!r} in {storage.url}: give a media id (a results/<media-id>/ folder) or the "
        "file or URI of a finished job, and --out or OMNIQ_STORAGE_URL where its results are"
    )


def _source_uri(target: str) -> str:
    """How a manifest names ``target`` as its source (local paths become absolute file:// URIs)."""
    path = local_path(target)
    return path.expanduser().resolve().as_uri() if path is not None else target


def check_loopback(host: str) -> None:
    """Refuse addresses beyond this machine: the viewer has no authentication."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"--host {host}: omniq view has no authentication, so it only listens on this machine "
            "(127.0.0.1, ::1 or localhost); use an SSH tunnel to view it from elsewhere"
        )


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive span of a single ``Range: bytes=…`` header, or None for the whole file.

    Raises ValueError when the range cannot be satisfied (answered with 416).
    """
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None or not any(match.groups()):
        return None  # absent, malformed or multi-range: the whole file, as RFC 9110 allows
    first, last = match.groups()
    if not first:
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ValueError(f"range {header!r} outside {size} bytes")
    return start, end


def requested_resource(request_path: str, token: str) -> str | None:
    """What a request path asks for under ``/<token>/`` (``/``, ``/media``…), or None without the token.

    The token is compared in constant time, so how long an answer takes says nothing about a guess.
    """
    given, _, rest = urlsplit(request_path).path.removeprefix("/").partition("/")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return None
    return "/" + rest


class MediaSearch:
    """The page's search by meaning and both: the search index, restricted to one media, asked from one thread
    (one connection, one cached matrix of vectors) whatever the server's threads."""

    def __init__(self, index: Any, media_id: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.index, self.media_id = index, media_id
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="omniq-view-search")
        self._thread.submit(lambda: index.embedder.encode(["warm up"]))  # the model loads now, not on a query

    def answer(self, query: str, mode: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for the page: ``{hits, notice}``, or ``{error}``."""
        from pipeline.search import MODES, QUERY_MAX_CHARS, clean_text

        if mode not in MODES:
            return 400, {"error": f"search mode {mode!r}: use one of {', '.join(MODES)}"}
        if not clean_text(query):
            return 400, {"error": "the search query is empty: type one or more words"}
        notice = None
        if len(query) > QUERY_MAX_CHARS:
            notice = f"the query has {len(query)} characters; searched for its first {QUERY_MAX_CHARS}"
            query = query[:QUERY_MAX_CHARS]

        def run() -> list[Any]:
            return self.index.search(query, SEARCH_LIMIT, mode=mode, media_id=self.media_id)

        try:
            hits = self._thread.submit(run).result()
        except (OmniqError, ValueError) as error:  # a model the index was not built with, a query of no words
            return 409 if isinstance(error, OmniqError) else 400, {"error": str(error)}
        return 200, {"hits": [hit.to_json() for hit in hits], "notice": notice}

    def close(self) -> None:
        self._thread.submit(self.index.close).result()
        self._thread.shutdown()


def media_search(media_id: str, settings: Settings) -> MediaSearch | None:
    """Search by meaning for the served page, or None where there is no index to ask or no embedding model
    (the page then searches its own text by words)."""
    from pipeline.search import embedder_for, open_index

    try:
        embedder = embedder_for(settings.embedding_model)
        if embedder is None:
            return None
        index = open_index(settings.index_url, settings, create=False)
    except OmniqError as error:
        print(f"omniq: the page searches by words only: {error}", file=sys.stderr)
        return None
    return MediaSearch(index, media_id)


def make_server(
    page: bytes, media: SourceFile | None, token: str, host: str, port: int, search: MediaSearch | None = None
) -> ThreadingHTTPServer:
    """A server for the page at ``/<token>/``, when given the media file at ``/<token>/media`` (with Range),
    and the search of this media at ``/<token>/search?q=QUERY&mode=words|meaning|hybrid`` (JSON).

    Any other path, and every path without the token, gets 404 and no content: a request without the token
    learns nothing, not even whether there is media. ``/<token>/media`` is 404 too when there is no media
    (the source was not the processed file at start, so there never was any here), and 410 Gone once the
    file changes while serving (there was, and it is no longer the processed file).
    """

    class ViewerHandler(BaseHTTPRequestHandler):
        server_version = "omniq-view"

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            if not self._host_allowed():  # a DNS-rebinding page must not read the results
                self._send(421, b"wrong Host header\n", "text/plain", body)
                return
            resource = requested_resource(self.path, token)
            if resource in ("/", f"/{PAGE_NAME}"):
                self._send(200, page, "text/html; charset=utf-8", body)
            elif resource == f"/{MEDIA_NAME}" and media is not None:
                self._send_media(media, body)
            elif resource == f"/{SEARCH_NAME}" and search is not None:
                asked = parse_qs(urlsplit(self.path).query)
                status, answer = search.answer(asked.get("q", [""])[0], asked.get("mode", ["hybrid"])[0])
                self._send(status, json.dumps(answer).encode(), "application/json", body)
            else:
                self._send(404, b"not found\n", "text/plain", body)

        def _host_allowed(self) -> bool:
            name = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            return name in ("localhost", "127.0.0.1", "::1", host)

        def _send(self, status: int, data: bytes, content_type: str, body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _send_media(self, media: SourceFile, body: bool) -> None:
            size = media.current_size()
            if size is None:
                self._send(410, b"the source file changed since it was processed\n", "text/plain", body)
                return
            try:
                span = byte_range(self.headers.get("Range"), size)
            except ValueError:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = span or (0, size - 1)
            self.send_response(206 if span else 200)
            self.send_header("Content-Type", mimetypes.guess_type(media.path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Cache-Control", "no-store")
            if span:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return
            offset, remaining = start, end - start + 1
            try:
                while remaining > 0:
                    block = media.read(offset, min(COPY_BLOCK, remaining))
                    if not block:
                        break
                    self.wfile.write(block)
                    offset += len(block)
                    remaining -= len(block)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the player moved on (a seek) and dropped this request

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = Server((host, port), ViewerHandler)
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port} ({error}); choose another --port") from error
    if not ipaddress.ip_address(server.server_address[0]).is_loopback:  # e.g. "localhost" mapped elsewhere
        server.server_close()
        raise ConfigError(f"--host {host} resolved to {server.server_address[0]}, not a loopback address")
    return server
