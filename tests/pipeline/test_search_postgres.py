"""What only the PostgreSQL backend does, on a real server: stemming by language, search-box syntax, many writers
in several processes, the versioned schema. The behaviour both backends share is in test_search.py."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from pipeline.config import Settings
from pipeline.errors import SourceNotFound, TransientError
from pipeline.search import IndexEntry, open_index
from pipeline.search.postgres import SCHEMA_VERSION, PostgresIndex, config_for
from tests.pipeline.test_search import emptied, run_writers


def entry(media_id, text, language=None, start=0.0, kind="transcript"):
    return IndexEntry(media_id, f"/videos/{media_id}.mp4", None, kind, start, start + 5, text, language)


@pytest.fixture
def index(postgres_url):
    with PostgresIndex(postgres_url) as opened:
        yield emptied(opened)


def texts(hits):
    return sorted(hit.text for hit in hits)


def test_words_are_stemmed_in_the_language_of_the_transcript(index):
    index.add_media("en", [entry("en", "The rocket launched at dawn", "en")])
    index.add_media("de", [entry("de", "Die Raketen starteten im Morgengrauen", "de")])
    index.add_media("xx", [entry("xx", "the rocket launched again", None)])  # unknown language: words as they are

    assert texts(index.search("launches", 10)) == ["The rocket launched at dawn"]  # English stems launch*
    assert texts(index.search("Rakete", 10)) == ["Die Raketen starteten im Morgengrauen"]  # German stems Raket*
    assert texts(index.search("launched", 10)) == ["The rocket launched at dawn", "the rocket launched again"]
    (hit,) = index.search("Rakete", 10)
    assert [hit.text[a:b] for a, b in hit.spans] == ["Raketen"]  # the word as it was said is highlighted
    assert (config_for("en"), config_for("de-AT"), config_for("xx"), config_for(None)) == (
        "english", "german", "simple", "simple",
    )  # fmt: skip


def test_search_box_syntax_phrases_minus_and_or(index):
    index.add_media(
        "m",
        [
            entry("m", "the rocket launch was loud", "en", 0),
            entry("m", "launch of the new rocket", "en", 10),
            entry("m", "rocket fuel costs", "en", 20),
            entry("m", "a boat on the lake", "en", 30),
        ],
    )
    assert texts(index.search('"rocket launch"', 10)) == ["the rocket launch was loud"]
    assert texts(index.search("rocket -fuel", 10)) == ["launch of the new rocket", "the rocket launch was loud"]
    assert texts(index.search("fuel or boat", 10)) == ["a boat on the lake", "rocket fuel costs"]


@pytest.mark.parametrize(
    "query",
    ['"unclosed', "-", "or", "!!!", "a & b | c", "x:*", "))((", "'; DROP TABLE omniq_entries; --", "\\", "🚀" * 500],
)
def test_odd_input_never_raises(index, query):
    index.add_media("m", [entry("m", "rocket a b c x", "en")])
    assert isinstance(index.search(query, 10), list)
    assert index.count() == 1


def _write(url: str, worker: int, rounds: int) -> None:
    with PostgresIndex(url) as index:
        for round_ in range(rounds):
            # everyone rewrites the shared media (as concurrent finalizes, redeliveries and rebuilds do) ...
            index.add_media(
                "shared", [entry("shared", f"shared text {worker} {round_} {i}", start=i) for i in range(5)]
            )
            # ... and adds media of its own
            index.add_media(f"own-{worker}-{round_}", [entry(f"own-{worker}-{round_}", "own words")])


def test_many_writers_in_several_processes_never_duplicate_or_lose_rows(index, postgres_url):
    assert run_writers(_write, [(postgres_url, worker, 8) for worker in range(4)]) == [0] * 4
    rows = index._connection().execute("SELECT count(*) FROM omniq_entries WHERE media_id = 'shared'").fetchone()[0]
    assert rows == 5  # one writer's five rows, never a mix or a double
    assert len(index.media_ids()) == 1 + 4 * 8
    assert index.count() == 5 + 4 * 8


def test_the_schema_is_created_once_and_versioned(postgres_url, index):
    with PostgresIndex(postgres_url), PostgresIndex(postgres_url):  # opening again changes nothing
        pass
    versions = index._connection().execute("SELECT version FROM omniq_schema ORDER BY version").fetchall()
    assert [v for (v,) in versions] == list(range(1, SCHEMA_VERSION + 1))
    empty = postgres_url.rsplit("/", 1)[0] + "/postgres"  # a database without omniq's schema
    with pytest.raises(SourceNotFound, match="omniq index rebuild"):
        PostgresIndex(empty, create=False)


def test_open_index_by_url_and_an_unreachable_server_is_named_without_its_password(postgres_url):
    opened = open_index(postgres_url, Settings())
    assert isinstance(opened, PostgresIndex)
    opened.close()
    parts = urlsplit(postgres_url)
    wrong = postgres_url.replace(f":{parts.password}@", ":not-the-password@")
    with pytest.raises(TransientError) as refused:
        PostgresIndex(wrong)
    assert "not-the-password" not in str(refused.value) and ":***@" in str(refused.value)


def test_a_rebuild_runs_while_workers_write(index, postgres_url, tmp_path):
    """A rebuild reading the store while workers index the same media (as finalizes do) leaves exactly the
    store's entries: nothing doubled, nothing lost."""
    import threading

    from pipeline.search import rebuild_index
    from pipeline.storage import LocalStorage
    from tests.pipeline.test_search import write_results

    storage = LocalStorage(tmp_path / "store")
    media = [f"{i:020x}" for i in range(60)]
    for media_id in media:
        write_results(storage, media_id, segments=[(0.0, 4.0, f"rocket {media_id}"), (5.0, 9.0, "launch pad")])
    expected = rebuild_index(storage, index)[1]
    emptied(index)
    stop = threading.Event()

    def finalizes() -> None:
        with PostgresIndex(postgres_url) as writer:
            from pipeline.search import index_media

            while not stop.is_set():
                for media_id in media[::7]:
                    index_media(storage, media_id, writer)

    worker = threading.Thread(target=finalizes)
    worker.start()
    try:
        assert rebuild_index(storage, index) == (60, expected)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert index.count() == expected and index.media_ids() == set(media)
