"""The search backend for a fleet: PostgreSQL full-text search that every worker writes and every user queries.

``OMNIQ_INDEX_URL=postgresql://user:password@host:5432/db`` (psycopg 3). Each entry's ``tsvector`` is built
with the text search configuration of its transcript's language (``english``, ``german``, ...; ``simple`` when
the language is unknown or has none) and indexed with GIN. A query is parsed by ``websearch_to_tsquery`` in
every configuration omniq uses, and each row is matched by the query in its own configuration, so stemming
follows the language of what was said ("launches" finds "launched" in English, "Raketen" finds "Rakete" in
German). Search boxes' syntax works: quoted phrases, ``-word``, ``or``; no input raises. Ranking is
``ts_rank_cd``; highlights come from ``ts_headline`` with the same ⟦ ⟧ marks and spans as the SQLite backend.

Search by meaning: with the pgvector extension (managed PostgreSQL services ship it; omniq creates it when
it may), each entry's embedding is a ``vector(dim)`` column with an HNSW index (cosine), and a query without
filters is an approximate nearest-neighbour scan of it (``hnsw.ef_search`` at least the hits asked for); with
filters, the rows that pass them are ranked exactly. Without pgvector, the embedding is stored as float32
bytes and ranked exactly in the searching process (``VectorCache``: the vectors are read once, then only the
rows added since ``omniq_meta``'s change counter moved). ``omniq_meta`` records the model, dimension and
store (``pgvector`` | ``bytes``); ``omniq index rebuild`` moves a ``bytes`` index to pgvector once it exists.

The schema is created and migrated by omniq (``omniq_schema`` holds its version; migrations run under an
advisory lock, so concurrent starters are harmless). ``add_media`` replaces a media's rows in one transaction,
serialised per media by an advisory lock: concurrent finalizes, redeliveries and rebuilds never duplicate or
lose rows.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.config import redacted
from pipeline.errors import ConfigError, SourceNotFound, TransientError
from pipeline.search.embed import Embedder, recorded_name, to_blob
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
    # embeddings: float32 bytes here, or a pgvector column added when the first vectors come (its dimension is
    # the model's); entries indexed before this version have none, which a rebuild fixes
    """
    CREATE TABLE omniq_meta (key text PRIMARY KEY, value text NOT NULL);
    INSERT INTO omniq_meta (key, value) VALUES ('changes', '0');
    INSERT INTO omniq_meta (key, value) SELECT 'embedding_model', 'none' WHERE EXISTS (SELECT 1 FROM omniq_entries);
    ALTER TABLE omniq_entries ADD COLUMN embedding bytea;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# One branch per configuration in use: with the configuration and the query as constants, each branch is a
# GIN index scan (a join against the configurations would test every row); the headline is made for the
# hits that are returned only.
_FILTERS = """(%(tag)s::text IS NULL OR e.tag = %(tag)s)
  AND (%(kind)s::text IS NULL OR e.kind = %(kind)s)
  AND (%(prefix)s::text IS NULL OR e.source LIKE %(prefix)s || '%%')
  AND (%(media)s::text IS NULL OR e.media_id = %(media)s)
  AND (%(from)s::float8 IS NULL OR e.end_s >= %(from)s)
  AND (%(to)s::float8 IS NULL OR e.start_s <= %(to)s)"""
_BRANCH = """
SELECT e.media_id, e.source, e.tag, e.kind, e.start_s, e.end_s, e.text, e.config, q.query,
       ts_rank_cd(e.tsv, q.query) AS score
FROM omniq_entries AS e, websearch_to_tsquery(%(cfg{n})s::regconfig, %(query)s) AS q (query)
WHERE e.config = %(cfg{n})s::regconfig AND e.tsv @@ q.query AND """ + _FILTERS.replace("{", "{{").replace("}", "}}")
_ROW = "e.id, e.media_id, e.source, e.tag, e.kind, e.start_s, e.end_s, e.text"
# no filters: the HNSW index (approximate); filters: every row that passes them, ranked exactly
_NEAREST = f"""
SELECT {_ROW}, 1 - (e.embedding_v <=> %(vector)s::vector) AS score FROM omniq_entries AS e
WHERE e.embedding_v IS NOT NULL ORDER BY e.embedding_v <=> %(vector)s::vector LIMIT %(limit)s
"""  # noqa: S608
_NEAREST_FILTERED = f"""
WITH passing AS MATERIALIZED (
    SELECT {_ROW}, e.embedding_v <=> %(vector)s::vector AS distance FROM omniq_entries AS e
    WHERE e.embedding_v IS NOT NULL AND {_FILTERS}
)
SELECT id, media_id, source, tag, kind, start_s, end_s, text, 1 - distance FROM passing
ORDER BY distance, id LIMIT %(limit)s
"""  # noqa: S608
_ALLOWED = f"SELECT e.id FROM omniq_entries AS e WHERE e.embedding IS NOT NULL AND {_FILTERS}"  # noqa: S608
PGVECTOR, BYTES = "pgvector", "bytes"  # where the vectors are: a vector column, or float32 bytes
_HNSW = "CREATE INDEX IF NOT EXISTS omniq_entries_hnsw ON omniq_entries USING hnsw (embedding_v vector_cosine_ops)"
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


