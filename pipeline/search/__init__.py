"""Full-text search over finished results: transcript segments, captions and summaries with their time spans.

The index is a cache of the store: ``rebuild_index`` recreates it from ``results/*/`` at any time, and
``index_media`` keeps it current as jobs finish. ``SearchIndex`` is the interface; ``SQLiteIndex`` (FTS5,
one file, no server) is the default backend, ``PostgresIndex`` (``pipeline.search.postgres``) the one for a
fleet of machines; ``open_index`` picks one by the URL's scheme.

SQLite needs a local file system: WAL mode and file locks are not safe on NFS or SMB shares, so machines
that share a results directory over the network should each use their own ``OMNIQ_INDEX_URL``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError, OmniqError, PermanentError, TransientError
from pipeline.search.embed import Embedder, embedder_for
from pipeline.search.meaning import MODES, QUERY_MAX_CHARS
from pipeline.search.model import (
    CAPTION_JOINER,
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    JSON_FIELDS,
    KINDS,
    IndexEntry,
    SearchHit,
    SearchIndex,
    clean_text,
    fts_query,
    mark_spans,
    split_marked,
)
from pipeline.search.sqlite import SQLiteIndex, has_fts5, sqlite_path
from pipeline.storage import Storage

# The search API in one import; the types live in pipeline.search.model, the SQLite backend in .sqlite.
__all__ = [
    "CAPTION_JOINER",
    "HIGHLIGHT_CLOSE",
    "HIGHLIGHT_OPEN",
    "JSON_FIELDS",
    "KINDS",
    "MODES",
    "QUERY_MAX_CHARS",
    "Embedder",
    "IndexEntry",
    "SQLiteIndex",
    "SearchHit",
    "SearchIndex",
    "clean_text",
    "default_index_url",
    "embedder_for",
    "entries_from_results",
    "fts_query",
    "has_fts5",
    "index_media",
    "mark_spans",
    "open_index",
    "rebuild_index",
    "split_marked",
    "sqlite_path",
]

log = logging.getLogger(__name__)


PUBLISHED = ("done", "partial")  # manifests whose results are indexed (a partial job's good rows are published)


def _span(item: dict[str, Any]) -> tuple[float, float]:
    return float(item.get("start", 0.0)), float(item.get("end", 0.0))


def entries_from_results(
    manifest: dict[str, Any], transcript: dict[str, Any], captions: dict[str, Any], summary: dict[str, Any]
) -> list[IndexEntry]:
    """Index entries from one job's result documents (the README contract); [] unless the job is done
    (or partial: its good rows).

    A chunk's visual and audio captions become one "caption" entry (joined by ``CAPTION_JOINER``): they
    describe the same span, so a query may combine what is seen with what is heard, and one moment is one hit.
    """
    if manifest.get("status") not in PUBLISHED:
        return []
    media_id, source, tag = str(manifest["media_id"]), str(manifest.get("source") or ""), manifest.get("tag")
    language = manifest.get("language") or transcript.get("language")
    entries: list[IndexEntry] = []

    def add(kind: str, start: float, end: float, text: str) -> None:
        text = clean_text(text or "")
        if text:
            entries.append(IndexEntry(media_id, source, tag, kind, start, end, text, language))

    for segment in transcript.get("segments", []):
        add("transcript", *_span(segment), segment.get("text", ""))
    for chunk in captions.get("chunks", []):
        parts = [clean_text(chunk.get(name) or "") for name in ("visual", "audio")]
        add("caption", *_span(chunk), CAPTION_JOINER.join(part for part in parts if part))
    chunk_ends = [0.0]
    for chunk in summary.get("chunks", []):
        add("summary", *_span(chunk), chunk.get("summary", ""))
        chunk_ends.append(_span(chunk)[1])
    duration = manifest.get("duration_s")
    add("summary", 0.0, float(duration) if duration is not None else max(chunk_ends), summary.get("summary", ""))
    return entries


def _read_json(storage: Storage, key: str) -> dict[str, Any]:
    try:
        document = json.loads(storage.get_bytes(key))
    except ValueError as error:
        raise PermanentError(f"{storage.uri(key)}: not valid JSON ({error})") from error
    if not isinstance(document, dict):
        raise PermanentError(f"{storage.uri(key)}: expected a JSON object")
    return document


def _done_entries(storage: Storage, media_id: str) -> list[IndexEntry] | None:
    """A job's index entries read from the store, or None when its manifest is not done or partial."""
    prefix = f"results/{media_id}"
    manifest = _read_json(storage, f"{prefix}/manifest.json")
    if manifest.get("status") not in PUBLISHED:
        return None
    manifest = {**manifest, "media_id": media_id}  # the store's key is the id the index must use
    documents = [_read_json(storage, f"{prefix}/{name}.json") for name in ("transcript", "captions", "summary")]
    try:
        return entries_from_results(manifest, *documents)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise PermanentError(f"{storage.uri(prefix)}: results do not follow the documented format ({error})") from error


