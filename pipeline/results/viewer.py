"""``results/<media-id>/index.html``: one self-contained page to read and play a finished job.

The page holds the summary, a timeline of chunks (thumbnail, time span, captions, chunk summary) and the
timed transcript; clicking a segment or a chunk seeks the embedded player when the media is reachable
(a local ``file://`` URI, a presigned S3 URL, or ``/<token>/media`` on ``omniq view --serve``).

Everything in it comes from the model or the user, so every text is HTML-escaped; thumbnails are ``data:``
URIs, the CSS and the script are inline and pinned by hash in a Content-Security-Policy that allows no
other script, style, image, font, frame or connection, and media only from the player's own origin.
A stored page never holds a presigned URL (it would expire): ``omniq view`` renders a fresh one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.config import Settings
from pipeline.errors import PermanentError, SourceNotFound
from pipeline.results.viewer_assets import SCRIPT, STYLE
from pipeline.sources import display_source, local_path
from pipeline.spec import get_json, results_prefix
from pipeline.storage import Storage

log = logging.getLogger(__name__)

PAGE_NAME = "index.html"
THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_WIDTH = 160
PRESIGN_SECONDS = 12 * 3600  # how long a presigned media URL from ``omniq view`` stays valid


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


STYLE_HASH = _csp_hash(STYLE)
SCRIPT_HASH = _csp_hash(SCRIPT)


@dataclass
class ViewerInputs:
    """The stored results a page is made from."""

    manifest: dict[str, Any]
    transcript: dict[str, Any]
    captions: dict[str, Any]
    summary: dict[str, Any]
    thumbnails: dict[int, bytes]


def clock(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS`` (seconds rounded down), as players show times."""
    whole = max(0, math.floor(seconds)) if math.isfinite(seconds) else 0
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def source_name(source: str) -> str:
    """The file name of a source URI (``s3://b/dir/talk.mp4`` → ``talk.mp4``)."""
    if source.startswith("s3://"):
        name = PurePosixPath(source[len("s3://") :]).name
    else:
        name = PurePosixPath(unquote(urlsplit(source).path)).name
    return name or "media"


def _media_source(media_url: str) -> str:
    """The CSP ``media-src`` value that allows exactly the player's origin."""
    parts = urlsplit(media_url)
    if parts.scheme == "file":
        return "file:"
    if parts.scheme in ("http", "https") and parts.hostname:
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    if not parts.scheme and not parts.netloc and media_url.startswith("/"):
        return "'self'"
    raise ValueError(f"media URL {media_url!r}: use a file:, http(s): or /path URL")


def content_security_policy(media_url: str | None, search_url: str | None = None) -> str:
    """No network access at all except media from the player's origin, and (on ``omniq view --serve``) the
    server's own search of this media."""
    media = f" media-src {_media_source(media_url)};" if media_url else ""
    connect = " connect-src 'self';" if search_url else ""
    return (
        f"default-src 'none'; img-src data:;{media}{connect} style-src {STYLE_HASH}; script-src {SCRIPT_HASH}; "
        "base-uri 'none'; form-action 'none'"
    )


