"""``omniq search`` and ``omniq index rebuild``: find words in finished results, and rebuild the index from the store.

``add_commands`` adds both to the ``omniq`` parser; the work happens in ``pipeline.search``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from pipeline.config import Settings
from pipeline.search import (
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    MODES,
    QUERY_MAX_CHARS,
    SearchHit,
    clean_text,
    default_index_url,
    embedder_for,
    mark_spans,
)

BOLD, NORMAL = "\x1b[1m", "\x1b[22m"
EXCERPT_CHARS = 240  # a longer text (a file summary) is cut to this many characters around its first match


def add_commands(subparsers: Any) -> None:  # argparse's _SubParsersAction is private
    """Add ``search`` and ``index rebuild`` to the subcommands of the ``omniq`` parser."""
    search = subparsers.add_parser(
        "search",
        help="search transcripts, captions and summaries of finished jobs, by words and by meaning",
        description="--mode words: every word must occur ('word*' matches words starting with 'word'), ranked "
        "by bm25. --mode meaning: ranked by how close the text's meaning is to the query's (cosine similarity of "
        "sentence embeddings). --mode hybrid (the default): both rankings fused (reciprocal rank fusion).",
    )
    search.add_argument("query", nargs="+", metavar="QUERY", help="what to find (quoting it is optional)")
    search.add_argument(
        "--mode",
        choices=MODES,
        help="words, meaning or hybrid (default: hybrid; words when OMNIQ_EMBEDDING_MODEL=none)",
    )
    search.add_argument("--limit", type=_positive_int, default=10, metavar="N", help="at most N hits (default 10)")
    search.add_argument("--tag", help="only results of jobs enqueued with this --tag")
    search.add_argument("--kind", choices=("transcript", "caption", "summary"), help="only this kind of text")
    search.add_argument(
        "--source", metavar="PREFIX", help="only media whose source starts with this (a folder, s3://b/p/)"
    )
    search.add_argument("--media", metavar="MEDIA_ID", help="only this media (its id, as omniq status shows it)")
    search.add_argument(
        "--from", dest="time_from", type=_time, metavar="TIME", help="only moments that end at or after TIME (90, 1:30)"
    )
    search.add_argument(
        "--to", dest="time_to", type=_time, metavar="TIME", help="only moments that start at or before TIME"
    )
    search.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of {media_id, source, kind, text, start, end, score, mode}",
    )
    _index_option(search)
    search.set_defaults(func=cmd_search)

    index = subparsers.add_parser("index", help="maintain the search index")
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    rebuild = actions.add_parser(
        "rebuild",
        help="index every done job in the store (--out, default OMNIQ_STORAGE_URL) and drop media no longer there",
        description="The store is the source of truth: this makes the index match it; it is safe to run any time.",
    )
    _index_option(rebuild)
    rebuild.set_defaults(func=cmd_index_rebuild)


def _index_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index",
        metavar="URL",
        help="sqlite:///path/index.sqlite (default: OMNIQ_INDEX_URL, else index.sqlite beside local results)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR|s3://...",
        help="the store whose results (and default index) to use, as given to run --out (default: OMNIQ_STORAGE_URL)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings()
    if args.out:
        settings = settings.model_copy(update={"storage_url": args.out})
    return settings


def _source_prefix(given: str | None) -> str | None:
    """A local folder as the file:// URI prefix manifests use; S3 prefixes and URIs as they are."""
    if not given or "://" in given:
        return given
    from pathlib import Path

    return Path(given).expanduser().resolve().as_uri()


