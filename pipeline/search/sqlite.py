"""The default search backend: one SQLite file with an FTS5 table and the entries' embeddings (embedded, no server).

Each entry's vector (float32 bytes) is a column of its row, so it is written, replaced and deleted in the same
transaction as the entry and its FTS row. ``meta`` records the embedding model and dimension and a change
counter that every write moves; search by meaning is exact, over the vectors cached in the searching process
(``pipeline.search.meaning.VectorCache``), which reads only what changed when the counter moves.

SQLite needs a local file system: WAL mode and file locks are not safe on NFS or SMB shares.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from pipeline.errors import ConfigError, OmniqError, SourceNotFound, TransientError
from pipeline.search.embed import Embedder, recorded_name
from pipeline.search.meaning import (
    Filters,
    Searcher,
    VectorCache,
    check_dim,
    check_recorded,
    embed_entries,
    meaning_hits,
)
from pipeline.search.model import (
    BUSY_TIMEOUT_MS,
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    KINDS,
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

SCHEMA_VERSION = 2

# AUTOINCREMENT: an id is never used twice, so a process's cached vectors are never taken for another entry's
_ENTRIES = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT, media_id TEXT NOT NULL, source TEXT NOT NULL, tag TEXT,
    kind TEXT NOT NULL, start REAL NOT NULL, "end" REAL NOT NULL, text TEXT NOT NULL, vector BLOB
);
"""
_INDEX_AND_TRIGGERS = """
CREATE INDEX entries_media ON entries (media_id);
CREATE TRIGGER entries_ai AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER entries_ad AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('changes', '0');
"""
_FTS = """
CREATE VIRTUAL TABLE entries_fts USING fts5 (
    text, content='entries', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
);
"""
_SCHEMA = _ENTRIES.format(name="entries") + _FTS + _INDEX_AND_TRIGGERS
# version 1 had no vectors, no meta and reusable ids: its rows move to the new table (FTS rows keep their ids),
# and an index that held entries records that they have no embeddings, so a rebuild is asked for
_FROM_VERSION_1 = (
    _ENTRIES.format(name="entries_v2")  # noqa: S608
    + """
INSERT INTO entries_v2 (id, media_id, source, tag, kind, start, "end", text)
    SELECT id, media_id, source, tag, kind, start, "end", text FROM entries;
DROP TRIGGER entries_ai;
DROP TRIGGER entries_ad;
DROP INDEX entries_media;
DROP TABLE entries;
ALTER TABLE entries_v2 RENAME TO entries;
"""
    + _INDEX_AND_TRIGGERS
    + "INSERT INTO meta (key, value) SELECT 'embedding_model', 'none' WHERE EXISTS (SELECT 1 FROM entries);"
)
_FILTERS = """(? IS NULL OR e.tag = ?) AND (? IS NULL OR e.kind = ?) AND (? IS NULL OR e.source LIKE ? ESCAPE '\\')
  AND (? IS NULL OR e.media_id = ?) AND (? IS NULL OR e."end" >= ?) AND (? IS NULL OR e.start <= ?)"""
_SEARCH = f"""
SELECT e.media_id, e.source, e.tag, e.kind, e.start, e."end", highlight(entries_fts, 0, char(2), char(3)),
       bm25(entries_fts) AS rank_value
FROM entries_fts JOIN entries AS e ON e.id = entries_fts.rowid
WHERE entries_fts MATCH ? AND {_FILTERS}
ORDER BY rank_value, e.media_id, e.start, e.kind LIMIT ?
"""  # noqa: S608
_ALLOWED = f"SELECT e.id FROM entries AS e WHERE e.vector IS NOT NULL AND {_FILTERS}"  # noqa: S608


def _filter_parameters(filters: Filters) -> tuple[Any, ...]:
    prefix = None if filters.source_prefix is None else like_prefix(filters.source_prefix) + "%"
    values = (filters.tag, filters.kind, prefix, filters.media_id, filters.time_from, filters.time_to)
    return tuple(value for value in values for _ in (0, 1))


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


