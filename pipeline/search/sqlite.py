"""The default search backend: one SQLite file with an FTS5 table (embedded, no server).

SQLite needs a local file system: WAL mode and file locks are not safe on NFS or SMB shares.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.errors import ConfigError, OmniqError, SourceNotFound, TransientError
from pipeline.search.model import (
    BUSY_TIMEOUT_MS,
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    KINDS,
    SCHEMA_VERSION,
    IndexEntry,
    PerThreadConnection,
    SearchHit,
    clean_text,
    fts_query,
    like_prefix,
    mark_spans,
    split_marked,
)

log = logging.getLogger(__name__)

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
WHERE entries_fts MATCH ? AND (? IS NULL OR e.tag = ?) AND (? IS NULL OR e.kind = ?)
  AND (? IS NULL OR e.source LIKE ? ESCAPE '\\')
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


class SQLiteIndex(PerThreadConnection):
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
        self._local = threading.local()  # one connection per thread (sqlite3's rule), opened again after a fork
        self._connection()  # fail early on a bad path or an incompatible file

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
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
        self._local.conn, self._local.pid = conn, os.getpid()
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

    def search(
        self,
        query: str,
        limit: int = 10,
        *,
        tag: str | None = None,
        kind: str | None = None,
        source_prefix: str | None = None,
    ) -> list[SearchHit]:
        """The best ``limit`` entries holding every word of ``query`` (and ``tag``, ``kind``, a source starting
        with ``source_prefix``, if given), best first (bm25)."""
        if limit < 1:
            raise ValueError(f"search limit {limit} must be at least 1")
        prefix = None if source_prefix is None else like_prefix(source_prefix) + "%"
        hits = []
        for media_id, source, entry_tag, entry_kind, start, end, marked, rank in self._query(
            _SEARCH, (fts_query(query), tag, tag, kind, kind, prefix, prefix, limit)
        ):
            text, spans = split_marked(marked)
            highlighted = mark_spans(text, spans, HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE)
            score = -rank + 0.0  # bm25 is lower-is-better; + 0.0 turns -0.0 into 0.0
            hits.append(SearchHit(media_id, source, entry_kind, text, start, end, score, highlighted, entry_tag, spans))
        return hits

    def count(self) -> int:
        """How many entries the index holds."""
        return int(self._query("SELECT count(*) FROM entries", ())[0][0])

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error


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
        return TransientError(f"search index {path} stayed locked for {BUSY_TIMEOUT_MS // 1000} s")
    return ConfigError(
        f"search index {path}: {message}; if the file is damaged, delete it and run 'omniq index rebuild'"
    )


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
