"""Search by meaning and by both: what the backends share.

``Searcher`` gives every backend the one ``search`` of the ``SearchIndex`` interface: ``words`` is the
backend's full-text search, ``meaning`` ranks entries by the cosine similarity of their embedding to the
query's, and ``hybrid`` fuses the two rankings by reciprocal rank fusion (each hit scores the sum of
1 / (RRF_K + rank) over the rankings it is in; Cormack et al., 2009). Hybrid asks each ranking for at least
``HYBRID_POOL`` candidates, so a hit ranked low by one and high by the other still surfaces.

``VectorCache`` is the exact (brute-force) nearest-neighbour search of the backends that keep vectors as
bytes (SQLite; PostgreSQL without pgvector): the index's vectors in one float32 matrix in this process,
refreshed incrementally when the index's change counter moves (the rows added since are read, the rows gone
are dropped). A query is one matrix-vector product.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.search.embed import NONE, SETTING, Embedder, mismatch_message, recorded_name, to_blob
from pipeline.search.model import IndexEntry, SearchHit, clean_text

MODES = ("words", "meaning", "hybrid")
RRF_K = 60
HYBRID_POOL = 50
QUERY_MAX_CHARS = 1000  # a longer query is cut to this (the CLI says so)


@dataclass(frozen=True)
class Filters:
    """What every mode restricts hits to; None: no restriction. A time range keeps entries that overlap it."""

    tag: str | None = None
    kind: str | None = None
    source_prefix: str | None = None
    media_id: str | None = None
    time_from: float | None = None
    time_to: float | None = None

    @property
    def any(self) -> bool:
        return any(value is not None for value in vars(self).values())


def fuse(rankings: Iterable[list[SearchHit]], limit: int) -> list[SearchHit]:
    """Reciprocal rank fusion of the words and meaning rankings; a hit found by both says ``both``."""
    scores: dict[tuple[Any, ...], float] = {}
    found: dict[tuple[Any, ...], SearchHit] = {}
    modes: dict[tuple[Any, ...], set[str]] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = (hit.media_id, hit.kind, hit.start, hit.end, hit.text)
            scores[key] = scores.get(key, 0.0) + 1.0 / (RRF_K + rank)
            modes.setdefault(key, set()).add(hit.mode)
            if key not in found or (hit.spans and not found[key].spans):  # keep the highlights of words
                found[key] = hit
    best = sorted(scores, key=lambda key: (-scores[key], key))[:limit]
    return [
        replace(found[key], score=round(scores[key], 6), mode="both" if len(modes[key]) > 1 else found[key].mode)
        for key in best
    ]


class Searcher:
    """``search`` in every mode, for a backend that provides ``_words``, ``_meaning`` and ``embedder``."""

    embedder: Embedder | None

    def _words(self, query: str, limit: int, filters: Filters) -> list[SearchHit]:
        raise NotImplementedError

    def _meaning(self, vector: np.ndarray, limit: int, filters: Filters) -> list[SearchHit]:
        raise NotImplementedError

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
    ) -> list[SearchHit]:
        """The best ``limit`` hits for ``query`` in ``mode`` (words | meaning | hybrid), best first, restricted
        to the filters given. ``query`` is cut to ``QUERY_MAX_CHARS`` characters."""
        if limit < 1:
            raise ValueError(f"search limit {limit} must be at least 1")
        if mode not in MODES:
            raise ValueError(f"search mode {mode!r}: use one of {', '.join(MODES)}")
        if time_from is not None and time_to is not None and time_to < time_from:
            raise ValueError(f"search time range {time_from:g}-{time_to:g} s ends before it starts")
        filters = Filters(tag, kind, source_prefix, media_id, time_from, time_to)
        query = query[:QUERY_MAX_CHARS]
        if mode == "words":
            return [replace(hit, mode="words") for hit in self._words(query, limit, filters)]
        words = clean_text(query)
        if not words:
            raise ValueError(f"search query {query!r} is empty: give one or more words")
        if self.embedder is None:
            raise ConfigError(f"{SETTING}={NONE}: search by {mode} needs embeddings; use --mode words")
        vector = self.embedder.encode([words])[0]
        if mode == "meaning":
            return self._meaning(vector, limit, filters)
        pool = max(limit, HYBRID_POOL)
        try:
            by_words = [replace(hit, mode="words") for hit in self._words(query, pool, filters)]
        except ValueError:  # no word FTS can use (only punctuation): meaning alone
            by_words = []
        return fuse([by_words, self._meaning(vector, pool, filters)], limit)


class VectorCache:
    """The vectors of an index in one matrix, for exact cosine top-k; shared by a process's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.key: object = None
        self.ids = np.zeros(0, dtype=np.int64)  # ascending
        self.matrix: np.ndarray | None = None

    def refresh(
        self,
        key: object,
        dim: int,
        list_ids: Callable[[], Iterable[int]],
        read_from: Callable[[int], Iterable[tuple[int, bytes]]],
    ) -> None:
        """Bring the matrix up to date with the index if ``key`` (its change counter) moved. ``list_ids`` gives
        the ids that have vectors now, ``read_from(id)`` the (id, vector bytes) of those from ``id`` on.

        The key is read before the ids, so a write between the two only makes the next query refresh again.
        """
        with self._lock:
            if key == self.key and self.matrix is not None and self.matrix.shape[1] == dim:
                return
            if self.matrix is None or self.matrix.shape[1] != dim:
                self.ids, self.matrix = np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
            now = np.unique(np.fromiter(list_ids(), dtype=np.int64))
            keep = np.isin(self.ids, now, assume_unique=True)
            new = np.setdiff1d(now, self.ids[keep], assume_unique=True)
            ids, matrix = self.ids[keep], self.matrix[keep]
            if len(new):
                wanted = set(new.tolist())
                rows = [(row_id, blob) for row_id, blob in read_from(int(new[0])) if row_id in wanted]
                added = np.frombuffer(b"".join(blob for _, blob in rows), dtype="<f4").reshape(len(rows), dim)
                ids = np.concatenate([ids, np.array([row_id for row_id, _ in rows], dtype=np.int64)])
                matrix = np.concatenate([matrix, added.astype(np.float32)])
                order = np.argsort(ids, kind="stable")
                ids, matrix = ids[order], np.ascontiguousarray(matrix[order])
            self.ids, self.matrix, self.key = ids, matrix, key

    def top(self, vector: np.ndarray, limit: int, allowed: Iterable[int] | None = None) -> list[tuple[int, float]]:
        """The ``limit`` (id, cosine) nearest to ``vector``, best first, among ``allowed`` ids if given."""
        with self._lock:
            ids, matrix = self.ids, self.matrix
        if matrix is None or not len(ids):
            return []
        if allowed is not None:
            wanted = np.unique(np.fromiter(allowed, dtype=np.int64))
            positions = np.searchsorted(ids, wanted)
            inside = positions < len(ids)
            positions, wanted = positions[inside], wanted[inside]
            positions = positions[ids[positions] == wanted]
            if not len(positions):
                return []
            scores = matrix[positions] @ vector
            candidates = ids[positions]
        else:
            scores = matrix @ vector
            candidates = ids
        count = min(limit, len(scores))
        best = np.argpartition(-scores, count - 1)[:count]
        best = best[np.lexsort((candidates[best], -scores[best]))]
        return [(int(candidates[i]), float(scores[i])) for i in best]


