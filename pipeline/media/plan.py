"""Chunk planning: fixed windows whose boundaries move to nearby silence so words are not cut."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import pairwise

MIN_TAIL_SECONDS = 1.0  # a last piece shorter than this joins the chunk before it


@dataclass(frozen=True)
class Chunk:
    """One piece of a file. ``start``/``end`` are the span it owns (chunks tile the file without gaps);
    ``media_start`` may reach back by the configured overlap to give the model context."""

    index: int
    start: float
    end: float
    media_start: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> Chunk:
        return cls(int(data["index"]), float(data["start"]), float(data["end"]), float(data["media_start"]))


def _nearest_silence(target: float, silences: list[tuple[float, float]], search: float) -> float | None:
    """The point inside a silence closest to ``target``, if one lies within ``search`` seconds."""
    best: float | None = None
    for begin, end in silences:
        margin = min(0.25, (end - begin) / 2)  # keep a little quiet on both sides of the cut
        point = min(max(target, begin + margin), end - margin)
        if abs(point - target) <= search and (best is None or abs(point - target) < abs(best - target)):
            best = point
    return best


def plan_chunks(
    duration: float,
    chunk_seconds: float,
    silences: list[tuple[float, float]] | None = None,
    search_seconds: float = 0.0,
    overlap_seconds: float = 0.0,
) -> list[Chunk]:
    """Split ``[0, duration]`` into chunks of about ``chunk_seconds``.

    Each boundary starts at ``previous + chunk_seconds`` and moves to the nearest silence within
    ``search_seconds``; chunks are contiguous, cover the whole file and never exceed
    ``chunk_seconds + search_seconds``.
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    if chunk_seconds <= 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    silences = sorted(silences or [])
    boundaries = [0.0]
    while duration - boundaries[-1] > chunk_seconds + min(search_seconds, chunk_seconds / 2):
        start = boundaries[-1]
        target = start + chunk_seconds
        cut = _nearest_silence(target, silences, search_seconds) if search_seconds > 0 else None
        if cut is None or cut <= start + chunk_seconds / 2:
            cut = target
        if duration - cut < MIN_TAIL_SECONDS:
            break
        boundaries.append(round(cut, 3))
    boundaries.append(duration)
    return [
        Chunk(index, start, end, max(0.0, start - overlap_seconds))
        for index, (start, end) in enumerate(pairwise(boundaries))
    ]
