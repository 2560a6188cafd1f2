"""``omniq search`` and ``omniq index rebuild`` on a real results directory and a real SQLite index."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from pipeline.errors import SourceNotFound
from pipeline.search import HIGHLIGHT_CLOSE, HIGHLIGHT_OPEN, SearchHit
from pipeline.storage import LocalStorage
from tests.conftest import EMBEDDING_MODEL
from tests.pipeline.test_search import write_results
from workers.cli.search import add_commands, clock, excerpt, hit_line


def omniq(*argv: str) -> int:
    """Parse and run like ``omniq``, with only the search commands (whatever workers/cli/__init__.py wires)."""
    parser = argparse.ArgumentParser(prog="omniq")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A results directory as ``OMNIQ_STORAGE_URL`` with two done jobs and a failed one, indexed."""
    monkeypatch.setenv("OMNIQ_STORAGE_URL", f"file://{tmp_path / 'data'}")
    monkeypatch.delenv("OMNIQ_INDEX_URL", raising=False)
    storage = LocalStorage(tmp_path / "data")
    write_results(
        storage,
        "talk",
        source="/videos/talk.mp4",
        tag="week1",
        segments=[(3605.0, 3611.4, "the rocket lifted off and the rocket flew"), (0.0, 4.0, "good morning")],
        captions=[(3600.0, 3630.0, "a rocket on a launch pad", "a loud roar")],
        chunk_summaries=[(3600.0, 3630.0, "A rocket launch.")],
        summary="A video about a rocket launch.",
        duration=3700.0,
    )
    write_results(storage, "walk", source="s3://bucket/walk.mov", segments=[(0.0, 9.0, "a walk in the park")])
    write_results(storage, "bad", status="failed")
    assert omniq("index", "rebuild") == 0
    return storage


def test_rebuild_reports_counts_and_puts_the_index_beside_local_results(store, tmp_path, capsys):
    capsys.readouterr()
    assert omniq("index", "rebuild") == 0  # again: the same counts, nothing duplicated
    out = capsys.readouterr().out
    assert "indexed 2 done jobs (6 entries)" in out and f"{tmp_path}/data/index.sqlite" in out
    assert "the index holds 6 entries" in out
    assert (tmp_path / "data" / "index.sqlite").is_file()


def test_search_json_has_exactly_the_documented_keys(store, capsys):
    capsys.readouterr()
    assert omniq("search", "rocket", "--json") == 0

    hits = json.loads(capsys.readouterr().out)

    keys = ("end", "kind", "media_id", "mode", "score", "source", "start", "text")
    assert {tuple(sorted(hit)) for hit in hits} == {keys}
    transcript = next(hit for hit in hits if hit["kind"] == "transcript")
    assert transcript == {
        "media_id": "talk",
        "source": "/videos/talk.mp4",
        "kind": "transcript",
        "text": "the rocket lifted off and the rocket flew",
        "start": 3605.0,
        "end": 3611.4,
        "score": transcript["score"],
        "mode": "words",  # OMNIQ_EMBEDDING_MODEL=none here: words is the default mode
    }
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    assert {hit["kind"] for hit in hits} == {"transcript", "caption", "summary"}