def _index_done_media(storage: Storage, media_id: str, index: SearchIndex) -> int | None:
    """Index one job if its manifest is done or partial (returns its entry count); else remove it and return None."""
    entries = _done_entries(storage, media_id)
    if entries is None:
        index.remove_media(media_id)
        return None
    return index.add_media(media_id, entries)


def index_media(storage: Storage, media_id: str, index: SearchIndex) -> int:
    """(Re)index one job from ``results/<media_id>/`` in ``storage``; returns the number of entries.

    A media whose manifest is not done or partial is removed from the index. ``storage`` is a
    ``pipeline.storage.Storage``.
    """
    return _index_done_media(storage, media_id, index) or 0


RebuildProgress = Callable[[str, int, str | None], None]  # media id, entries, error (None when indexed)
REBUILD_READERS = 16  # parallel reads of the store during a rebuild


def rebuild_index(storage: Storage, index: SearchIndex, progress: RebuildProgress | None = None) -> tuple[int, int]:
    """Make the index match the store: index every done job, drop media the store no longer has as done.

    A job whose files cannot be read is skipped (reported through ``progress`` and the log) and dropped from
    the index; transient storage errors propagate so a flaky store never empties the index.
    An index that holds another embedding model's vectors (or none) drops them first and gets this model's:
    every entry is embedded again. Returns (media indexed, entries indexed).
    """
    if index.use_embedder():
        log.info("search index: embeddings dropped; every entry is embedded again with the configured model")
    entry_count, indexed = 0, set()
    media_ids = (
        parts[1]
        for parts in (key.split("/") for key in storage.list_keys("results"))
        if len(parts) == 3 and parts[0] == "results" and parts[2] == "manifest.json"
    )

    def read(media_id: str) -> list[IndexEntry] | OmniqError | None:
        try:
            return _done_entries(storage, media_id)
        except TransientError:
            raise  # a flaky store must stop the rebuild, never empty the index
        except OmniqError as error:
            return error

    # the store is read by REBUILD_READERS threads (one request each: an S3 store answers them at once), the
    # index is written here, one media after another, in listing order
    with index.rebuilding(), ThreadPoolExecutor(REBUILD_READERS, thread_name_prefix="omniq-rebuild") as readers:
        while batch := list(islice(media_ids, 4 * REBUILD_READERS)):
            for media_id, found in zip(batch, readers.map(read, batch), strict=True):
                if isinstance(found, OmniqError):
                    log.warning("not indexing %s: %s", media_id, found)
                    if progress:
                        progress(media_id, 0, str(found))
                    continue
                if found is None:
                    index.remove_media(media_id)
                    continue
                indexed.add(media_id)
                count = index.add_media(media_id, found)
                entry_count += count
                if progress:
                    progress(media_id, count, None)
    for stale in index.media_ids() - indexed:
        index.remove_media(stale)
    return len(indexed), entry_count


def default_index_url(settings: Settings) -> str:
    """``OMNIQ_INDEX_URL`` if set; else ``index.sqlite`` in a local results directory, or in the cache dir."""
    if settings.index_url:
        return settings.index_url
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        directory = Path(unquote(parsed.netloc + parsed.path))
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        directory = Path(settings.storage_url)
    else:  # one file per store, so rebuilding from one bucket never drops another bucket's entries
        name = hashlib.sha256(settings.storage_url.encode()).hexdigest()[:12]
        return f"sqlite://{(settings.cache_dir / f'index-{name}.sqlite').resolve().as_posix()}"
    return f"sqlite://{(directory / 'index.sqlite').resolve().as_posix()}"


def open_index(url: str | None, settings: Settings, *, create: bool = True) -> SearchIndex:
    """The index at ``url`` (default: ``default_index_url(settings)``). ``create=False``: it must exist."""
    url = url or default_index_url(settings)
    scheme = urlparse(url).scheme
    embedder = embedder_for(settings.embedding_model)
    if scheme == "sqlite" or scheme == "" or len(scheme) == 1:
        return SQLiteIndex(sqlite_path(url), create=create, embedder=embedder)
    if scheme in ("postgresql", "postgres"):
        from pipeline.search.postgres import PostgresIndex

        return PostgresIndex(url, create=create, embedder=embedder)
    raise ConfigError(
        f"index URL {urlparse(url).scheme}://...: unsupported scheme {scheme!r}; use sqlite:///path.sqlite (the "
        "default, one machine) or postgresql://user:password@host/db (a fleet)"
    )