def _search_html(search_url: str | None) -> str:
    """The page's search box: by words in the page itself; by meaning and both through ``search_url``."""
    if search_url:
        options = (
            '<option value="hybrid" selected>words and meaning</option><option value="meaning">meaning</option>'
            '<option value="words">words</option>'
        )
        note = ""
    else:
        options = '<option value="words" selected>words</option>'
        note = (
            '<p class="note" id="search-note">Searching this page by words. To search by meaning too, open it '
            "with <code>omniq view MEDIA --serve</code>.</p>"
        )
    return (
        '<form id="search-form" role="search">'
        '<input type="search" id="search-box" maxlength="1000" autocomplete="off" '
        'placeholder="Find a moment\u2026" aria-label="Find a moment in this media">'
        f'<select id="search-mode" aria-label="Search by">{options}</select></form>\n'
        f'{note}<p class="note" id="search-status" role="status"></p>\n<ol id="search-results"></ol>'
    )


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _player_html(manifest: dict[str, Any], media_url: str | None, player_note: str | None) -> str:
    if not media_url and player_note:
        return f'<p class="note" id="no-player">{escape(player_note)}</p>'
    if not media_url:
        media_id = escape(str(manifest.get("media_id", "MEDIA_ID")))
        return (
            '<p class="note" id="no-player">The media is not reachable from this page, so it cannot be played '
            f"here. For a playable view run <code>omniq view {media_id}</code> where the source file or "
            "bucket can be read.</p>"
        )
    tag = "video" if (manifest.get("media") or {}).get("has_video", True) else "audio"
    return (
        f'<{tag} id="player" controls preload="metadata" src="{escape(media_url)}"></{tag}>\n'
        '<p class="note" id="player-error" hidden>The media could not be loaded from '
        f"<code>{escape(media_url)}</code>; run <code>omniq view "
        f"{escape(str(manifest.get('media_id', 'MEDIA_ID')))}</code> for a fresh link.</p>"
    )


def _span_attrs(item: Mapping[str, Any]) -> str:
    return f'data-start="{_number(item.get("start")):.3f}" data-end="{_number(item.get("end")):.3f}"'


def _time_button(start: float, end: float | None, playable: bool) -> str:
    label = clock(start) if end is None else f"{clock(start)}\u2013{clock(end)}"
    disabled = "" if playable else " disabled"
    return f'<button class="time" type="button"{disabled}>{label}</button>'