class SQLiteIndex(Searcher, PerThreadConnection):
    """The default ``SearchIndex``: one SQLite file with an FTS5 table (ranked by bm25) and the entries' vectors.

    WAL mode and a busy timeout let several processes write (one transaction per media) while others
    search. A connection is opened lazily in the process that uses it, and again after a fork.
    ``embedder``: the model that embeds entries and queries (None: words only, recorded as ``none``).
    """

    def __init__(self, path: Path, *, create: bool = True, embedder: Embedder | None = None) -> None:
        self.path = path
        self.embedder = embedder
        self._vectors = VectorCache()
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
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"search index {self.path} has schema version {version}, this omniq uses {SCHEMA_VERSION}: "
                    "delete the file and run 'omniq index rebuild'"
                )
            if version != SCHEMA_VERSION:
                self._migrate(conn)
        except sqlite3.DatabaseError as error:
            conn.close()
            raise _translate(error, self.path) from error
        except BaseException:
            conn.close()
            raise
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file, or bring a version-1 file to this version (once: a concurrent
        opener waits for the write lock and then finds the work done)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                script = _SCHEMA
            elif version == 1:
                script = _FROM_VERSION_1
                log.info("search index %s: moving to schema version %d (embeddings)", self.path, SCHEMA_VERSION)
            else:
                script = ""
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _meta(self, conn: sqlite3.Connection, key: str) -> str | None:
        return self._metas(conn).get(key)

    @staticmethod
    def _metas(conn: sqlite3.Connection) -> dict[str, str]:
        """Every ``meta`` key (model, dimension, change counter) in one read."""
        return {key: str(value) for key, value in conn.execute("SELECT key, value FROM meta")}

    def embedding_model(self) -> str | None:
        """The model whose vectors this index holds (``none``: no vectors); None while it is empty and unset."""
        try:
            return self._meta(self._connection(), "embedding_model")
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error

    def _write(self, work: Callable[[sqlite3.Connection], int]) -> int:
        """``work`` in one write transaction that moves the change counter."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock upgrading a read lock
            try:
                done = work(conn)
                conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'changes'")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error
        return done

    def _replace(self, media_id: str, entries: list[IndexEntry], vectors: list[bytes | None], dim: int | None) -> int:
        """Delete the media's entries and insert ``entries`` with their ``vectors`` in one transaction (refused
        if the index holds another model's vectors); returns how many were deleted."""

        def replace(conn: sqlite3.Connection) -> int:
            if entries:
                self._adopt(conn, dim)
            removed = conn.execute("DELETE FROM entries WHERE media_id = ?", (media_id,)).rowcount
            conn.executemany(
                'INSERT INTO entries (media_id, source, tag, kind, start, "end", text, vector) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (media_id, e.source, e.tag, e.kind, e.start, e.end, e.text, v)
                    for e, v in zip(entries, vectors, strict=True)
                ],
            )
            return removed

        return self._write(replace)

    def _adopt(self, conn: sqlite3.Connection, dim: int | None) -> None:
        """Record this embedder on an index that has none yet; refuse another model's index."""
        meta = self._metas(conn)
        if "embedding_model" not in meta:
            conn.execute("INSERT INTO meta (key, value) VALUES ('embedding_model', ?)", (recorded_name(self.embedder),))
        else:
            check_recorded(str(self.path), meta["embedding_model"], self.embedder)
        check_dim(str(self.path), meta.get("embedding_dim"), dim, self.embedder)
        if dim is not None and "embedding_dim" not in meta:
            conn.execute("INSERT INTO meta (key, value) VALUES ('embedding_dim', ?)", (str(dim),))

    def use_embedder(self) -> bool:
        """Make the index hold this embedder's vectors: if it records another model, every vector is dropped
        and the new model recorded (``rebuild_index`` then embeds every entry again). True if it changed."""

        def reset(conn: sqlite3.Connection) -> int:
            if self._meta(conn, "embedding_model") in (None, recorded_name(self.embedder)):
                return 0
            conn.execute("UPDATE entries SET vector = NULL WHERE vector IS NOT NULL")
            conn.execute("DELETE FROM meta WHERE key IN ('embedding_model', 'embedding_dim')")
            conn.execute("INSERT INTO meta (key, value) VALUES ('embedding_model', ?)", (recorded_name(self.embedder),))
            return 1

        return bool(self._write(reset))

    def _embed(self, media_id: str, entries: list[IndexEntry]) -> tuple[list[bytes | None], int | None]:
        """Each entry's vector; an entry whose text the media already has in the index keeps its vector."""
        if self.embedder is None or not entries:
            return [None] * len(entries), None
        conn = self._connection()
        try:
            check_recorded(str(self.path), self._meta(conn, "embedding_model"), self.embedder)  # fail before the work
            known = dict(
                conn.execute(
                    "SELECT text, vector FROM entries WHERE media_id = ? AND vector IS NOT NULL", (media_id,)
                ).fetchall()
            )
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error
        return embed_entries(self.embedder, entries, known)

    def add_media(self, media_id: str, entries: Iterable[IndexEntry]) -> int:
        """Replace every entry of ``media_id`` with ``entries`` (empty texts are skipped); returns how many."""
        cleaned = []
        for entry in entries:
            if entry.kind not in KINDS:
                raise ValueError(f"index entry kind {entry.kind!r} of {media_id}: use one of {', '.join(KINDS)}")
            text = clean_text(entry.text)
            if text:
                cleaned.append(IndexEntry(media_id, entry.source, entry.tag, entry.kind, entry.start, entry.end, text))
        vectors, dim = self._embed(media_id, cleaned)
        self._replace(media_id, cleaned, vectors, dim)
        return len(cleaned)

    def remove_media(self, media_id: str) -> int:
        """Drop every entry of ``media_id``; returns how many there were."""
        return self._replace(media_id, [], [], None)

    def media_ids(self) -> set[str]:
        """Every media id with entries in the index."""
        return {row[0] for row in self._query("SELECT DISTINCT media_id FROM entries", ())}

    def _words(self, query: str, limit: int, filters: Filters) -> list[SearchHit]:
        """The best ``limit`` entries holding every word of ``query`` that pass ``filters``, best first (bm25)."""
        hits = []
        for media_id, source, entry_tag, entry_kind, start, end, marked, rank in self._query(
            _SEARCH, (fts_query(query), *_filter_parameters(filters), limit)
        ):
            text, spans = split_marked(marked)
            highlighted = mark_spans(text, spans, HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE)
            score = -rank + 0.0  # bm25 is lower-is-better; + 0.0 turns -0.0 into 0.0
            hits.append(SearchHit(media_id, source, entry_kind, text, start, end, score, highlighted, entry_tag, spans))
        return hits

    def _meaning(self, vector: np.ndarray, limit: int, filters: Filters) -> list[SearchHit]:
        """The ``limit`` entries whose vectors are nearest ``vector`` (cosine), best first, that pass ``filters``."""
        conn = self._connection()
        try:
            meta = self._metas(conn)  # one read per query
            if "embedding_model" not in meta:
                return []  # nothing indexed yet
            check_recorded(str(self.path), meta["embedding_model"], self.embedder)
            if "embedding_dim" not in meta:
                return []
            self._vectors.refresh(
                meta["changes"],
                int(meta["embedding_dim"]),
                lambda: (row[0] for row in conn.execute("SELECT id FROM entries WHERE vector IS NOT NULL")),
                lambda first: conn.execute(
                    "SELECT id, vector FROM entries WHERE id >= ? AND vector IS NOT NULL", (first,)
                ),
            )
            allowed = [row[0] for row in conn.execute(_ALLOWED, _filter_parameters(filters))] if filters.any else None
            nearest = self._vectors.top(vector, limit, allowed)
            rows = {
                row[0]: row[1:]
                for row in conn.execute(
                    'SELECT id, media_id, source, tag, kind, start, "end", text FROM entries '
                    "WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps([entry_id for entry_id, _ in nearest]),),
                )
            }
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error
        return meaning_hits(nearest, rows)

    def count(self) -> int:
        """How many entries the index holds."""
        return int(self._query("SELECT count(*) FROM entries", ())[0][0])

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.DatabaseError as error:
            raise _translate(error, self.path) from error


def _statements(script: str) -> list[str]:
    """The statements of a schema script (one or more per line), one by one (``executescript`` would commit the
    transaction)."""
    statements, current = [], ""
    for piece in script.replace(";", ";\0").split("\0"):
        current += piece
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [statement for statement in statements if statement]


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