def embed_entries(
    embedder: Embedder, entries: list[IndexEntry], known: dict[str, bytes]
) -> tuple[list[bytes | None], int]:
    """Each entry's vector as bytes, and the dimension: a text in ``known`` (the media's vectors already in
    the index, of this model) keeps its vector, the others are embedded in batches (each text once)."""
    missing = list(dict.fromkeys(entry.text for entry in entries if entry.text not in known))
    if not missing:  # nothing to embed: the model is not even loaded (a rebuild of an unchanged store)
        return [known[entry.text] for entry in entries], len(known[entries[0].text]) // 4
    computed = dict(zip(missing, (to_blob(vector) for vector in embedder.encode(missing)), strict=True))
    return [known.get(entry.text) or computed[entry.text] for entry in entries], embedder.dim


def meaning_hits(nearest: list[tuple[int, float]], rows: dict[int, tuple[Any, ...]]) -> list[SearchHit]:
    """Hits in ``nearest``'s order from each id's (media_id, source, tag, kind, start, end, text) row; an id
    gone since the ranking is skipped."""
    hits = []
    for entry_id, score in nearest:
        if entry_id in rows:
            media_id, source, tag, kind, start, end, text = rows[entry_id]
            score = round(score, 6)
            hits.append(
                SearchHit(media_id, source, kind, text, float(start), float(end), score, text, tag, (), "meaning")
            )
    return hits


def check_recorded(where: str, recorded: str | None, embedder: Embedder | None) -> None:
    """Raise the rebuild message when the index's vectors are not this embedder's."""
    configured = recorded_name(embedder)
    if recorded is not None and recorded != configured:
        raise ConfigError(mismatch_message(where, recorded, configured))


def check_dim(where: str, known: str | None, dim: int | None, embedder: Embedder | None) -> None:
    """Raise when vectors of ``dim`` dimensions would join an index that records ``known``."""
    if dim is not None and known is not None and int(known) != dim:
        raise ConfigError(
            f"search index {where} holds {known}-dimensional vectors, {recorded_name(embedder)} gives {dim}: "
            "run 'omniq index rebuild'"
        )
