"""Chunk results → the public result files: transcript JSON/SRT/VTT/TXT, captions, summary.

Pure functions of their inputs; the job module writes what they return.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

SEGMENT_MAX_SECONDS = 30.0  # Qwen3-Omni gives no timestamps: longer chunk texts are split evenly


@dataclass
class ChunkResult:
    """What the model wrote for one chunk. ``errors`` records partial failures instead of raising."""

    index: int
    start: float
    end: float
    transcript: str = ""
    visual: str = ""
    audio: str = ""
    summary: str = ""
    new_tokens: int = 0
    model_seconds: float = 0.0  # this chunk's share of its batches' generate time
    prepare_seconds: float = 0.0  # fetching and decoding it, plus its share of the processor's time
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkResult:
        return cls(**data)


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


def clean_text(text: str) -> str:
    """One line of text, safe inside SRT and VTT cues (no blank lines, no cue arrows)."""
    return " ".join(text.replace("-->", "->").split())


def transcript_segments(chunks: list[ChunkResult], max_seconds: float = SEGMENT_MAX_SECONDS) -> list[Segment]:
    """One segment per chunk with speech, split into pieces of at most ``max_seconds``.

    Times come from chunk boundaries (the model gives none); a long chunk's words are spread
    evenly over equal sub-spans.
    """
    segments: list[Segment] = []
    for chunk in sorted(chunks, key=lambda c: c.index):
        text = clean_text(chunk.transcript)
        if not text:
            continue
        duration = chunk.end - chunk.start
        pieces = max(1, math.ceil(duration / max_seconds - 1e-9))
        words = text.split(" ")
        pieces = min(pieces, len(words))
        for piece in range(pieces):
            first = len(words) * piece // pieces
            last = len(words) * (piece + 1) // pieces
            start = chunk.start + duration * piece / pieces
            end = chunk.start + duration * (piece + 1) / pieces
            segments.append(Segment(round(start, 3), round(end, 3), " ".join(words[first:last])))
    return segments


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[Segment]) -> str:
    cues = [
        f"{number}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n"
        for number, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(segments: list[Segment]) -> str:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_txt(segments: list[Segment]) -> str:
    return "".join(f"[{_clock(s.start, '.')}] {s.text}\n" for s in segments)


def transcript_doc(segments: list[Segment], language: str | None) -> dict[str, Any]:
    return {
        "language": language,
        "segments": [{"start": float(s.start), "end": float(s.end), "text": s.text} for s in segments],
    }


def captions_doc(chunks: list[ChunkResult]) -> dict[str, Any]:
    return {
        "chunks": [
            {
                "index": c.index,
                "start": float(c.start),
                "end": float(c.end),
                "visual": clean_text(c.visual),
                "audio": clean_text(c.audio),
            }
            for c in sorted(chunks, key=lambda c: c.index)
        ]
    }


def summary_doc(summary: str, chunks: list[ChunkResult]) -> dict[str, Any]:
    return {
        "summary": summary.strip(),
        "chunks": [
            {"index": c.index, "start": float(c.start), "end": float(c.end), "summary": clean_text(c.summary)}
            for c in sorted(chunks, key=lambda c: c.index)
        ],
    }


def dumps(document: Any) -> bytes:
    """Stable JSON bytes (sorted keys are not used: the documented field order reads better)."""
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode()
