"""The search index on real SQLite files, fed from result files written in the README contract format."""

from __future__ import annotations

import json
import multiprocessing
import re
import sqlite3
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError, SourceNotFound
from pipeline.search import (
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    IndexEntry,
    SQLiteIndex,
    default_index_url,
    entries_from_results,
    fts_query,
    index_media,
    open_index,
    rebuild_index,
    sqlite_path,
)
from pipeline.storage import LocalStorage

OPEN, CLOSE = HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE


def write_results(
    storage: LocalStorage,
    media_id: str,
    *,
    status: str = "done",
    source: str | None = None,
    tag: str | None = None,
    segments: list[tuple[float, float, str]] = (),
    captions: list[tuple[float, float, str, str]] = (),
    chunk_summaries: list[tuple[float, float, str]] = (),
    summary: str = "",
    duration: float = 60.0,
) -> None:
    """A job's result files as finalize writes them (README "Results"), the manifest last."""
    prefix = f"results/{media_id}"

    def put(name: str, document: dict) -> None:
        storage.put_bytes(f"{prefix}/{name}", json.dumps(document).encode())

    if status == "done":
        put(
            "transcript.json",
            {"language": None, "segments": [{"start": s, "end": e, "text": t} for s, e, t in segments]},
        )
        put(
            "captions.json",
            {
                "chunks": [
                    {"index": i, "start": s, "end": e, "visual": v, "audio": a}
                    for i, (s, e, v, a) in enumerate(captions)
                ]
            },
        )
        put(
            "summary.json",
            {
                "summary": summary,
                "chunks": [
                    {"index": i, "start": s, "end": e, "summary": t} for i, (s, e, t) in enumerate(chunk_summaries)
                ],
            },
        )
    put(
        "manifest.json",
        {
            "status": status,
            "source": source or f"/videos/{media_id}.mp4",
            "media_id": media_id,
            "job_id": f"{media_id}-job",
            "tag": tag,
            "duration_s": duration if status == "done" else None,
            "error": None if status == "done" else "PermanentMediaError: not media",
        },
    )


def run_writers(target, arguments: list[tuple], timeout: float = 120) -> list[int | None]:
    """``target(*args)`` in a spawned process for each ``args``, all at once; their exit codes (None: still
    running after ``timeout``)."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=target, args=args) for args in arguments]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=timeout)
    return [process.exitcode for process in workers]


def emptied(index):
    """A PostgreSQL index as new: no entries, no recorded embedding model (the tests share one database)."""
    conn = index._connection()
    conn.execute("TRUNCATE omniq_entries")
    conn.execute("DELETE FROM omniq_meta WHERE key <> 'changes'")
    conn.execute("ALTER TABLE omniq_entries DROP COLUMN IF EXISTS embedding_v")
    return index


@pytest.fixture(params=["sqlite", "postgres"])
def index(request, tmp_path: Path):
    """Each behavioural test runs on both backends: SQLite (a file) and PostgreSQL (a real server)."""
    if request.param == "sqlite":
        with SQLiteIndex(tmp_path / "index.sqlite") as opened:
            yield opened
        return
    from pipeline.search.postgres import PostgresIndex

    with PostgresIndex(request.getfixturevalue("postgres_url")) as opened:
        yield emptied(opened)


@pytest.fixture
def sqlite_index(tmp_path: Path):
    with SQLiteIndex(tmp_path / "index.sqlite") as opened:
        yield opened


def entry(media_id: str, text: str, kind: str = "transcript", start: float = 0.0, end: float = 5.0, tag=None):
    return IndexEntry(media_id, f"/videos/{media_id}.mp4", tag, kind, start, end, text)


FILLER = ["the weather was mild", "a quiet afternoon walk", "coffee and a newspaper", "the train left early"]


def add_filler(index: SQLiteIndex) -> None:
    """Documents without the query words, so bm25's idf of those words is clearly positive."""
    index.add_media("filler", [entry("filler", text, start=i) for i, text in enumerate(FILLER)])