def _time(text: str) -> float:
    """Seconds from ``90``, ``1:30`` or ``01:01:30`` (each part a number, seconds may have decimals)."""
    parts = text.strip().split(":")
    try:
        if len(parts) > 3 or not all(parts):
            raise ValueError(text)
        seconds = 0.0
        for part in parts:
            seconds = seconds * 60 + float(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: give seconds (90) or MM:SS / HH:MM:SS") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: give 0 or more seconds")
    return seconds


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def cmd_search(args: argparse.Namespace) -> int:
    """Print the best hits for the query: one line each, or a JSON list with ``--json``."""
    from pipeline.search import open_index

    settings = _settings(args)
    query = " ".join(args.query)
    if not clean_text(query):
        print(f"omniq: search query {query!r} is empty: give one or more words", file=sys.stderr)
        return 2
    if len(query) > QUERY_MAX_CHARS:
        print(
            f"omniq: the query has {len(query)} characters; searching for its first {QUERY_MAX_CHARS}", file=sys.stderr
        )
        query = query[:QUERY_MAX_CHARS]
    mode = args.mode or ("words" if embedder_for(settings.embedding_model) is None else "hybrid")
    index = open_index(args.index, settings, create=False)
    try:
        hits = index.search(
            query,
            args.limit,
            mode=mode,
            tag=args.tag,
            kind=args.kind,
            source_prefix=_source_prefix(args.source),
            media_id=args.media,
            time_from=args.time_from,
            time_to=args.time_to,
        )
    except ValueError as error:  # an empty query; the caller's ValueError handler means bad settings
        print(f"omniq: {error}", file=sys.stderr)
        return 2
    finally:
        index.close()
    if args.json:
        print(json.dumps([hit.to_json() for hit in hits], indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print(f"no matches for {query!r}", file=sys.stderr)
    bold = sys.stdout.isatty()
    link = moment_link(settings)
    for hit in hits:
        print(hit_line(hit, bold=bold))
        print(f"    at: {link(hit)}")
    return 0


def moment_link(settings: Settings):  # type: ignore[no-untyped-def]
    """How a hit's moment is opened: its page at ``index.html#t=START`` in a local store, else the command that
    renders the page (an S3 store's page needs a fresh link to the media)."""
    from pipeline.spec import results_prefix
    from pipeline.storage import LocalStorage, open_storage
    from workers.cli.view import moment_fragment

    storage = open_storage(settings.storage_url, settings)

    def link(hit: SearchHit) -> str:
        if isinstance(storage, LocalStorage):
            page = storage.path(f"{results_prefix(hit.media_id)}/index.html")
            return page.as_uri() + moment_fragment(hit.start)
        return f"omniq view {hit.media_id} --at {hit.start:.1f}"

    return link


def cmd_index_rebuild(args: argparse.Namespace) -> int:
    """Make the index match the results in ``OMNIQ_STORAGE_URL``; prints the counts."""
    from pipeline.search import open_index, rebuild_index
    from pipeline.storage import open_storage

    settings = _settings(args)
    storage = open_storage(settings.storage_url, settings)
    failures: list[str] = []

    def progress(media_id: str, entries: int, error: str | None) -> None:
        if error is not None:
            failures.append(media_id)
            print(f"omniq: skipped {media_id}: {error}", file=sys.stderr)

    index = open_index(args.index, settings)
    try:
        media, entries = rebuild_index(storage, index, progress)
        total, model = index.count(), index.embedding_model()
    finally:
        index.close()
    where = args.index or default_index_url(settings)
    skipped = f"; {len(failures)} unreadable jobs skipped" if failures else ""
    print(f"indexed {media} done jobs ({entries} entries) from {storage.url} into {where}{skipped}")
    embedded = "words only, no embeddings" if model in (None, "none") else f"embeddings of {model}"
    print(f"the index holds {total} entries ({embedded})")
    return 1 if failures else 0


def clock(seconds: float, *, round_up: bool = False) -> str:
    """``HH:MM:SS``; the end of a span rounds up so the span still covers the match."""
    whole = math.ceil(seconds) if round_up else math.floor(seconds)
    hours, rest = divmod(max(0, whole), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def excerpt(
    text: str, spans: tuple[tuple[int, int], ...], width: int = EXCERPT_CHARS
) -> tuple[str, list[tuple[int, int]]]:
    """At most ``width`` characters of ``text`` around its first match (with … where cut), and the spans in it."""
    if len(text) <= width:
        return text, list(spans)
    first = spans[0][0] if spans else 0
    start = max(0, min(first - width // 4, len(text) - width))
    end = start + width
    lead = "…" if start > 0 else ""
    shifted = [(a - start + len(lead), b - start + len(lead)) for a, b in spans if a >= start and b <= end]
    return lead + text[start:end] + ("…" if end < len(text) else ""), shifted


def hit_line(hit: SearchHit, *, bold: bool) -> str:
    """``score  kind  mode  source@HH:MM:SS-HH:MM:SS  text``, matches in ANSI bold (``bold``) or in ⟦ ⟧."""
    safe = clean_text(hit.text)  # never print terminal escapes from stored text (the SQLite index has none)
    text, spans = excerpt(safe, hit.spans if safe == hit.text else ())
    marked = mark_spans(text, spans, BOLD, NORMAL) if bold else mark_spans(text, spans, HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE)
    span = f"{clock(hit.start)}-{clock(hit.end, round_up=True)}"
    return f"{hit.score:7.3f}  {hit.kind:<10}  {hit.mode:<7}  {clean_text(hit.source)}@{span}  {marked}"
