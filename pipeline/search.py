"""Full-text search over finished results: transcript segments, captions and summaries with their time spans.

The index is a cache of the store: ``rebuild_index`` recreates it from ``results/*/`` at any time, and
``index_media`` keeps it current as jobs finish. ``SearchIndex`` is the interface; ``SQLiteIndex`` (FTS5,
one file, no server) is the default backend. A shared search server for many machines plugs in by
implementing ``SearchIndex`` and adding its URL scheme to ``open_index``.

SQLite needs a local file system: WAL mode and file locks are not safe on NFS or SMB shares, so machines
that share a results directory over the network should each use their own ``OMNIQ_INDEX_URL``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError, OmniqError, PermanentError, SourceNotFound, TransientError
from pipeline.storage import Storage

log = logging.getLogger(__name__)

KINDS = ("transcript", "caption", "summary")
# ``SearchHit.highlighted`` wraps each match in these (U+27E6 / U+27E7, mathematical white square brackets):
# unlike [ and ], which transcripts use for "[music]" and the like, they do not occur in speech or captions.
# ``SearchHit.spans`` gives the same matches as exact character offsets into ``text``.
HIGHLIGHT_OPEN = "\u27e6"
HIGHLIGHT_CLOSE = "\u27e7"
JSON_FIELDS = ("media_id", "source", "kind", "text", "start", "end", "score")  # a public contract
CAPTION_JOINER = " | "  # between the visual and the audio caption of one chunk
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

# FTS5's highlight() wraps matches in these; indexed text never holds control characters (see clean_text).
_MARK_OPEN, _MARK_CLOSE = "\x02", "\x03"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class IndexEntry:
    """One searchable text of a media file, with the time span it covers (seconds)."""

    media_id: str
    source: str
    tag: str | None
    kind: str  # transcript | caption | summary
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class SearchHit:
    """One ranked match. ``score``: higher is better. ``highlighted``: ``text`` with matches in ⟦ ⟧."""

    media_id: str
    source: str
    kind: str
    text: str
    start: float
    end: float
    score: float
    highlighted: str
    tag: str | None = None
    spans: tuple[tuple[int, int], ...] = ()  # (start, end) character offsets of the matches in ``text``

    def to_json(self) -> dict[str, Any]:
        """The documented ``omniq search --json`` shape: exactly ``JSON_FIELDS``."""
        return {name: getattr(self, name) for name in JSON_FIELDS}


class SearchIndex(Protocol):
    """Where finished results are searched. Implementations must make ``add_media`` replace atomically."""

    def add_media(self, media_id: str, entries: Iterable[IndexEntry]) -> int: ...
    def remove_media(self, media_id: str) -> int: ...
    def media_ids(self) -> set[str]: ...
    def search(self, query: str, limit: int = 10, *, tag: str | None = None) -> list[SearchHit]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


def clean_text(text: str) -> str:
    """One line without control characters (so no terminal escapes, and FTS5's markers stay unambiguous)."""
    return " ".join(_CONTROL.sub(" ", text).split())


def fts_query(query: str) -> str:
    """The user's words as an FTS5 query: every token quoted (no operators), all required; ``word*`` = prefix.

    Raises ValueError for a query without words.
    """
    tokens = clean_text(query).split()
    if not tokens:
        raise ValueError(f"search query {query!r} is empty: give one or more words")
    terms = []
    for token in tokens:
        prefix = token.endswith("*") and token.rstrip("*") != ""
        body = token.rstrip("*") if prefix else token
        terms.append('"' + body.replace('"', '""') + '"' + ("*" if prefix else ""))
    return " ".join(terms)


def split_marked(marked: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Text and match spans from highlight() output that uses the internal control-character markers."""
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    length, opened = 0, -1
    for part in re.split(f"([{_MARK_OPEN}{_MARK_CLOSE}])", marked):
        if part == _MARK_OPEN:
            opened = length
        elif part == _MARK_CLOSE:
            if opened >= 0:
                spans.append((opened, length))
            opened = -1
        else:
            text.append(part)
            length += len(part)
    return "".join(text), tuple(spans)


def mark_spans(text: str, spans: Iterable[tuple[int, int]], open_: str, close: str) -> str:
    """``text`` with each span wrapped in ``open_`` … ``close`` (ANSI codes, brackets, HTML tags)."""
    pieces, last = [], 0
    for start, end in sorted(spans):
        pieces += [text[last:start], open_, text[start:end], close]
        last = end
    return "".join(pieces) + text[last:]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, media_id TEXT NOT NULL, source TEXT NOT NULL, tag TEXT, kind TEXT NOT NULL,
    start REAL NOT NULL, "end" REAL NOT NULL, text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_media ON entries (media_id);
CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5 (
    text, content='entries', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS entries_ai AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS entries_ad AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
"""
_SEARCH = """
SELECT e.media_id, e.source, e.tag, e.kind, e.start, e."end", highlight(entries_fts, 0, char(2), char(3)),
       bm25(entries_fts) AS rank_value
FROM entries_fts JOIN entries AS e ON e.id = entries_fts.rowid
WHERE entries_fts MATCH ? AND (? IS NULL OR e.tag = ?)
ORDER BY rank_value, e.media_id, e.start, e.kind LIMIT ?
"""


@functools.cache
def has_fts5() -> bool:
    """Whether this Python's sqlite3 module can create FTS5 tables."""
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("CREATE VIRTUAL TABLE probe USING fts5 (text)")
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()
    return True


class SQLiteIndex:
    """The default ``SearchIndex``: one SQLite file with an FTS5 table, ranked by bm25.

    WAL mode and a busy timeout let several processes write (one transaction per media) while others
    search. A connection is opened lazily in the process that uses it, and again after a fork.
    """

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        if not has_fts5():
            raise ConfigError(
                f"this Python's sqlite3 (SQLite {sqlite3.sqlite_version}) has no FTS5, which the search index "
                "needs: use a Python whose SQLite is built with FTS5 (python.org, Debian/Ubuntu and conda builds are)"
            )
        if not create and not path.is_file():
            raise SourceNotFound(
                f"no search index at {path}: run 'omniq index rebuild' to build it from the stored results, "
                "or set OMNIQ_INDEX_URL to where it is"
            )
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connection()  # fail early on a bad path or an incompatible file

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _enable_wal(conn, self.path)
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ConfigError(
                    f"search index {self.path} has schema version {version}, this omniq uses {SCHEMA_VERSION}: "
                    "delete the file and run 'omniq index rebuild'"
                )
            if version == 0:  # a new file; IF NOT EXISTS makes a concurrent creator harmless
                conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as error:
            conn.close()
            raise _translate(error, self.path) from error
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _replace(self, media_id: str, entries: list[IndexEntry]) -> int:
        """Delete the media's entries and insert ``entries`` in one transaction; returns how many were deleted."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock upgrading a read lock
            try:
                removed = conn.execute("DELETE FROM entries WHERE media_id = ?", (media_id,)).rowcount
                conn.executemany(
                    'INSERT INTO entries (media_id, source, tag, kind, start, "end", text) '
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(media_id, e.source, e.tag, e.kind, e.start, e.end, e.text) for e in entries],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error
        return removed

    def add_media(self, media_id: str, entries: Iterable[IndexEntry]) -> int:
        """Replace every entry of ``media_id`` with ``entries`` (empty texts are skipped); returns how many."""
        cleaned = []
        for entry in entries:
            if entry.kind not in KINDS:
                raise ValueError(f"index entry kind {entry.kind!r} of {media_id}: use one of {', '.join(KINDS)}")
            text = clean_text(entry.text)
            if text:
                cleaned.append(IndexEntry(media_id, entry.source, entry.tag, entry.kind, entry.start, entry.end, text))
        self._replace(media_id, cleaned)
        return len(cleaned)

    def remove_media(self, media_id: str) -> int:
        """Drop every entry of ``media_id``; returns how many there were."""
        return self._replace(media_id, [])

    def media_ids(self) -> set[str]:
        """Every media id with entries in the index."""
        return {row[0] for row in self._query("SELECT DISTINCT media_id FROM entries", ())}

    def search(self, query: str, limit: int = 10, *, tag: str | None = None) -> list[SearchHit]:
        """The best ``limit`` entries holding every word of ``query`` (and ``tag``, if given), best first (bm25)."""
        if limit < 1:
            raise ValueError(f"search limit {limit} must be at least 1")
        hits = []
        for media_id, source, entry_tag, kind, start, end, marked, rank in self._query(
            _SEARCH, (fts_query(query), tag, tag, limit)
        ):
            text, spans = split_marked(marked)
            highlighted = mark_spans(text, spans, HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE)
            score = -rank + 0.0  # bm25 is lower-is-better; + 0.0 turns -0.0 into 0.0
            hits.append(SearchHit(media_id, source, kind, text, start, end, score, highlighted, entry_tag, spans))
        return hits

    def count(self) -> int:
        """How many entries the index holds."""
        return int(self._query("SELECT count(*) FROM entries", ())[0][0])

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error

    def close(self) -> None:
        """Close this process's connection; the index opens it again when used."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> SQLiteIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    """Switch the file to WAL. SQLite answers "locked" at once, without waiting, while another process
    does the same on a new file, so this waits here (up to the busy timeout)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    if str(mode).lower() != "wal":
        log.warning(
            "search index %s: SQLite kept journal mode %r instead of WAL; readers may wait for writers", path, mode
        )


def _translate(error: sqlite3.DatabaseError, path: Path) -> OmniqError:
    message = str(error)
    if "locked" in message or "busy" in message:
        return TransientError(f"search index {path} stayed locked for {BUSY_TIMEOUT_MS // 1000} s; will retry")
    return ConfigError(
        f"search index {path}: {message}; if the file is damaged, delete it and run 'omniq index rebuild'"
    )


def _span(item: dict[str, Any]) -> tuple[float, float]:
    return float(item.get("start", 0.0)), float(item.get("end", 0.0))


def entries_from_results(
    manifest: dict[str, Any], transcript: dict[str, Any], captions: dict[str, Any], summary: dict[str, Any]
) -> list[IndexEntry]:
    """Index entries from one job's result documents (the README contract); [] unless the job is done.

    A chunk's visual and audio captions become one "caption" entry (joined by ``CAPTION_JOINER``): they
    describe the same span, so a query may combine what is seen with what is heard, and one moment is one hit.
    """
    if manifest.get("status") != "done":
        return []
    media_id, source, tag = str(manifest["media_id"]), str(manifest.get("source") or ""), manifest.get("tag")
    entries: list[IndexEntry] = []

    def add(kind: str, start: float, end: float, text: str) -> None:
        text = clean_text(text or "")
        if text:
            entries.append(IndexEntry(media_id, source, tag, kind, start, end, text))

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


def _index_done_media(storage: Storage, media_id: str, index: SearchIndex) -> int | None:
    """Index one job if its manifest is done (returns its entry count); else remove it and return None."""
    prefix = f"results/{media_id}"
    manifest = _read_json(storage, f"{prefix}/manifest.json")
    if manifest.get("status") != "done":
        index.remove_media(media_id)
        return None
    manifest = {**manifest, "media_id": media_id}  # the store's key is the id the index must use
    documents = [_read_json(storage, f"{prefix}/{name}.json") for name in ("transcript", "captions", "summary")]
    try:
        entries = entries_from_results(manifest, *documents)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise PermanentError(f"{storage.uri(prefix)}: results do not follow the documented format ({error})") from error
    return index.add_media(media_id, entries)


def index_media(storage: Storage, media_id: str, index: SearchIndex) -> int:
    """(Re)index one job from ``results/<media_id>/`` in ``storage``; returns the number of entries.

    A media whose manifest is not done is removed from the index. ``storage`` is a ``pipeline.storage.Storage``.
    """
    return _index_done_media(storage, media_id, index) or 0


RebuildProgress = Callable[[str, int, str | None], None]  # media id, entries, error (None when indexed)


def rebuild_index(storage: Storage, index: SearchIndex, progress: RebuildProgress | None = None) -> tuple[int, int]:
    """Make the index match the store: index every done job, drop media the store no longer has as done.

    A job whose files cannot be read is skipped (reported through ``progress`` and the log) and dropped from
    the index; transient storage errors propagate so a flaky store never empties the index.
    Returns (media indexed, entries indexed).
    """
    entry_count, indexed = 0, set()
    for key in storage.list_keys("results"):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "results" or parts[2] != "manifest.json":
            continue
        media_id = parts[1]
        try:
            count = _index_done_media(storage, media_id, index)
        except TransientError:
            raise
        except OmniqError as error:
            log.warning("not indexing %s: %s", media_id, error)
            if progress:
                progress(media_id, 0, str(error))
            continue
        if count is not None:
            indexed.add(media_id)
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


def sqlite_path(url: str) -> Path:
    """The file of ``sqlite:///abs/path``, ``sqlite:///./rel``, ``sqlite://./rel`` or a plain path."""
    parsed = urlparse(url)
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:
        return Path(url)
    if parsed.netloc in (".", ".."):  # sqlite://./rel.sqlite, as file://./dir is for storage
        return Path(unquote(parsed.netloc + parsed.path))
    if parsed.netloc:
        raise ConfigError(f"index URL {url!r} names a host: SQLite needs a local file, sqlite:///abs/path.sqlite")
    path = unquote(parsed.path)
    if path.startswith(("/./", "/../")):
        return Path(path[1:])
    if not path.strip("/"):
        raise ConfigError(f"index URL {url!r} names no file: use sqlite:///abs/path.sqlite or sqlite:///./rel.sqlite")
    return Path("/" + path.lstrip("/"))


def open_index(url: str | None, settings: Settings, *, create: bool = True) -> SearchIndex:
    """The index at ``url`` (default: ``default_index_url(settings)``). ``create=False``: it must exist."""
    url = url or default_index_url(settings)
    scheme = urlparse(url).scheme
    if scheme == "sqlite" or scheme == "" or len(scheme) == 1:
        return SQLiteIndex(sqlite_path(url), create=create)
    raise ConfigError(
        f"index URL {url!r}: unsupported scheme {scheme!r}; omniq has sqlite:///path.sqlite (the default). "
        "A shared search server can be plugged in by implementing pipeline.search.SearchIndex "
        "and adding its scheme to open_index"
    )