# -- entries from result files --------------------------------------------------------------------------


def test_entries_from_results_cover_every_kind_with_spans_and_tag():
    manifest = {"status": "done", "media_id": "m1", "source": "s3://b/talk.mp4", "tag": "week1", "duration_s": 61.5}
    transcript = {
        "segments": [{"start": 0.0, "end": 29.5, "text": "hello there"}, {"start": 29.5, "end": 30.0, "text": " "}]
    }
    captions = {
        "chunks": [
            {"index": 0, "start": 0.0, "end": 30.0, "visual": "a red car", "audio": "engine noise"},
            {"index": 1, "start": 30.0, "end": 61.5, "visual": "", "audio": "birdsong"},
            {"index": 2, "start": 61.5, "end": 61.5, "visual": "", "audio": ""},
        ]
    }
    summary = {"summary": "A talk about cars.", "chunks": [{"index": 0, "start": 0.0, "end": 30.0, "summary": "Cars."}]}

    entries = entries_from_results(manifest, transcript, captions, summary)

    assert [(e.kind, e.start, e.end, e.text) for e in entries] == [
        ("transcript", 0.0, 29.5, "hello there"),  # the blank segment is skipped
        ("caption", 0.0, 30.0, "a red car | engine noise"),  # one entry per chunk: visual | audio
        ("caption", 30.0, 61.5, "birdsong"),
        ("summary", 0.0, 30.0, "Cars."),
        ("summary", 0.0, 61.5, "A talk about cars."),  # the file summary spans the whole file
    ]
    assert {(e.media_id, e.source, e.tag) for e in entries} == {("m1", "s3://b/talk.mp4", "week1")}


def test_only_done_jobs_give_entries():
    failed = {"status": "failed", "media_id": "m1", "source": "x.mp4"}
    assert entries_from_results(failed, {"segments": [{"start": 0, "end": 1, "text": "hi"}]}, {}, {}) == []


# -- searching --------------------------------------------------------------------------------------------


def test_a_word_twice_ranks_above_the_same_word_once(index):
    add_filler(index)
    index.add_media("once", [entry("once", "rocket engines were tested today")])
    index.add_media("twice", [entry("twice", "rocket engines and rocket fuel")])

    hits = index.search("rocket", 10)

    assert [hit.media_id for hit in hits] == ["twice", "once"]
    assert hits[0].score > hits[1].score > 0


def test_every_word_is_required(index):
    add_filler(index)
    index.add_media("m", [entry("m", "rockets launched at dawn", start=1), entry("m", "rocket fuel", start=2)])

    assert [hit.text for hit in index.search("rocket fuel", 10)] == ["rocket fuel"]
    assert index.search("rocket dawn", 10) == []


def test_a_trailing_star_matches_prefixes_in_sqlite(sqlite_index):
    """(PostgreSQL's websearch syntax has no prefix match; it stems words of known languages instead.)"""
    sqlite_index.add_media("m", [entry("m", "rockets launched at dawn", start=1), entry("m", "rocket fuel", start=2)])

    assert {hit.text for hit in sqlite_index.search("rocket*", 10)} == {"rockets launched at dawn", "rocket fuel"}


def test_matches_are_highlighted_with_markers_and_spans(index):
    index.add_media("m", [entry("m", "[music] The Rocket rises; the rocket flies")])

    (hit,) = index.search("rocket", 10)

    assert hit.highlighted == f"[music] The {OPEN}Rocket{CLOSE} rises; the {OPEN}rocket{CLOSE} flies"
    assert [hit.text[a:b] for a, b in hit.spans] == ["Rocket", "rocket"]


