"""Search by meaning and hybrid search, with the real bundled sentence-transformers model (all-MiniLM-L6-v2), on
every backend on real servers: SQLite (a file), PostgreSQL 15 without pgvector (vectors as bytes, ranked in the
client) and PostgreSQL 16 with pgvector (an HNSW index). The same contract for all three."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.search import IndexEntry, SQLiteIndex, embedder_for, open_index, rebuild_index
from pipeline.search.embed import Embedder, model_location
from pipeline.search.meaning import HYBRID_POOL, QUERY_MAX_CHARS, VectorCache, fuse
from pipeline.search.model import SearchHit
from pipeline.storage import LocalStorage
from tests.conftest import EMBEDDING_MODEL
from tests.pipeline.test_search import emptied, run_writers, write_results

# Spoken passages, and queries that mean the same and share no content word with them.
PASSAGES = {
    "bridge": "the harbour crossing is shut for repairs until the spring",
    "rocket": "the spacecraft lifted off from the launch pad at dawn",
    "bread": "the baker kneads dough and puts loaves in a stone oven",
    "vote": "citizens cast ballots to choose a new mayor for the town",
    "storm": "heavy rain and strong winds knocked down power lines overnight",
}
PARAPHRASES = {
    "bridge": "closing the bridge",
    "rocket": "a shuttle taking off into space",
    "bread": "making baguettes in a bakery",
    "vote": "local election day",
    "storm": "a tempest caused blackouts",
}


def embedder() -> Embedder:
    found = embedder_for(EMBEDDING_MODEL)
    assert found is not None
    return found


class Counting(Embedder):
    """The real model, counting the texts it is asked to embed."""

    def __init__(self) -> None:
        super().__init__(*model_location(EMBEDDING_MODEL))
        self._model = embedder()._loaded()
        self.texts: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return super().encode(texts)


@pytest.fixture(params=["sqlite", "postgres", "pgvector"])
def backend(request, tmp_path: Path):
    """A function that opens the test's index with an embedder (the real model by default)."""
    opened = []

    def open_(embedder_: Embedder | None = embedder()):
        if request.param == "sqlite":
            index = SQLiteIndex(tmp_path / "index.sqlite", embedder=embedder_)
        else:
            from pipeline.search.postgres import PostgresIndex

            url = request.getfixturevalue("postgres_url" if request.param == "postgres" else "pgvector_url")
            index = PostgresIndex(url, embedder=embedder_)
            if not opened:
                emptied(index)
        opened.append(index)
        return index

    open_.kind = request.param
    yield open_
    for index in opened:
        index.close()


def passages(index, tag=None) -> None:
    for number, (name, text) in enumerate(PASSAGES.items()):
        index.add_media(
            name,
            [
                IndexEntry(name, f"/videos/{name}.mp4", tag, "transcript", 10.0 * number, 10.0 * number + 4, text),
                IndexEntry(name, f"/videos/{name}.mp4", tag, "caption", 0.0, 30.0, f"a person talking about {name}"),
            ],
        )


def test_meaning_finds_paraphrases_that_words_cannot(backend):
    index = backend()
    passages(index)
    for name, query in PARAPHRASES.items():
        assert index.search(query, 5, mode="words") == []  # no word in common
        best = index.search(query, 1, mode="meaning", kind="transcript")[0]
        assert (best.media_id, best.mode, best.spans) == (name, "meaning", ())
        assert 0 < best.score <= 1  # a cosine similarity
        hybrid = index.search(query, 5, mode="hybrid", kind="transcript")
        assert hybrid[0].media_id == name and {hit.mode for hit in hybrid} == {"meaning"}


def test_hybrid_keeps_what_words_find_and_says_both(backend):
    index = backend()
    passages(index)
    words = index.search("ballots mayor", 5, mode="words")
    assert [hit.media_id for hit in words] == ["vote"]
    hybrid = index.search("ballots mayor", 5, mode="hybrid")
    assert (hybrid[0].media_id, hybrid[0].kind, hybrid[0].mode) == ("vote", "transcript", "both")
    assert hybrid[0].spans == words[0].spans  # the words' highlights are kept
    assert [hit.score for hit in hybrid] == sorted((hit.score for hit in hybrid), reverse=True)
    assert len(hybrid) == 5 and {hit.mode for hit in hybrid[1:]} == {"meaning"}