class PostgresIndex(Searcher, PerThreadConnection):
    """``SearchIndex`` on PostgreSQL. One connection per thread, opened again after a fork."""

    def __init__(self, url: str, *, create: bool = True, embedder: Embedder | None = None) -> None:
        try:
            import psycopg
        except ImportError as error:  # pragma: no cover - a dependency
            raise ConfigError("the PostgreSQL search backend needs psycopg: pip install 'psycopg[binary]'") from error
        self._psycopg = psycopg
        self.url = url
        self.create = create
        self.embedder = embedder
        self._vectors = VectorCache()
        self._rebuilding = False
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

    def _meta(self, conn: Any, key: str) -> str | None:
        return self._metas(conn).get(key)

    @staticmethod
    def _metas(conn: Any) -> dict[str, str]:
        """Every ``omniq_meta`` key (model, dimension, store, change counter) in one round trip."""
        return {key: str(value) for key, value in conn.execute("SELECT key, value FROM omniq_meta")}

    def _set_meta(self, conn: Any, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO omniq_meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value),
        )

    def embedding_model(self) -> str | None:
        """The model whose vectors this index holds (``none``: no vectors); None while it is empty and unset."""
        return self._meta(self._connection(), "embedding_model")

    def vector_store(self) -> str | None:
        """``pgvector`` (a vector column with an HNSW index), ``bytes`` (exact search in the client), or None
        while no vectors were written."""
        return self._meta(self._connection(), "vector_store")

    def _adopt(self, conn: Any, dim: int | None) -> str | None:
        """Record this embedder (and, with the first vectors, their dimension and store) on an index that has
        none yet, or refuse another model's index; returns the vector store. In the caller's transaction."""
        meta = self._metas(conn)
        recorded, store = meta.get("embedding_model"), meta.get("vector_store")
        if recorded is not None and (dim is None or store is not None):
            check_recorded(redacted(self.url), recorded, self.embedder)
            check_dim(redacted(self.url), meta.get("embedding_dim"), dim, self.embedder)
            return store
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_SCHEMA,))  # one adopter; the others wait, then see it
        meta = self._metas(conn)
        recorded, store = meta.get("embedding_model"), meta.get("vector_store")
        if recorded is None:
            self._set_meta(conn, "embedding_model", recorded_name(self.embedder))
        else:
            check_recorded(redacted(self.url), recorded, self.embedder)
        if dim is not None and store is None:
            store = PGVECTOR if self._create_vector_column(conn, dim) else BYTES
            self._set_meta(conn, "embedding_dim", str(dim))
            self._set_meta(conn, "vector_store", store)
            log.info("search index %s: %d-dimensional embeddings stored as %s", redacted(self.url), dim, store)
        else:
            check_dim(redacted(self.url), meta.get("embedding_dim"), dim, self.embedder)
        return store

    def _create_vector_column(self, conn: Any, dim: int) -> bool:
        """Add the pgvector column and its HNSW index if the extension exists or may be created here."""
        available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
        if not available:
            return False
        try:
            with conn.transaction():  # a savepoint: without the right to create it, the fallback goes on
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except self._psycopg.Error as error:
            log.warning("search index %s: pgvector exists but cannot be created (%s)", redacted(self.url), error)
            return False
        conn.execute(f"ALTER TABLE omniq_entries ADD COLUMN IF NOT EXISTS embedding_v vector({int(dim)})")
        if not self._rebuilding:  # a rebuild builds the graph once, at its end
            conn.execute(_HNSW)
        return True

    @contextmanager
    def rebuilding(self) -> Iterator[None]:
        """A rebuild inserts every row again: the HNSW index is dropped for it and built once at the end (a bulk
        build is several times faster than as many inserts into the graph). Meanwhile search by meaning scans
        every row, exactly; the index is built again even when the rebuild fails."""
        conn = self._connection()
        if self._meta(conn, "vector_store") == PGVECTOR:
            conn.execute("DROP INDEX IF EXISTS omniq_entries_hnsw")
        self._rebuilding = True
        try:
            yield
        finally:
            self._rebuilding = False
            with conn.transaction():
                conn.execute("SELECT set_config('maintenance_work_mem', '1GB', true)")
                if self._meta(conn, "vector_store") == PGVECTOR:
                    conn.execute(_HNSW)

    def use_embedder(self) -> bool:
        """Make the index hold this embedder's vectors: another model's (or none, or float32 bytes once pgvector
        is available) are dropped and this model recorded; ``rebuild_index`` then embeds every entry again."""
        conn = self._connection()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_SCHEMA,))
            recorded, store = self._meta(conn, "embedding_model"), self._meta(conn, "vector_store")
            pgvector_now = bool(conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone())
            moving = store == BYTES and pgvector_now and self.embedder is not None
            if recorded in (None, recorded_name(self.embedder)) and not moving:
                return False
            conn.execute("UPDATE omniq_entries SET embedding = NULL WHERE embedding IS NOT NULL")
            conn.execute("ALTER TABLE omniq_entries DROP COLUMN IF EXISTS embedding_v")
            conn.execute("DELETE FROM omniq_meta WHERE key IN ('embedding_model', 'embedding_dim', 'vector_store')")
            self._set_meta(conn, "embedding_model", recorded_name(self.embedder))
            self._changed(conn)
        return True

    @staticmethod
    def _changed(conn: Any) -> None:
        conn.execute("UPDATE omniq_meta SET value = (value::bigint + 1)::text WHERE key = 'changes'")

    def _known_vectors(self, conn: Any, media_id: str) -> dict[str, bytes]:
        """The media's vectors in the index, by text (kept when it is indexed again with the same texts)."""
        store = self._meta(conn, "vector_store")
        if store == PGVECTOR:
            rows = conn.execute(
                "SELECT text, embedding_v::real[] FROM omniq_entries WHERE media_id = %s AND embedding_v IS NOT NULL",
                (media_id,),
            ).fetchall()
            return {text: to_blob(np.asarray(values, dtype=np.float32)) for text, values in rows}
        if store == BYTES:
            return {
                text: bytes(blob)
                for text, blob in conn.execute(
                    "SELECT text, embedding FROM omniq_entries WHERE media_id = %s AND embedding IS NOT NULL",
                    (media_id,),
                )
            }
        return {}

    def add_media(self, media_id: str, entries: Iterable[IndexEntry]) -> int:
        """Replace every row of ``media_id`` with ``entries`` (and their embeddings) in one transaction."""
        rows, kept = [], []
        for entry in entries:
            if entry.kind not in KINDS:
                raise ValueError(f"unknown entry kind {entry.kind!r}; expected one of {KINDS}")
            text = clean_text(entry.text)
            if text:
                config = config_for(entry.language)
                rows.append((media_id, entry.source, entry.tag, entry.kind, entry.start, entry.end, text, config))
                kept.append(IndexEntry(media_id, entry.source, entry.tag, entry.kind, entry.start, entry.end, text))
        conn = self._connection()
        vectors: list[bytes | None] = [None] * len(rows)
        dim = None
        if self.embedder is not None and rows:  # embedded before the transaction: no lock is held meanwhile
            check_recorded(redacted(self.url), self._meta(conn, "embedding_model"), self.embedder)
            vectors, dim = embed_entries(self.embedder, kept, self._known_vectors(conn, media_id))
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (media_id,))  # one writer per media
            store = self._adopt(conn, dim) if rows else None
            conn.execute("DELETE FROM omniq_entries WHERE media_id = %s", (media_id,))
            configs = sorted({row[7] for row in rows})
            if configs:
                conn.execute(
                    "INSERT INTO omniq_configs (config) SELECT unnest(%s::regconfig[]) ON CONFLICT DO NOTHING",
                    (configs,),
                )
            column, cast = ("embedding_v", "%s::vector") if store == PGVECTOR else ("embedding", "%s")
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO omniq_entries (media_id, source, tag, kind, start_s, end_s, text, config, tsv, "  # noqa: S608
                    f"{column}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::regconfig, "
                    f"to_tsvector(%s::regconfig, %s), {cast})",
                    [
                        (*row, row[7], row[6], _vector_value(vector, store))
                        for row, vector in zip(rows, vectors, strict=True)
                    ],
                )
            self._changed(conn)
        return len(rows)

    def remove_media(self, media_id: str) -> int:
        conn = self._connection()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (media_id,))
            removed = conn.execute("DELETE FROM omniq_entries WHERE media_id = %s", (media_id,)).rowcount
            self._changed(conn)
            return removed

    def media_ids(self) -> set[str]:
        return {row[0] for row in self._connection().execute("SELECT DISTINCT media_id FROM omniq_entries")}

    def _words(self, query: str, limit: int, filters: Filters) -> list[SearchHit]:
        """Hits for what people type in a search box (phrases in quotes, ``-word``, ``or``), best first."""
        words = clean_text(query)
        if not words:
            raise ValueError(f"search query {query!r} is empty: give one or more words")
        conn = self._connection()
        configs = [row[0] for row in conn.execute("SELECT config::text FROM omniq_configs ORDER BY 1")]
        if not configs:
            return []
        parameters = {
            **{f"cfg{n}": config for n, config in enumerate(configs)},
            **_filter_parameters(filters),
            "query": words,
            "options": _HEADLINE,
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

    def _meaning(self, vector: np.ndarray, limit: int, filters: Filters) -> list[SearchHit]:
        """The ``limit`` entries nearest ``vector`` (cosine) that pass ``filters``, best first."""
        conn = self._connection()
        meta = self._metas(conn)  # one round trip per query
        recorded = meta.get("embedding_model")
        if recorded is None:
            return []
        check_recorded(redacted(self.url), recorded, self.embedder)
        store, dim = meta.get("vector_store"), meta.get("embedding_dim")
        if store == PGVECTOR:
            parameters = {
                **_filter_parameters(filters),
                "vector": _vector_value(to_blob(vector), PGVECTOR),
                "limit": limit,
            }
            with conn.transaction():
                conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(max(40, min(limit, 1000))),))
                found = conn.execute(_NEAREST_FILTERED if filters.any else _NEAREST, parameters).fetchall()
            return meaning_hits([(row[0], float(row[8])) for row in found], {row[0]: row[1:8] for row in found})
        if store != BYTES or dim is None:
            return []
        self._vectors.refresh(
            meta["changes"],
            int(dim),
            lambda: (row[0] for row in conn.execute("SELECT id FROM omniq_entries WHERE embedding IS NOT NULL")),
            lambda first: (
                (row_id, bytes(blob))
                for row_id, blob in conn.execute(
                    "SELECT id, embedding FROM omniq_entries WHERE id >= %s AND embedding IS NOT NULL", (first,)
                )
            ),
        )
        allowed = [row[0] for row in conn.execute(_ALLOWED, _filter_parameters(filters))] if filters.any else None
        nearest = self._vectors.top(vector, limit, allowed)
        rows = {
            row[0]: row[1:]
            for row in conn.execute(
                f"SELECT {_ROW} FROM omniq_entries AS e WHERE e.id = ANY(%s)",  # noqa: S608 - constant columns
                ([entry_id for entry_id, _ in nearest],),
            )
        }
        return meaning_hits(nearest, rows)

    def count(self) -> int:
        return int(self._connection().execute("SELECT count(*) FROM omniq_entries").fetchone()[0])


def _filter_parameters(filters: Filters) -> dict[str, Any]:
    return {
        "tag": filters.tag,
        "kind": filters.kind,
        "prefix": like_prefix(filters.source_prefix) if filters.source_prefix else None,
        "media": filters.media_id,
        "from": filters.time_from,
        "to": filters.time_to,
    }


def _vector_value(blob: bytes | None, store: str | None) -> Any:
    """A vector as the column takes it: pgvector's text form, or the float32 bytes."""
    if blob is None or store != PGVECTOR:
        return blob
    return "[" + ",".join(repr(value) for value in np.frombuffer(blob, dtype="<f4").tolist()) + "]"