def test_sqlite_folds_diacritics(sqlite_index):
    index = sqlite_index
    index.add_media("m", [entry("m", "[music] The Café opens; the café closes")])

    (hit,) = index.search("cafe", 10)  # diacritics are folded

    assert hit.highlighted == f"[music] The {OPEN}Café{CLOSE} opens; the {OPEN}café{CLOSE} closes"
    assert [hit.text[a:b] for a, b in hit.spans] == ["Café", "café"]


def test_hits_keep_time_spans_kind_source_and_tag(index):
    index.add_media(
        "m",
        [
            entry("m", "the launch countdown", "transcript", 65.25, 71.5, tag="nasa"),
            entry("m", "a launch pad with smoke", "caption", 60.0, 90.0, tag="nasa"),
            entry("m", "summary of the launch", "summary", 0.0, 600.0, tag="nasa"),
        ],
    )

    hits = {hit.kind: hit for hit in index.search("launch", 10)}

    assert set(hits) == {"transcript", "caption", "summary"}
    assert (hits["transcript"].start, hits["transcript"].end) == (65.25, 71.5)
    assert (hits["summary"].start, hits["summary"].end) == (0.0, 600.0)
    assert {(hit.media_id, hit.source, hit.tag) for hit in hits.values()} == {("m", "/videos/m.mp4", "nasa")}


def test_kind_and_source_prefix_filters(index):
    index.add_media("a", [entry("a", "launch seen", "caption"), entry("a", "launch heard", "transcript", 5)])
    shows = [IndexEntry("b", "s3://media/shows_2026/%b.mp4", None, "transcript", 0, 5, "launch again")]
    index.add_media("b", shows)

    assert {hit.text for hit in index.search("launch", 10, kind="caption")} == {"launch seen"}
    assert {hit.media_id for hit in index.search("launch", 10, source_prefix="/videos/")} == {"a"}
    assert {hit.media_id for hit in index.search("launch", 10, source_prefix="s3://media/shows_2026/%")} == {"b"}
    assert index.search("launch", 10, source_prefix="s3://media/shows%") == []  # % and _ are themselves


def test_tag_filter_and_limit(index):
    index.add_media("a", [entry("a", "launch one", tag="x"), entry("a", "launch two", start=9, tag="x")])
    index.add_media("b", [entry("b", "launch three", tag="y")])

    assert {hit.media_id for hit in index.search("launch", 10, tag="y")} == {"b"}
    assert len(index.search("launch", 2)) == 2
    with pytest.raises(ValueError, match="limit"):
        index.search("launch", 0)


def test_adding_a_media_again_replaces_its_entries(index):
    index.add_media("m", [entry("m", "old words"), entry("m", "more old words", start=5)])
    index.add_media("m", [entry("m", "new words")])
    index.add_media("m", [entry("m", "new words")])

    assert index.count() == 1
    assert index.search("old", 10) == []
    assert [hit.text for hit in index.search("words", 10)] == ["new words"]


def test_remove_media(index):
    index.add_media("a", [entry("a", "alpha"), entry("a", "alpha again", start=5)])
    index.add_media("b", [entry("b", "beta")])

    assert index.remove_media("a") == 2
    assert index.remove_media("a") == 0
    assert index.media_ids() == {"b"} and index.count() == 1
    assert index.search("alpha", 10) == []


@pytest.mark.parametrize(
    "query",
    [
        '"AND OR (',
        "c++",
        "NEAR(a b)",
        "title:launch",
        "a OR b NOT c",
        '"',
        "*",
        "^start",
        "-minus",
        "x'; DROP TABLE entries; --",
        "{col1 col2}: x",
        "emoji 🚀 and 中文",
        "nul\x00byte",
    ],
)
def test_hostile_queries_are_plain_words(index, query):
    index.add_media("m", [entry("m", "launch a OR b NOT c with c code and x")])

    hits = index.search(query, 10)

    assert isinstance(hits, list)
    assert index.count() == 1  # nothing was dropped or changed


