"""``omniq view MEDIA_ID_OR_SOURCE``: open a finished job's page, or serve it on a local HTTP server.

The page is rendered again from the stored results with a fresh media URL (the local file, or a presigned
S3 URL), so it plays even when the stored ``index.html`` cannot. ``add_commands`` adds the command to the
``omniq`` parser; the page itself comes from ``pipeline.viewer``.
"""

from __future__ import annotations

import argparse
import ipaddress
import mimetypes
import os
import re
import socket
import tempfile
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import Settings
from pipeline.errors import ConfigError, SourceNotFound
from pipeline.sources import local_path, resolve_source
from pipeline.spec import get_json, results_prefix
from pipeline.storage import LocalStorage, Storage, open_storage
from pipeline.viewer import PAGE_NAME, load_viewer_inputs, media_url_for, render_viewer

MEDIA_ID = re.compile(r"[0-9a-f]{20}")
MEDIA_PATH = "/media"  # where ``--serve`` streams a local source file
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
    view.set_defaults(func=cmd_view)


def cmd_view(args: argparse.Namespace) -> int:
    """Find the job's results, render its page and open or serve it."""
    settings = Settings()
    if args.out:
        settings = settings.model_copy(update={"storage_url": args.out})
    storage = open_storage(settings.storage_url, settings)
    media_id = find_media_id(args.target, storage, settings)
    inputs = load_viewer_inputs(storage, media_id)
    if args.serve or not isinstance(storage, LocalStorage):
        check_loopback(args.host)
        source_path = local_path(str(inputs.manifest.get("source", "")))
        if source_path is not None and not source_path.is_file():
            source_path = None
        media_url = MEDIA_PATH if source_path is not None else media_url_for(inputs.manifest, settings)
        page = render_viewer(
            inputs.manifest, inputs.transcript, inputs.captions, inputs.summary, inputs.thumbnails, media_url
        )
        server = make_server(page.encode(), source_path, args.host, args.port)
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{server.server_address[1]}/"
        print(f"serving {url} (Ctrl-C stops)", flush=True)
        if not args.no_open:
            webbrowser.open(url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
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
    print(path, flush=True)
    if not args.no_open:
        webbrowser.open(path.as_uri())
    return 0


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
    except (SourceNotFound, ConfigError):
        pass
    newest: tuple[str, str] | None = None
    for key in storage.list_keys("results"):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != "manifest.json":
            continue
        manifest = get_json(storage, key)
        if manifest.get("source") == uri and manifest.get("status") == "done":
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


def make_server(page: bytes, media_path: Path | None, host: str, port: int) -> ThreadingHTTPServer:
    """A server for the page at ``/`` and, when given, the media file at ``/media`` (with Range support)."""

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
            path = urlsplit(self.path).path
            if path in ("/", f"/{PAGE_NAME}"):
                self._send(200, page, "text/html; charset=utf-8", body)
            elif path == MEDIA_PATH and media_path is not None:
                self._send_media(media_path, body)
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

        def _send_media(self, path: Path, body: bool) -> None:
            size = path.stat().st_size
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
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if span:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return
            with path.open("rb") as handle:
                handle.seek(start)
                remaining = end - start + 1
                try:
                    while remaining > 0:
                        block = handle.read(min(COPY_BLOCK, remaining))
                        if not block:
                            break
                        self.wfile.write(block)
                        remaining -= len(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the player moved on (a seek) and dropped this request

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        return Server((host, port), ViewerHandler)
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port} ({error}); choose another --port") from error
