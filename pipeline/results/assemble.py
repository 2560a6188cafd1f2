"""Chunk results → the public result files: transcript JSON (one segment per utterance) and its subtitle cues as
SRT/VTT/TXT (``pipeline.results.cues``), captions, summary.

Pure functions of their inputs; the job module writes what they return.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.results.cues import Cue, TimedText, TimedWord


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
    # per utterance: start, end (file times), text, and words [{text, start, end, probability}] where the
    # transcriber times them (Whisper)
    segments: list[dict[str, Any]] = field(default_factory=list)
    new_tokens: int = 0
    model_seconds: float = 0.0  # this chunk's share of its batches' generate time
    asr_seconds: float = 0.0  # Whisper's time for this chunk's utterances
    prepare_seconds: float = 0.0  # fetching and decoding it, plus its share of the processor's time
    # the rows that failed for good: [{kind, start, end, reason}] (README "Partial results"); a retry reruns them
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkResult:
        result = cls(**data)
        result.errors = [e for e in result.errors if isinstance(e, dict)]  # older results listed strings (none)
        return result

    def fail(self, kind: str, reason: str, span: tuple[float, float] | None = None) -> None:
        """Record that this chunk's ``kind`` row (over ``span``, default the chunk) failed for good."""
        start, end = span or (self.start, self.end)
        self.errors.append({"kind": kind, "start": round(start, 3), "end": round(end, 3), "reason": reason})

    def failed(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.errors if e["kind"] == kind]


Segment = TimedText  # one utterance of the transcript: {start, end, text}


def clean_text(text: str) -> str:
    """One line of text, safe inside SRT and VTT cues (no blank lines, no cue arrows)."""
    return " ".join(text.replace("-->", "->").split())


def transcript_segments(chunks: list[ChunkResult]) -> list[Segment]:
    """One segment per utterance with text, in time order; its times are the utterance's (speech detection).

    A chunk result without segments (written by a version before speech detection) gives one segment over its
    chunk's span.
    """
    segments: list[Segment] = []
    for chunk in sorted(chunks, key=lambda c: c.index):
        spans = chunk.segments or [{"start": chunk.start, "end": chunk.end, "text": chunk.transcript}]
        for span in spans:
            text = clean_text(span["text"])
            if text:
                words = tuple(
                    TimedWord(clean_text(w["text"]), float(w["start"]), float(w["end"]), w.get("probability"))
                    for w in span.get("words") or ()
                    if clean_text(w["text"])
                )
                segments.append(Segment(round(float(span["start"]), 3), round(float(span["end"]), 3), text, words))
    return segments


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(cues: list[Cue]) -> str:
    blocks = [
        f"{number}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{_cue_text(c)}\n"
        for number, c in enumerate(cues, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(cues: list[Cue], note: str | None = None) -> str:
    """WebVTT; ``note`` goes in a NOTE block, which players do not show (e.g. that the text is random)."""
    blocks = [f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{_cue_text(c)}\n" for c in cues]
    head = f"NOTE {' '.join(note.replace('-->', '->').split())}\n\n" if note else ""
    return "WEBVTT\n\n" + head + "\n".join(blocks)


def to_txt(cues: list[Cue]) -> str:
    """One line per cue: its start and its text."""
    return "".join(f"[{_clock(c.start, '.')}] {' '.join(c.lines)}\n" for c in cues)


def _cue_text(cue: Cue) -> str:
    return "\n".join(cue.lines)  # made from cleaned segments: no blank lines, no cue arrows


def transcript_doc(segments: list[Segment], language: str | None, transcriber: str | None = None) -> dict[str, Any]:
    """The transcript: its language, who wrote it, whether its words are timed (``times``: ``words``, or
    ``utterances`` when only each segment's edges are), and its segments with their words."""
    timed = all(s.words for s in segments) and (bool(segments) or transcriber == "whisper")
    return {
        "language": language,
        "transcriber": transcriber,
        "times": "words" if timed else "utterances",
        "segments": [
            {
                "start": float(s.start),
                "end": float(s.end),
                "text": s.text,
                "words": [
                    {"text": w.text, "start": w.start, "end": w.end, "probability": w.probability} for w in s.words
                ],
            }
            for s in segments
        ],
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