def test_operators_are_words_not_syntax(index):
    index.add_media("m", [entry("m", "cats AND dogs"), entry("m", "cats only", start=5)])

    assert [hit.text for hit in index.search("cats AND dogs", 10)] == ["cats AND dogs"]
    assert [hit.text for hit in index.search("c++", 10)] == []
    assert fts_query('say "hi" c*') == '"say" """hi""" "c"*'


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_an_empty_query_is_a_clear_error(index, query):
    with pytest.raises(ValueError, match=re.escape(f"search query {query!r} is empty")):
        index.search(query, 10)


def test_control_characters_never_reach_the_index(index):
    index.add_media("m", [entry("m", "red \x1balert\x07\x02 here\x03 \x9b")])

    (hit,) = index.search("alert", 10)

    assert hit.text == "red alert here"
    assert hit.text[hit.spans[0][0] : hit.spans[0][1]] == "alert"


def test_unknown_kinds_are_refused(index):
    with pytest.raises(ValueError, match="kind 'frame'"):
        index.add_media("m", [entry("m", "x", kind="frame")])


# -- the SQLite file ---------------------------------------------------------------------------------------


def test_the_index_persists_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "index.sqlite"
    with SQLiteIndex(path) as first:
        first.add_media("m", [entry("m", "persisted words")])
    with SQLiteIndex(path, create=False) as again:
        assert [hit.media_id for hit in again.search("persisted", 10)] == ["m"]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_missing_index_is_not_created_when_only_reading(tmp_path):
    with pytest.raises(SourceNotFound, match="omniq index rebuild"):
        SQLiteIndex(tmp_path / "none.sqlite", create=False)
    assert not (tmp_path / "none.sqlite").exists()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigError, match="schema version 99.*omniq index rebuild"):
        SQLiteIndex(path)


def test_without_fts5_the_error_says_so(tmp_path, monkeypatch):
    from pipeline.search import sqlite as search_sqlite

    monkeypatch.setattr(search_sqlite, "has_fts5", lambda: False)
    with pytest.raises(ConfigError, match="no FTS5"):
        SQLiteIndex(tmp_path / "index.sqlite")


def _write_many(path: str, worker: int, media: int, start) -> None:
    start.wait(timeout=60)  # both create the new file and write at the same moment
    with SQLiteIndex(Path(path)) as index:
        for number in range(media):
            media_id = f"w{worker}-{number}"
            entries = [entry(media_id, f"shared words from worker{worker} item {i}", start=i) for i in range(5)]
            index.add_media(media_id, entries)
            index.search("shared", 5)


def test_two_processes_write_at_once_and_both_land(tmp_path):
    path = str(tmp_path / "index.sqlite")
    start = multiprocessing.get_context("spawn").Barrier(2)
    assert run_writers(_write_many, [(path, worker, 40, start) for worker in (1, 2)]) == [0, 0]

    with SQLiteIndex(Path(path)) as index:
        assert index.count() == 2 * 40 * 5
        assert len(index.media_ids()) == 80
        assert len(index.search("worker1", 1000)) == len(index.search("worker2", 1000)) == 200


# -- from the store ----------------------------------------------------------------------------------------


def test_index_media_reads_the_result_files(tmp_path, index):
    storage = LocalStorage(tmp_path / "store")
    write_results(
        storage,
        "m1",
        tag="demo",
        segments=[(0.0, 12.5, "welcome to the harbour")],
        captions=[(0.0, 30.0, "boats in a harbour", "gulls")],
        chunk_summaries=[(0.0, 30.0, "A harbour tour.")],
        summary="A short harbour film.",
        duration=30.0,
    )

    assert index_media(storage, "m1", index) == 4
    assert index_media(storage, "m1", index) == 4  # again: replaced, not duplicated
    hits = index.search("harbour", 10)
    assert index.count() == 4 and {hit.kind for hit in hits} == {"transcript", "caption", "summary"}
    assert {hit.tag for hit in hits} == {"demo"}

    write_results(storage, "m1", status="failed")  # a failed re-run: the store no longer has a done job
    assert index_media(storage, "m1", index) == 0
    assert index.count() == 0


