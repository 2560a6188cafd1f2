"""The search backend for a fleet: PostgreSQL full-text search that every worker writes and every user queries.

``OMNIQ_INDEX_URL=postgresql://user:password@host:5432/db`` (psycopg 3). Each entry's ``tsvector`` is built
with the text search configuration of its transcript's language (``english``, ``german``, ...; ``simple`` when
the language is unknown or has none) and indexed with GIN. A query is parsed by ``websearch_to_tsquery`` in
every configuration omniq uses, and each row is matched by the query in its own configuration, so stemming
follows the language of what was said ("launches" finds "launched" in English, "Raketen" finds "Rakete" in
German). Search boxes' syntax works: quoted phrases, ``-word``, ``or``; no input raises. Ranking is
``ts_rank_cd``; highlights come from ``ts_headline`` with the same ⟦ ⟧ marks and spans as the SQLite backend.

The schema is created and migrated by omniq (``omniq_schema`` holds its version; migrations run under an
advisory lock, so concurrent starters are harmless). ``add_media`` replaces a media's rows in one transaction,
serialised per media by an advisory lock: concurrent finalizes, redeliveries and rebuilds never duplicate or
lose rows.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from pipeline.config import redacted
from pipeline.errors import ConfigError, SourceNotFound, TransientError
from pipeline.search.model import (
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    KINDS,
    IndexEntry,
    PerThreadConnection,
    SearchHit,
    clean_text,
    like_prefix,
    mark_spans,
    split_marked,
)

log = logging.getLogger(__name__)

# ISO 639-1 code -> the PostgreSQL text search configuration that stems it (the ones PostgreSQL ships)
CONFIGS = {
    "ar": "arabic", "hy": "armenian", "eu": "basque", "ca": "catalan", "da": "danish", "nl": "dutch",
    "en": "english", "fi": "finnish", "fr": "french", "de": "german", "el": "greek", "hi": "hindi",
    "hu": "hungarian", "id": "indonesian", "ga": "irish", "it": "italian", "lt": "lithuanian", "ne": "nepali",
    "no": "norwegian", "nb": "norwegian", "pt": "portuguese", "ro": "romanian", "ru": "russian", "sr": "serbian",
    "es": "spanish", "sv": "swedish", "ta": "tamil", "tr": "turkish", "yi": "yiddish",
}  # fmt: skip
SIMPLE = "simple"
_LOCK_SCHEMA = 7_242_001  # pg_advisory_xact_lock key of schema migrations
_MARK_OPEN, _MARK_CLOSE = "\x02", "\x03"  # indexed text holds no control characters (clean_text)

# Each migration takes the schema from version N-1 to N; they run in order, once, under the schema lock.
MIGRATIONS = (
    """
    CREATE TABLE omniq_entries (
        id bigserial PRIMARY KEY,
        media_id text NOT NULL,
        source text NOT NULL,
        tag text,
        kind text NOT NULL CHECK (kind IN ('transcript', 'caption', 'summary')),
        start_s double precision NOT NULL,
        end_s double precision NOT NULL,
        text text NOT NULL,
        config regconfig NOT NULL,
        tsv tsvector NOT NULL
    );
    CREATE INDEX omniq_entries_tsv ON omniq_entries USING gin (tsv) WITH (fastupdate = off);  -- no pending list to scan
    CREATE INDEX omniq_entries_media ON omniq_entries (media_id);
    CREATE INDEX omniq_entries_tag ON omniq_entries (tag);
    CREATE INDEX omniq_entries_source ON omniq_entries (source text_pattern_ops);
    """,
    # the configurations in use, so that a query is parsed (and the GIN index scanned) once per language
    # present instead of once per language PostgreSQL knows
    """
    CREATE TABLE omniq_configs (config regconfig PRIMARY KEY);
    INSERT INTO omniq_configs SELECT DISTINCT config FROM omniq_entries;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# One branch per configuration in use: with the configuration and the query as constants, each branch is a
# GIN index scan (a join against the configurations would test every row); the headline is made for the
# hits that are returned only.
_BRANCH = """
SELECT e.media_id, e.source, e.tag, e.kind, e.start_s, e.end_s, e.text, e.config, q.query,
       ts_rank_cd(e.tsv, q.query) AS score
FROM omniq_entries AS e, websearch_to_tsquery(%(cfg{n})s::regconfig, %(query)s) AS q (query)
WHERE e.config = %(cfg{n})s::regconfig AND e.tsv @@ q.query
  AND (%(tag)s::text IS NULL OR e.tag = %(tag)s)
  AND (%(kind)s::text IS NULL OR e.kind = %(kind)s)
  AND (%(prefix)s::text IS NULL OR e.source LIKE %(prefix)s || '%%')
"""
_ORDER = "ORDER BY score DESC, media_id, start_s, kind"


def _search_sql(branches: int) -> str:
    union = " UNION ALL ".join(f"({_BRANCH.format(n=n)})" for n in range(branches))
    columns = "media_id, source, tag, kind, start_s, end_s, ts_headline(config, text, query, %(options)s), score"
    # only constant text and branch numbers go into it: every value is a bound parameter
    return f"SELECT {columns} FROM ({union} {_ORDER} LIMIT %(limit)s) AS best {_ORDER}"  # noqa: S608


