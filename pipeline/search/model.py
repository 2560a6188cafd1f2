"""What the search index stores and returns, and the text helpers every backend shares."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, Self

KINDS = ("transcript", "caption", "summary")
# ``SearchHit.highlighted`` wraps each match in these (U+27E6 / U+27E7, mathematical white square brackets):
# unlike [ and ], which transcripts use for "[music]" and the like, they do not occur in speech or captions.
# ``SearchHit.spans`` gives the same matches as exact character offsets into ``text``.
HIGHLIGHT_OPEN = "\u27e6"
HIGHLIGHT_CLOSE = "\u27e7"
# a public contract; ``mode``: which way of searching found the hit (words | meaning | both)
JSON_FIELDS = ("media_id", "source", "kind", "text", "start", "end", "score", "mode")
CAPTION_JOINER = " | "  # between the visual and the audio caption of one chunk
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
    language: str | None = None  # ISO 639-1 of the transcript: how PostgreSQL stems it (SQLite does not)


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
    mode: str = "words"  # words | meaning | both (a hybrid hit that both rankings found)

    def to_json(self) -> dict[str, Any]:
        """The documented ``omniq search --json`` shape: exactly ``JSON_FIELDS``."""
        return {name: getattr(self, name) for name in JSON_FIELDS}


class SearchIndex(Protocol):
    """Where finished results are searched. Implementations must make ``add_media`` replace atomically, and
    keep each entry's embedding with it (of the one model the index records)."""

    def add_media(self, media_id: str, entries: Iterable[IndexEntry]) -> int: ...
    def remove_media(self, media_id: str) -> int: ...
    def media_ids(self) -> set[str]: ...
    def search(
        self,
        query: str,
        limit: int = 10,
        *,
        mode: str = "words",
        tag: str | None = None,
        kind: str | None = None,
        source_prefix: str | None = None,
        media_id: str | None = None,
        time_from: float | None = None,
        time_to: float | None = None,
    ) -> list[SearchHit]: ...
    def use_embedder(self) -> bool: ...
    def embedding_model(self) -> str | None: ...
    def rebuilding(self) -> AbstractContextManager[None]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


class PerThreadConnection:
    """What the backends share: one connection per thread (``self._local.conn``), opened again after a fork,
    closed by ``close`` or at the end of a ``with`` block."""

    _local: threading.local

    def rebuilding(self) -> AbstractContextManager[None]:
        """Around a whole rebuild (``rebuild_index``): a backend may defer index maintenance to its end."""
        return nullcontext()

    def close(self) -> None:
        """Close this thread's connection; the index opens it again when used."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def like_prefix(prefix: str) -> str:
    """``prefix`` for a LIKE pattern whose escape character is ``\\``: its own %, _ and \\ match themselves."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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