def test_rebuild_indexes_done_jobs_skips_failed_and_drops_deleted_media(tmp_path, index):
    storage = LocalStorage(tmp_path / "store")
    write_results(storage, "done1", segments=[(0.0, 5.0, "alpha speech")])
    write_results(storage, "done2", captions=[(0.0, 5.0, "alpha view", "")], summary="alpha film")
    write_results(storage, "failed", status="failed")
    write_results(storage, "broken", segments=[(0.0, 5.0, "alpha")])
    storage.put_bytes("results/broken/captions.json", b"{not json")
    index.add_media("deleted", [entry("deleted", "alpha from a media no longer stored")])
    index.add_media("broken", [entry("broken", "alpha stale")])
    seen: list[tuple[str, int, str | None]] = []

    media, entries = rebuild_index(storage, index, lambda *report: seen.append(report))

    assert (media, entries) == (2, 3)
    assert index.media_ids() == {"done1", "done2"}
    assert {hit.media_id for hit in index.search("alpha", 10)} == {"done1", "done2"}
    reports = {media_id: (count, error) for media_id, count, error in seen}
    assert reports.keys() == {"done1", "done2", "broken"}  # a failed job is not a problem to report
    assert reports["done1"] == (1, None) and reports["done2"] == (2, None)
    assert "not valid JSON" in reports["broken"][1]
    assert rebuild_index(storage, index) == (2, 3)  # idempotent


# -- where the index lives ---------------------------------------------------------------------------------


def test_default_index_url(tmp_path, monkeypatch):
    def url(storage_url: str, index_url: str | None = None) -> str:
        settings = Settings(storage_url=storage_url, index_url=index_url, cache_dir=tmp_path / "cache")
        return default_index_url(settings)

    assert url("file:///srv/omniq") == "sqlite:///srv/omniq/index.sqlite"
    assert url("/srv/omniq") == "sqlite:///srv/omniq/index.sqlite"
    monkeypatch.chdir(tmp_path)
    assert url("file://./omniq-data") == f"sqlite://{tmp_path}/omniq-data/index.sqlite"
    assert url("rel/dir") == f"sqlite://{tmp_path}/rel/dir/index.sqlite"
    first, second = url("s3://bucket/prefix"), url("s3://other-bucket/prefix")
    assert first.startswith(f"sqlite://{tmp_path}/cache/index-") and first.endswith(".sqlite")
    assert first != second  # one index per store: rebuilding from one bucket keeps the other's entries
    assert url("s3://bucket/prefix", "sqlite:///elsewhere/i.sqlite") == "sqlite:///elsewhere/i.sqlite"


def test_sqlite_urls_and_unknown_schemes(tmp_path, monkeypatch):
    assert sqlite_path("sqlite:///abs/path.sqlite") == Path("/abs/path.sqlite")
    assert sqlite_path("sqlite:////abs/path.sqlite") == Path("/abs/path.sqlite")
    assert sqlite_path("sqlite:///./rel.sqlite") == Path("rel.sqlite")
    assert sqlite_path("sqlite://./rel.sqlite") == Path("rel.sqlite")
    assert sqlite_path("plain/path.sqlite") == Path("plain/path.sqlite")
    with pytest.raises(ConfigError, match="names no file"):
        sqlite_path("sqlite:///")
    with pytest.raises(ConfigError, match="names a host"):
        sqlite_path("sqlite://fileserver/index.sqlite")

    settings = Settings(storage_url=str(tmp_path), index_url=None)
    monkeypatch.chdir(tmp_path)
    opened = open_index("sqlite:///./here.sqlite", settings)
    opened.close()
    assert (tmp_path / "here.sqlite").is_file()
    with pytest.raises(ConfigError, match=r"unsupported scheme 'http'.*sqlite:///.*postgresql://"):
        open_index("http://search:9200/omniq", settings)