_HEADLINE = f'StartSel="{_MARK_OPEN}", StopSel="{_MARK_CLOSE}", HighlightAll=true'


def config_for(language: str | None) -> str:
    """The text search configuration for an ISO 639-1 code (``simple`` for unknown or none)."""
    return CONFIGS.get((language or "").lower().split("-")[0], SIMPLE)


class PostgresIndex(PerThreadConnection):
    """``SearchIndex`` on PostgreSQL. One connection per thread, opened again after a fork."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            import psycopg
        except ImportError as error:  # pragma: no cover - a dependency
            raise ConfigError("the PostgreSQL search backend needs psycopg: pip install 'psycopg[binary]'") from error
        self._psycopg = psycopg
        self.url = url
        self.create = create
        self._local = threading.local()
        self._connection()  # fail early: unreachable server, wrong password, missing schema

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid() and not conn.closed:
            return conn
        try:
            conn = self._psycopg.connect(self.url, connect_timeout=10, autocommit=True)
        except self._psycopg.OperationalError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise TransientError(f"cannot reach the search index at {redacted(self.url)} ({reason})") from error
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _migrate(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_SCHEMA,))
            exists = conn.execute("SELECT to_regclass('omniq_schema')").fetchone()[0]
            version = conn.execute("SELECT max(version) FROM omniq_schema").fetchone()[0] or 0 if exists else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"search index {redacted(self.url)} has schema version {version}, this omniq knows "
                    f"{SCHEMA_VERSION}: upgrade omniq"
                )
            if version == SCHEMA_VERSION:
                return
            if not self.create:
                raise SourceNotFound(
                    f"no search index in {redacted(self.url)}: run 'omniq index rebuild' to build it from the "
                    "stored results"
                )
            conn.execute("CREATE TABLE IF NOT EXISTS omniq_schema (version integer NOT NULL)")
            for number, migration in enumerate(MIGRATIONS, start=1):
                if number > version:
                    conn.execute(migration)
                    conn.execute("INSERT INTO omniq_schema (version) VALUES (%s)", (number,))
                    log.info("search index %s: schema migrated to version %d", redacted(self.url), number)

    def add_media(self, media_id: str, entries: Iterable[IndexEntry]) -> int:
        """Replace every row of ``media_id`` with ``entries`` in one transaction; returns how many."""
        rows = []
        for entry in entries:
            if entry.kind not in KINDS:
                raise ValueError(f"unknown entry kind {entry.kind!r}; expected one of {KINDS}")
            text = clean_text(entry.text)
            if text:
                config = config_for(entry.language)
                rows.append((media_id, entry.source, entry.tag, entry.kind, entry.start, entry.end, text, config))
        conn = self._connection()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (media_id,))  # one writer per media
            conn.execute("DELETE FROM omniq_entries WHERE media_id = %s", (media_id,))
            configs = sorted({row[7] for row in rows})
            if configs:
                conn.execute(
                    "INSERT INTO omniq_configs (config) SELECT unnest(%s::regconfig[]) ON CONFLICT DO NOTHING",
                    (configs,),
                )
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO omniq_entries (media_id, source, tag, kind, start_s, end_s, text, config, tsv) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::regconfig, to_tsvector(%s::regconfig, %s))",
                    [(*row, row[7], row[6]) for row in rows],
                )
        return len(rows)

    def remove_media(self, media_id: str) -> int:
        conn = self._connection()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (media_id,))
            return conn.execute("DELETE FROM omniq_entries WHERE media_id = %s", (media_id,)).rowcount

    def media_ids(self) -> set[str]:
        return {row[0] for row in self._connection().execute("SELECT DISTINCT media_id FROM omniq_entries")}

    def search(
        self,
        query: str,
        limit: int = 10,
        *,
        tag: str | None = None,
        kind: str | None = None,
        source_prefix: str | None = None,
    ) -> list[SearchHit]:
        """Hits for what people type in a search box (phrases in quotes, ``-word``, ``or``), best first."""
        if limit < 1:
            raise ValueError(f"search limit {limit} must be at least 1")
        words = clean_text(query)
        if not words:
            raise ValueError(f"search query {query!r} is empty: give one or more words")
        conn = self._connection()
        configs = [row[0] for row in conn.execute("SELECT config::text FROM omniq_configs ORDER BY 1")]
        if not configs:
            return []
        parameters = {
            **{f"cfg{n}": config for n, config in enumerate(configs)},
            "query": words,
            "options": _HEADLINE,
            "tag": tag,
            "kind": kind,
            "prefix": like_prefix(source_prefix) if source_prefix else None,
            "limit": limit,
        }
        hits = []
        for media_id, source, hit_tag, hit_kind, start, end, marked, score in conn.execute(
            _search_sql(len(configs)), parameters
        ):
            text, spans = split_marked(marked)
            hits.append(
                SearchHit(
                    media_id, source, hit_kind, text, float(start), float(end), round(float(score), 6),
                    mark_spans(text, spans, HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE), hit_tag, spans,
                )
            )  # fmt: skip
        return hits

    def count(self) -> int:
        return int(self._connection().execute("SELECT count(*) FROM omniq_entries").fetchone()[0])