def _gaps(manifest: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The failed rows of one kind (README "Partial results"), as the manifest lists them."""
    return [row for row in manifest.get("failed_rows") or [] if isinstance(row, dict) and row.get("kind") == kind]


def _segments_html(transcript: dict[str, Any], playable: bool, gaps: Sequence[dict[str, Any]] = ()) -> str:
    rows: list[tuple[float, str]] = []
    for segment in transcript.get("segments") or []:
        button = _time_button(_number(segment.get("start")), None, playable)
        text = escape(str(segment.get("text", "")))
        item = f'<li class="segment" {_span_attrs(segment)}>{button}<span class="text">{text}</span></li>'
        rows.append((_number(segment.get("start")), item))
    for gap in gaps:  # the speech whose transcript row failed: a marked gap in its place
        button = _time_button(_number(gap.get("start")), _number(gap.get("end")), False)
        reason = escape(str(gap.get("reason", "")))
        item = f'<li class="gap" {_span_attrs(gap)}>{button}<span class="text">Not transcribed: {reason}</span></li>'
        rows.append((_number(gap.get("start")), item))
    rows = [(start, item) for start, item in sorted(rows, key=lambda row: row[0])]
    if not rows:
        return '<p class="empty">No speech was transcribed.</p>'
    return '<ol id="transcript-list">\n' + "\n".join(item for _, item in rows) + "\n</ol>"


def _chunks_html(
    captions: dict[str, Any],
    summary: dict[str, Any],
    thumbnails: dict[int, bytes],
    playable: bool,
    failed: Sequence[dict[str, Any]] = (),
) -> str:
    summaries = {int(c.get("index", -1)): str(c.get("summary", "")) for c in summary.get("chunks") or []}
    missing: dict[int, list[dict[str, Any]]] = {}
    for row in failed:
        if row.get("kind") in ("caption", "summary") and isinstance(row.get("chunk"), int):
            missing.setdefault(row["chunk"], []).append(row)
    rows = []
    for chunk in captions.get("chunks") or []:
        index = int(chunk.get("index", 0))
        start, end = _number(chunk.get("start")), _number(chunk.get("end"))
        if index in thumbnails:
            data = base64.b64encode(thumbnails[index]).decode()
            image = f'<img class="thumb" alt="frame at {clock(start)}" src="data:image/jpeg;base64,{data}">'
        else:
            image = ""
        texts = [("Seen", "visual", chunk.get("visual")), ("Heard", "audio", chunk.get("audio"))]
        texts.append(("Summary", "chunk-summary", summaries.get(index)))
        paragraphs = "".join(
            f'<p class="{kind}"><span class="label">{label}</span>{escape(str(text))}</p>'
            for label, kind, text in texts
            if text
        )
        paragraphs += "".join(
            f'<p class="gap"><span class="label">No {escape(str(row["kind"]))}</span>'
            f"{escape(str(row.get('reason')))}</p>"
            for row in missing.get(index, [])
        )
        rows.append(
            f'<li class="chunk" data-index="{index}" {_span_attrs(chunk)}>{image}'
            f'<div class="chunk-body">{_time_button(start, end, playable)}{paragraphs}</div></li>'
        )
    if not rows:
        return '<p class="empty">No chunks.</p>'
    return '<ol id="chunk-list">\n' + "\n".join(rows) + "\n</ol>"


def render_viewer(
    manifest: dict[str, Any],
    transcript: dict[str, Any],
    captions: dict[str, Any],
    summary: dict[str, Any],
    thumbnails: Mapping[int, bytes],
    media_url: str | None,
    player_note: str | None = None,
    search_url: str | None = None,
) -> str:
    """The page for one finished job as a self-contained HTML document (see the module docstring).

    ``thumbnails`` maps chunk indices to JPEG bytes; ``media_url`` is what the player plays (None: no player,
    and ``player_note`` says why in place of the generic note). ``search_url``: where the page asks for hits
    by meaning (``omniq view --serve``'s ``/<token>/search``); without it the box searches the page by words.
    """
    source = str(manifest.get("source", ""))
    name = escape(source_name(source))
    playable = bool(media_url)
    facts = [
        ("Source", display_source(source)),  # as people write it: a path, not a percent-encoded URI
        ("Duration", clock(_number(manifest.get("duration_s")))),
        ("Model", manifest.get("model")),
        ("Chunks", manifest.get("chunks")),
        ("Tag", manifest.get("tag")),
        ("Finished", manifest.get("finished_at")),
        ("Media id", manifest.get("media_id")),
    ]
    meta = "".join(f"<span>{label}: {escape(str(value))}</span>" for label, value in facts if value not in (None, ""))
    banner = ""
    if manifest.get("random_weights"):
        notice = manifest.get("notice") or "Written by a random-weight test model: this text is random."
        banner = f'<p class="banner" id="random-weights" role="alert">{escape(str(notice))}</p>'
    if manifest.get("status") == "partial":
        rows = manifest.get("rows") or {}
        banner += (
            f'<p class="banner" id="partial" role="status">Partial results: {escape(str(rows.get("failed")))} of '
            f"{escape(str(rows.get('total')))} rows failed and are marked below. <code>omniq retry "
            f"{escape(str(manifest.get('job_id', 'JOB_ID')))}</code> runs only those again.</p>"
        )
    summary_text = str(summary.get("summary") or "").strip()
    summary_gap = _gaps(manifest, "file_summary")
    summary_html = (
        f'<p id="summary-text">{escape(summary_text)}</p>'
        if summary_text
        else f'<p class="gap">No summary: {escape(str(summary_gap[0].get("reason")))}</p>'
        if summary_gap
        else '<p class="empty">No summary.</p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{escape(content_security_policy(media_url, search_url))}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name} \u2014 omniq</title>
<style>{STYLE}</style>
</head>
<body data-search="{escape(search_url or "")}">
<header>
<h1>{name}</h1>
<p class="meta">{meta}</p>
{banner}
</header>
<main>
<div class="side">
<section class="card" id="media">
{_player_html(manifest, media_url, player_note)}
</section>
<section class="card" id="search">
<h2>Find a moment</h2>
{_search_html(search_url)}
</section>
<section class="card" id="summary">
<h2>Summary</h2>
{summary_html}
</section>
</div>
<section class="card" id="transcript">
<h2>Transcript</h2>
{_segments_html(transcript, playable, _gaps(manifest, "transcript"))}
</section>
</main>
<section id="timeline">
<h2>Timeline</h2>
{_chunks_html(captions, summary, dict(thumbnails), playable, manifest.get("failed_rows") or [])}
</section>
<script>{SCRIPT}</script>
</body>
</html>
"""


def thumbnail_jpeg(frame: Path | bytes, max_width: int = THUMBNAIL_WIDTH) -> bytes:
    """A small JPEG of a frame (a path or image bytes), at most ``max_width`` pixels wide."""
    from PIL import Image

    with Image.open(io.BytesIO(frame) if isinstance(frame, bytes) else frame) as image:
        rgb = image.convert("RGB")
    if rgb.width > max_width:
        rgb = rgb.resize((max_width, max(1, round(rgb.height * max_width / rgb.width))), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=75, optimize=True)
    return buffer.getvalue()


def media_url_for(
    manifest: dict[str, Any], settings: Settings, *, presign: bool = True, expires_s: int = PRESIGN_SECONDS
) -> str | None:
    """Where a browser on this machine can play the source: its ``file://`` URI when the file exists here,
    a presigned GET URL for an ``s3://`` source (unless ``presign`` is false), else None."""
    source = str(manifest.get("source") or "")
    path = local_path(source) if source else None
    if path is not None:
        return path.resolve().as_uri() if path.is_file() else None
    if source.startswith("s3://") and presign:
        from pipeline.storage import s3_client, split_s3_uri

        bucket, key = split_s3_uri(source)
        params = {"Bucket": bucket, "Key": key}
        return str(s3_client(settings).generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))
    return None


def thumbnail_key(media_id: str, index: int) -> str:
    return f"{results_prefix(media_id)}/{THUMBNAIL_DIR}/{index:05d}.jpg"


def load_viewer_inputs(storage: Storage, media_id: str, manifest: dict[str, Any] | None = None) -> ViewerInputs:
    """Read a finished job's result files and thumbnails; ``manifest`` saves reading it (finalize has it)."""
    prefix = results_prefix(media_id)
    if manifest is None:
        if not storage.exists(f"{prefix}/manifest.json"):
            raise SourceNotFound(f"no results for media {media_id} in {storage.url}")
        manifest = get_json(storage, f"{prefix}/manifest.json")
    if manifest.get("status") not in ("done", "partial"):
        raise PermanentError(f"the job for media {media_id} did not finish ({manifest.get('error')}); nothing to view")
    thumbnails: dict[int, bytes] = {}
    for key in storage.list_keys(f"{prefix}/{THUMBNAIL_DIR}"):
        stem = PurePosixPath(key).stem
        if stem.isdigit() and key.endswith(".jpg"):
            thumbnails[int(stem)] = storage.get_bytes(key)
    return ViewerInputs(
        manifest,
        get_json(storage, f"{prefix}/transcript.json"),
        get_json(storage, f"{prefix}/captions.json"),
        get_json(storage, f"{prefix}/summary.json"),
        thumbnails,
    )


def write_viewer(storage: Storage, manifest: dict[str, Any], frames: Mapping[int, bytes], settings: Settings) -> str:
    """Store each chunk's thumbnail (made from the JPEG bytes ``frames[index]``) and ``index.html``.

    Call it after the result JSONs are written and before the manifest; returns the page's key. The page
    plays the source only when it is a local file that exists here (never a presigned URL, which expires).
    Deterministic, so a redelivered finalize rewrites nothing.
    """
    media_id = str(manifest["media_id"])
    for index, frame in sorted(frames.items()):
        try:
            thumbnail = thumbnail_jpeg(frame)
        except OSError as error:  # Pillow: not a readable image; a page without this thumbnail is still useful
            log.warning("no thumbnail for chunk %d of %s: %s", index, media_id, error)
            continue
        storage.put_bytes(thumbnail_key(media_id, index), thumbnail, "image/jpeg")
    inputs = load_viewer_inputs(storage, media_id, manifest)
    page = render_viewer(
        manifest,
        inputs.transcript,
        inputs.captions,
        inputs.summary,
        inputs.thumbnails,
        media_url_for(manifest, settings, presign=False),
    )
    key = f"{results_prefix(media_id)}/{PAGE_NAME}"
    storage.put_bytes(key, page.encode(), "text/html; charset=utf-8")
    return key