def test_filters_apply_in_every_mode(backend):
    index = backend()
    passages(index, tag="week1")
    index.add_media(
        "other", [IndexEntry("other", "s3://bucket/other.mp4", "week2", "summary", 100, 200, PASSAGES["rocket"])]
    )
    for mode in ("words", "meaning", "hybrid"):
        query = "launch pad" if mode == "words" else "a shuttle taking off"
        assert {hit.media_id for hit in index.search(query, 10, mode=mode, tag="week2")} == {"other"}
        assert {hit.kind for hit in index.search(query, 10, mode=mode, kind="caption")} <= {"caption"}
        assert {hit.media_id for hit in index.search(query, 10, mode=mode, source_prefix="s3://")} == {"other"}
        assert {hit.media_id for hit in index.search(query, 10, mode=mode, media_id="rocket")} == {"rocket"}
        timed = index.search(query, 10, mode=mode, time_from=150, time_to=400)
        assert [(hit.media_id, hit.start) for hit in timed] == [("other", 100.0)]  # overlaps 150-400
        assert index.search(query, 10, mode=mode, media_id="nothing") == []


def test_replacing_and_removing_a_media_updates_its_vectors(backend):
    index = backend()
    passages(index)
    assert index.search("closing the bridge", 1, mode="meaning")[0].media_id == "bridge"  # the vectors are cached
    index.add_media("bridge", [IndexEntry("bridge", "/v.mp4", None, "transcript", 0, 4, "a cat sleeps on the sofa")])
    best = index.search("closing the bridge", 1, mode="meaning", kind="transcript")[0]
    assert best.media_id != "bridge"
    assert index.search("a kitten napping", 1, mode="meaning")[0].text == "a cat sleeps on the sofa"
    index.remove_media("bridge")
    assert "bridge" not in {hit.media_id for hit in index.search("a kitten napping", 20, mode="meaning")}
    assert index.count() == 2 * (len(PASSAGES) - 1)


def test_another_process_writes_and_this_one_sees_it(backend):
    reader, writer = backend(), backend()
    passages(writer)
    assert reader.search("closing the bridge", 1, mode="meaning")[0].media_id == "bridge"
    writer.add_media(
        "ferry", [IndexEntry("ferry", "/f.mp4", None, "transcript", 0, 4, "the ferry to the island is cancelled")]
    )
    assert reader.search("boat trip called off", 1, mode="meaning")[0].media_id == "ferry"


def test_indexing_again_embeds_only_new_texts(backend):
    counting = Counting()
    index = backend(counting)
    entries = [
        IndexEntry("m", "/m.mp4", None, "transcript", i, i + 1, f"sentence number {i} about rivers") for i in range(4)
    ]
    index.add_media("m", entries + [entries[0]])  # a repeated text is embedded once
    assert len(counting.texts) == 4
    index.add_media("m", [*entries, IndexEntry("m", "/m.mp4", None, "caption", 0, 30, "a river at sunset")])
    assert counting.texts[4:] == ["a river at sunset"]
    assert index.search("a river at dusk", 1, mode="meaning")[0].kind == "caption"