def test_search_limit_and_tag(store, capsys):
    capsys.readouterr()
    assert omniq("search", "rocket", "--limit", "2", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert omniq("search", "a", "--tag", "week1", "--json") == 0
    assert {hit["media_id"] for hit in json.loads(capsys.readouterr().out)} == {"talk"}
    with pytest.raises(SystemExit):
        omniq("search", "rocket", "--limit", "0")


def test_search_prints_one_line_per_hit_with_markers_when_piped(store, capsys):
    capsys.readouterr()
    assert omniq("search", "rocket", "lifted") == 0

    line, link = capsys.readouterr().out.splitlines()
    # the moment: the page at index.html#t=START, which opens there and plays (tests/workers/test_view_browser.py)
    assert link.startswith("    at: file://") and link.endswith("/index.html#t=3605.0")

    assert line.split()[1:4] == ["transcript", "words", "/videos/talk.mp4@01:00:05-01:00:12"]
    assert line.endswith(
        f"the {HIGHLIGHT_OPEN}rocket{HIGHLIGHT_CLOSE} {HIGHLIGHT_OPEN}lifted{HIGHLIGHT_CLOSE} off and "
        f"the {HIGHLIGHT_OPEN}rocket{HIGHLIGHT_CLOSE} flew"
    )
    assert float(line.split()[0]) > 0


def test_search_uses_bold_on_a_terminal(store, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert omniq("search", "park") == 0
    assert terminal.getvalue().splitlines()[0].endswith("a walk in the \x1b[1mpark\x1b[22m")


def test_search_words_are_never_syntax(store, capsys):
    for query in ('"AND OR (', "c++", "NEAR(rocket", "rocket*", "'; DROP TABLE entries; --"):
        assert omniq("search", query, "--json") == 0
        assert isinstance(json.loads(capsys.readouterr().out), list)


def test_no_hits_and_empty_queries(store, capsys):
    capsys.readouterr()
    assert omniq("search", "submarine") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no matches for 'submarine'" in captured.err
    assert omniq("search", "  ") == 2
    assert "search query '  ' is empty" in capsys.readouterr().err


def test_rebuild_drops_deleted_media_and_reports_unreadable_ones(store, capsys):
    store.delete_prefix("results/walk")
    store.put_bytes("results/talk/summary.json", b"not json")
    capsys.readouterr()

    assert omniq("index", "rebuild") == 1

    captured = capsys.readouterr()
    assert "indexed 0 done jobs (0 entries)" in captured.out and "1 unreadable jobs skipped" in captured.out
    assert "skipped talk" in captured.err and "not valid JSON" in captured.err
    assert omniq("search", "rocket", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_index_option_and_a_missing_index(store, tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    with pytest.raises(SourceNotFound, match="omniq index rebuild"):
        omniq("search", "rocket", "--index", f"sqlite://{other}")
    assert not other.exists()
    assert omniq("index", "rebuild", "--index", f"sqlite://{other}") == 0
    capsys.readouterr()
    assert omniq("search", "rocket", "--index", f"sqlite://{other}", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


def test_index_needs_an_action():
    with pytest.raises(SystemExit):
        omniq("index")


def test_the_omniq_command_has_search_wired():
    from workers.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "search" in commands.choices and "index" in commands.choices


def test_clock_and_excerpt():
    assert clock(3605.9) == "01:00:05" and clock(3611.4, round_up=True) == "01:00:12"
    assert clock(0.0) == "00:00:00" and clock(-1.0) == "00:00:00"
    text = "x" * 300 + " rocket " + "y" * 300
    cut, spans = excerpt(text, ((301, 307),), width=100)
    assert cut.startswith("…") and cut.endswith("…") and len(cut) == 102
    assert [cut[a:b] for a, b in spans] == ["rocket"]
    assert excerpt("short rocket", ((6, 12),)) == ("short rocket", [(6, 12)])


def test_stored_text_cannot_send_terminal_escapes():
    hit = SearchHit("m", "src\x1b[2J", "transcript", "evil \x1b[2J text", 0.0, 1.0, 1.0, "", spans=((0, 4),))
    line = hit_line(hit, bold=True)
    assert "\x1b[2J" not in line and "\x1b[1m" not in line


def test_out_names_the_store_whose_index_to_use(store, tmp_path, capsys, monkeypatch):
    """After `omniq run --out X`, search and rebuild find X's index with --out X (no hand-written --index)."""
    monkeypatch.setenv("OMNIQ_STORAGE_URL", f"file://{tmp_path / 'elsewhere'}")
    capsys.readouterr()
    assert omniq("index", "rebuild", "--out", str(tmp_path / "data")) == 0
    assert f"{tmp_path}/data/index.sqlite" in capsys.readouterr().out
    assert omniq("search", "rocket", "--json", "--out", str(tmp_path / "data")) == 0
    assert {hit["media_id"] for hit in json.loads(capsys.readouterr().out)} == {"talk"}
    assert not (tmp_path / "elsewhere").exists()


def test_kind_and_source_filters(store, tmp_path, capsys):
    tape = tmp_path / "tapes" / "a b.mp4"
    write_results(store, "tape", source=tape.as_uri(), segments=[(0.0, 2.0, "a rocket on tape")])
    assert omniq("index", "rebuild") == 0
    capsys.readouterr()
    assert omniq("search", "rocket", "--kind", "caption", "--json") == 0
    assert {hit["kind"] for hit in json.loads(capsys.readouterr().out)} == {"caption"}
    assert omniq("search", "rocket", "--source", "s3://bucket/", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []  # every rocket here is a local file
    assert omniq("search", "rocket", "--source", str(tmp_path / "tapes"), "--json") == 0  # a folder, as typed
    assert {hit["media_id"] for hit in json.loads(capsys.readouterr().out)} == {"tape"}


# -- by meaning and both (the real bundled model) ---------------------------------------------------------


@pytest.fixture
def meaning_store(tmp_path, monkeypatch):
    """A results directory indexed with the bundled embedding model, the default outside the tests."""
    monkeypatch.setenv("OMNIQ_STORAGE_URL", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("OMNIQ_EMBEDDING_MODEL", EMBEDDING_MODEL)
    monkeypatch.delenv("OMNIQ_INDEX_URL", raising=False)
    storage = LocalStorage(tmp_path / "data")
    write_results(
        storage,
        "harbour",
        segments=[(0.0, 5.0, "good evening"), (3600.0, 3606.0, "the harbour crossing is shut for repairs")],
        summary="news from the port",
        duration=3700.0,
    )
    write_results(storage, "bakery", segments=[(0.0, 5.0, "the baker kneads dough for the loaves")])
    assert omniq("index", "rebuild") == 0
    return storage


def test_the_default_mode_is_hybrid_and_finds_a_paraphrase(meaning_store, capsys):
    assert omniq("index", "rebuild") == 0
    assert f"the index holds 4 entries (embeddings of {EMBEDDING_MODEL})" in capsys.readouterr().out
    assert omniq("search", "closing", "the", "bridge", "--json") == 0
    hits = json.loads(capsys.readouterr().out)
    assert (hits[0]["media_id"], hits[0]["start"], hits[0]["mode"]) == ("harbour", 3600.0, "meaning")
    assert omniq("search", "closing the bridge", "--mode", "words") == 0
    assert "no matches" in capsys.readouterr().err
    assert omniq("search", "harbour", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["mode"] == "both"
    assert omniq("search", "bread making", "--mode", "meaning", "--limit", "1") == 0
    line, link = capsys.readouterr().out.splitlines()
    assert line.split()[1:4] == ["transcript", "meaning", "/videos/bakery.mp4@00:00:00-00:00:05"]
    assert link.endswith("/results/bakery/index.html#t=0.0")


def test_media_and_time_filters(meaning_store, capsys):
    capsys.readouterr()
    assert omniq("search", "closing the bridge", "--media", "bakery", "--json") == 0
    assert {hit["media_id"] for hit in json.loads(capsys.readouterr().out)} == {"bakery"}
    assert omniq("search", "closing the bridge", "--from", "59:00", "--to", "1:00:30", "--json") == 0
    hits = json.loads(capsys.readouterr().out)
    assert {(hit["media_id"], hit["kind"]) for hit in hits} == {("harbour", "transcript"), ("harbour", "summary")}
    assert all(hit["end"] >= 3540 and hit["start"] <= 3630 for hit in hits)


def test_bad_queries_times_and_models_are_named(meaning_store, capsys, monkeypatch):
    from workers.cli import main

    capsys.readouterr()
    assert main(["search", " \t "]) == 2
    assert "search query ' \\t ' is empty: give one or more words" in capsys.readouterr().err
    assert main(["search", "harbour " * 300, "--json"]) == 0
    captured = capsys.readouterr()
    assert "the query has 2400 characters; searching for its first 1000" in captured.err
    assert json.loads(captured.out)
    with pytest.raises(SystemExit) as usage:
        main(["search", "harbour", "--from", "ten"])
    assert usage.value.code == 2 and "'ten' is not a time" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "harbour", "--mode", "fuzzy"])
    capsys.readouterr()
    monkeypatch.setenv("OMNIQ_EMBEDDING_MODEL", "/no/such/model")
    assert main(["search", "harbour"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OMNIQ_EMBEDDING_MODEL=/no/such/model: no such folder" in err


def test_a_changed_model_asks_for_a_rebuild_and_the_rebuild_fixes_it(meaning_store, capsys, monkeypatch):
    from workers.cli import main

    monkeypatch.setenv("OMNIQ_EMBEDDING_MODEL", "none")
    assert omniq("index", "rebuild") == 0  # words only now: the vectors are dropped
    assert "(words only, no embeddings)" in capsys.readouterr().out
    assert omniq("search", "harbour", "--json") == 0  # the default mode is words when there is no model
    assert {hit["mode"] for hit in json.loads(capsys.readouterr().out)} == {"words"}
    monkeypatch.setenv("OMNIQ_EMBEDDING_MODEL", EMBEDDING_MODEL)
    assert main(["search", "closing the bridge"]) == 2
    err = capsys.readouterr().err
    assert "has no embeddings" in err and "run 'omniq index rebuild'" in err
    assert main(["index", "rebuild"]) == 0
    assert main(["search", "closing the bridge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 2)[-1])[0]["media_id"] == "harbour"