def test_an_index_of_another_model_is_refused_until_rebuilt(backend, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    write_results(storage, "m1", segments=[(0.0, 5.0, PASSAGES["bridge"])], summary="roadworks at the harbour")
    words_only = backend(None)
    rebuild_index(storage, words_only)
    assert words_only.embedding_model() == "none"

    embedded = backend()
    for attempt in (
        lambda: embedded.search("closing the bridge", 5, mode="meaning"),
        lambda: embedded.search("closing the bridge", 5, mode="hybrid"),
        lambda: embedded.add_media("m2", [IndexEntry("m2", "/m2.mp4", None, "transcript", 0, 1, "hello")]),
    ):
        with pytest.raises(ConfigError, match="has no embeddings .*run 'omniq index rebuild'"):
            attempt()
    assert [hit.media_id for hit in embedded.search("harbour", 5, mode="words")] == ["m1", "m1"]  # words still work
    assert embedded.count() == 2  # nothing was mixed in

    assert rebuild_index(storage, embedded) == (1, 2)
    assert embedded.embedding_model() == EMBEDDING_MODEL
    assert embedded.search("closing the bridge", 1, mode="meaning")[0].kind == "transcript"
    with pytest.raises(ConfigError, match=f"holds embeddings of {EMBEDDING_MODEL}.*'omniq index rebuild' to drop"):
        words_only.add_media("m3", [IndexEntry("m3", "/m3.mp4", None, "transcript", 0, 1, "hello")])
    with pytest.raises(ConfigError, match="needs embeddings; use --mode words"):
        words_only.search("closing the bridge", 5, mode="meaning")


def test_the_pgvector_backend_uses_an_hnsw_index_and_the_other_postgres_bytes(backend, tmp_path):
    if backend.kind == "sqlite":
        return  # SQLite keeps vectors in a column of its rows (every test here)
    index = backend()
    passages(index)
    conn = index._connection()
    indexes = {row[0] for row in conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'omniq_entries'")}
    if backend.kind == "pgvector":
        assert index.vector_store() == "pgvector"
        assert any("USING hnsw (embedding_v vector_cosine_ops)" in definition for definition in indexes)
        conn.execute("SET enable_seqscan = off")  # 10 rows: the planner would rather scan them
        plan = " ".join(
            row[0] for row in conn.execute(
                "EXPLAIN SELECT id FROM omniq_entries ORDER BY embedding_v <=> %s::vector LIMIT 5",
                ("[" + ",".join(["0.05"] * 384) + "]",),
            )
        )  # fmt: skip
        conn.execute("RESET enable_seqscan")
        assert "omniq_entries_hnsw" in plan
        storage = LocalStorage(tmp_path / "store")
        write_results(storage, "bridge", segments=[(0.0, 4.0, PASSAGES["bridge"])])
        dropped: list[bool] = []

        def progress(*_: object) -> None:  # during the rebuild the graph is gone (built once at its end)
            dropped.append(conn.execute("SELECT to_regclass('omniq_entries_hnsw')").fetchone()[0] is None)

        rebuild_index(storage, index, progress)
        assert dropped == [True] and conn.execute("SELECT to_regclass('omniq_entries_hnsw')").fetchone()[0]
        assert index.search("closing the bridge", 1, mode="meaning")[0].media_id == "bridge"
    else:
        assert index.vector_store() == "bytes"
        assert not any("hnsw" in definition for definition in indexes)


def _write_embedded(url: str, worker: int, rounds: int) -> None:
    from pipeline.search.postgres import PostgresIndex

    opened = PostgresIndex(url, embedder=embedder_for(EMBEDDING_MODEL)) if url.startswith("postgresql") else None
    index = opened or SQLiteIndex(Path(url), embedder=embedder_for(EMBEDDING_MODEL))
    for round_ in range(rounds):
        index.add_media(
            "shared",
            [IndexEntry("shared", "/s.mp4", None, "transcript", i, i + 1, f"shared {worker} {i}") for i in range(3)],
        )
        media = f"own-{worker}-{round_}"
        index.add_media(
            media, [IndexEntry(media, "/o.mp4", None, "transcript", 0, 1, f"worker {worker} round {round_} speaks")]
        )
    index.close()


def test_writers_in_several_processes_keep_entries_and_vectors_together(backend, tmp_path):
    index = backend()
    passages(index)
    url = str(tmp_path / "index.sqlite") if backend.kind == "sqlite" else index.url
    assert run_writers(_write_embedded, [(url, worker, 4) for worker in range(2)], timeout=180) == [0, 0]
    assert index.count() == 2 * len(PASSAGES) + 3 + 2 * 4
    everything = index.search("speaks", 100, mode="meaning")
    assert len(everything) == index.count()  # every entry has its vector
    assert len([hit for hit in everything if hit.media_id == "shared"]) == 3


def test_queries_empty_long_and_odd(backend):
    index = backend()
    passages(index)
    for mode in ("meaning", "hybrid"):
        for query in ("", "   ", "\x00\x1b"):
            with pytest.raises(ValueError, match="empty"):
                index.search(query, 5, mode=mode)
        assert index.search("?!*", 3, mode=mode)  # no word for FTS: meaning alone still answers
        assert len(index.search("bridge " * 5000, 3, mode=mode)) == 3  # cut to QUERY_MAX_CHARS
    with pytest.raises(ValueError, match="search mode 'fuzzy'"):
        index.search("x", 5, mode="fuzzy")
    with pytest.raises(ValueError, match="ends before it starts"):
        index.search("x", 5, mode="meaning", time_from=10, time_to=5)
    assert QUERY_MAX_CHARS >= 200


def test_open_index_takes_the_model_from_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIQ_EMBEDDING_MODEL", EMBEDDING_MODEL)
    index = open_index(f"sqlite:///{tmp_path}/i.sqlite", Settings())
    assert index.embedder is embedder()
    monkeypatch.setenv("OMNIQ_EMBEDDING_MODEL", "none")
    assert open_index(f"sqlite:///{tmp_path}/j.sqlite", Settings()).embedder is None


def test_embedding_model_settings_that_are_not_models_are_named(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    for setting, message in (
        (str(tmp_path / "plain"), "not a sentence-transformers model"),
        (str(tmp_path / "missing"), "no such folder"),
        ("not a model", "not a folder and not a hub id"),
    ):
        with pytest.raises(ConfigError, match=f"OMNIQ_EMBEDDING_MODEL=.*{message}") as refused:
            embedder_for(setting)
        assert "\n" not in str(refused.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "modules.json").write_text("not json")
    with pytest.raises(ConfigError, match=f"OMNIQ_EMBEDDING_MODEL={broken}: cannot load it") as refused:
        Embedder(*model_location(str(broken))).encode(["hello"])
    assert "\n" not in str(refused.value)


def test_a_version_1_sqlite_index_is_migrated_and_asks_for_a_rebuild(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE entries (id INTEGER PRIMARY KEY, media_id TEXT NOT NULL, source TEXT NOT NULL, tag TEXT,
            kind TEXT NOT NULL, start REAL NOT NULL, "end" REAL NOT NULL, text TEXT NOT NULL);
        CREATE INDEX entries_media ON entries (media_id);
        CREATE VIRTUAL TABLE entries_fts USING fts5 (text, content='entries', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2');
        CREATE TRIGGER entries_ai AFTER INSERT ON entries BEGIN
            INSERT INTO entries_fts (rowid, text) VALUES (new.id, new.text); END;
        CREATE TRIGGER entries_ad AFTER DELETE ON entries BEGIN
            INSERT INTO entries_fts (entries_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
        INSERT INTO entries (media_id, source, kind, start, "end", text)
            VALUES ('m1', '/a.mp4', 'transcript', 0, 5, 'the harbour crossing is shut');
        PRAGMA user_version = 1;
        """
    )
    old.close()
    index = SQLiteIndex(path, embedder=embedder())
    assert [hit.text for hit in index.search("harbour", 5, mode="words")] == ["the harbour crossing is shut"]
    with pytest.raises(ConfigError, match="no embeddings .*omniq index rebuild"):
        index.search("closing the bridge", 5, mode="meaning")
    assert index.use_embedder()  # what a rebuild does first
    index.add_media("m1", [IndexEntry("m1", "/a.mp4", None, "transcript", 0, 5, "the harbour crossing is shut")])
    assert index.search("closing the bridge", 1, mode="meaning")[0].media_id == "m1"
    assert index.search("harbour", 5, mode="words")[0].media_id == "m1"


# -- the parts alone -------------------------------------------------------------------------------------


def hit(media_id: str, mode: str, spans=()) -> SearchHit:
    return SearchHit(media_id, "/s", "transcript", media_id, 0.0, 1.0, 1.0, media_id, None, spans, mode)


def test_rrf_fuses_ranks_and_keeps_highlights():
    words = [hit("a", "words", ((0, 1),)), hit("b", "words", ((0, 1),))]
    meaning = [hit("b", "meaning"), hit("c", "meaning"), hit("a", "meaning")]
    fused = fuse([words, meaning], 10)
    assert [(h.media_id, h.mode) for h in fused] == [("b", "both"), ("a", "both"), ("c", "meaning")]
    assert fused[0].spans == ((0, 1),) and fused[0].score == pytest.approx(1 / 62 + 1 / 61, abs=1e-6)
    assert len(fuse([words, meaning], 1)) == 1 and HYBRID_POOL >= 10


def test_the_vector_cache_refreshes_only_what_changed():
    rows = {1: np.array([1, 0], "<f4"), 2: np.array([0, 1], "<f4"), 5: np.array([0.6, 0.8], "<f4")}
    reads: list[int] = []

    def read_from(first):
        reads.append(first)
        return [(i, v.tobytes()) for i, v in sorted(rows.items()) if i >= first]

    cache = VectorCache()
    cache.refresh(1, 2, lambda: list(rows), read_from)
    query = np.array([1, 0], np.float32)
    assert [i for i, _ in cache.top(query, 3)] == [1, 5, 2]
    cache.refresh(1, 2, lambda: list(rows), read_from)
    assert reads == [1]  # the same counter: nothing read
    del rows[1]
    rows[9] = np.array([0.8, 0.6], "<f4")
    cache.refresh(2, 2, lambda: list(rows), read_from)
    assert reads == [1, 9] and [i for i, _ in cache.top(query, 3)] == [9, 5, 2]
    assert [i for i, _ in cache.top(query, 3, allowed=[2, 5, 77])] == [5, 2]
    assert cache.top(query, 3, allowed=[77]) == []


def test_an_embedding_failure_is_logged_and_never_fails_the_job(tmp_path, caplog):
    from pipeline.job import update_index

    class Broken(Embedder):
        def encode(self, texts: list[str]) -> np.ndarray:
            raise RuntimeError("the model broke")

    index = SQLiteIndex(tmp_path / "index.sqlite", embedder=Broken(*model_location(EMBEDDING_MODEL)))
    storage = LocalStorage(tmp_path / "store")
    write_results(storage, "m1", segments=[(0.0, 1.0, "hello there")])
    update_index(index, storage, "m1")  # finalize calls it before the job ends: it must not raise
    assert "could not index m1" in caplog.text and "the model broke" in caplog.text
    assert index.count() == 0  # nothing half-written: 'omniq index rebuild' adds it later
