"""Subtitle cues from timed transcript segments, following the common rules for subtitles (Netflix's timed-text
style guide is the usual reference).

- at most :data:`MAX_LINE` characters per line and :data:`MAX_LINES` lines per cue; lines break after
  punctuation or at spaces, never inside a word (a word longer than a whole line is the one exception: it is cut
  into line-sized pieces), and by character in scripts written without spaces (Chinese, Japanese, Thai, ...);
- a cue lasts between :data:`MIN_SECONDS` (5/6 s) and :data:`MAX_SECONDS` (7 s);
- reading speed at most :data:`MAX_CPS` characters per second where the audio allows: a cue may run up to
  :data:`LINGER_SECONDS` into the silence after its speech;
- at least :data:`GAP_SECONDS` (2 frames at 25 fps) between one cue and the next.

A segment is one utterance: its start and end are the speech's. A segment too long for one cue is cut into
cues of about equal length at the best break points. Where the transcriber timed its words (Whisper), a cue
starts at its first word and ends at its last (then lingers by the rules above); otherwise the segment's time
is shared out by characters, so times inside an utterance are estimates and only its edges are as precise as
the speech detection.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

MAX_LINE = 42
MAX_LINES = 2
MIN_SECONDS = 5 / 6
MAX_SECONDS = 7.0
MAX_CPS = 20.0
LINGER_SECONDS = 0.5
GAP_SECONDS = 0.08

_STRONG = set(".!?…。！？")  # noqa: RUF001 - the end of a sentence: the best place to break
_WEAK = set(",;:、，；：—–)»”」』")  # noqa: RUF001 - the end of a clause: the next best
_SPACELESS_SCRIPTS = ("THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")  # besides the wide CJK letters


@dataclass(frozen=True)
class TimedWord:
    """A word of a segment as said: its text, start and end (seconds) and the transcriber's confidence."""

    text: str
    start: float
    end: float
    probability: float | None = None

    def to_dict(self) -> dict[str, object]:
        """As ``transcript.json`` writes a word."""
        return {"text": self.text, "start": self.start, "end": self.end, "probability": self.probability}


@dataclass(frozen=True)
class TimedText:
    """A transcript segment: one utterance's text, its speech's start and end (seconds) and, where the
    transcriber timed them, its words (in order, inside the segment)."""

    start: float
    end: float
    text: str
    words: tuple[TimedWord, ...] = ()


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def characters(self) -> int:
        return sum(len(line) for line in self.lines)


@dataclass(frozen=True)
class _Unit:
    """A word (or one character of a script without spaces) and whether a space comes before it."""

    text: str
    space: bool


def _spaceless(char: str) -> bool:
    """A letter of a script written without spaces between words (Chinese, Japanese, Thai, ...)."""
    if not unicodedata.category(char).startswith("L"):
        return False
    name = unicodedata.name(char, "")
    if unicodedata.east_asian_width(char) in ("W", "F"):
        return not name.startswith("HANGUL")  # Korean puts spaces between words
    return name.startswith(_SPACELESS_SCRIPTS)


def units_of(text: str) -> list[_Unit]:
    """Break ``text`` into the pieces a line may break between: words, and single characters of scripts
    written without spaces (punctuation stays with the character before it)."""
    units: list[_Unit] = []
    for match in re.finditer(r"(\s*)(\S+)", text):
        space, current = bool(match.group(1)) and bool(units), ""
        for char in match.group(2):
            opening = all(unicodedata.category(c) in ("Ps", "Pi") for c in current)
            starts_new = _spaceless(char) or (bool(current) and _spaceless(current[-1]) and char.isalnum())
            if current and starts_new and not opening:
                units.append(_Unit(current, space))
                space, current = False, ""
            current += char
        units.append(_Unit(current, space))
    out: list[_Unit] = []
    for unit in units:  # a word longer than a line: the only break inside a word
        pieces = [unit.text[i : i + MAX_LINE] for i in range(0, len(unit.text), MAX_LINE)]
        out += [_Unit(piece, unit.space and first == 0) for first, piece in enumerate(pieces)]
    return out


def joined(units: Sequence[_Unit]) -> str:
    return "".join((" " if unit.space and position else "") + unit.text for position, unit in enumerate(units))


def _break_quality(units: Sequence[_Unit], after: int) -> float:
    """How good a break after ``units[after - 1]`` is: 0 best (end of a sentence) .. 2 (inside a phrase)."""
    last = units[after - 1].text[-1]
    if last in _STRONG:
        return 0.0
    if last in _WEAK:
        return 1.0
    return 2.0


def lines_of(units: Sequence[_Unit]) -> tuple[str, ...] | None:
    """The cue's lines: one if it fits, else two balanced ones broken at the best place; None if it cannot fit."""
    whole = joined(units)
    if len(whole) <= MAX_LINE:
        return (whole,)
    best: tuple[float, int] | None = None
    for after in range(1, len(units)):
        top, bottom = joined(units[:after]), joined(units[after:])
        if len(top) > MAX_LINE or len(bottom) > MAX_LINE:
            continue
        # punctuation first, then balance (a slightly longer bottom line reads better than a longer top one)
        score = _break_quality(units, after) + abs(len(top) - len(bottom)) / MAX_LINE + (len(top) > len(bottom)) * 0.05
        if best is None or score < best[0]:
            best = (score, after)
    if best is None:
        return None
    return (joined(units[: best[1]]), joined(units[best[1] :]))


def _split(units: list[_Unit], pieces: int) -> list[list[_Unit]] | None:
    """``units`` in ``pieces`` runs of about equal characters, each cut at a good break near its share; None
    when one of them does not fit in a cue."""
    if pieces <= 1:
        return [units] if lines_of(units) is not None else None
    lengths = [len(u.text) + (1 if u.space and i else 0) for i, u in enumerate(units)]
    total = sum(lengths)
    cuts, position, running = [], 0, 0
    ends = []  # characters up to and including unit i
    for length in lengths:
        running += length
        ends.append(running)
    for k in range(1, pieces):
        ideal = total * k / pieces
        window = total / pieces * 0.35
        best: tuple[float, int] | None = None
        for after in range(position + 1, len(units) - (pieces - k) + 1):
            # near its share first (a far cut makes a cue too short to read), then at punctuation
            score = _break_quality(units, after) * 0.5 + abs(ends[after - 1] - ideal) / max(window, 1.0)
            if best is None or score < best[0]:
                best = (score, after)
        if best is None:
            return None
        cuts.append(best[1])
        position = best[1]
    bounds = [0, *cuts, len(units)]
    runs = [units[a:b] for a, b in pairwise(bounds)]
    if any(not run or lines_of(run) is None for run in runs):
        return None
    return runs


def _cues_of(segment: TimedText) -> list[Cue]:
    """One segment's cues, its time shared out by characters (a few cues of about equal length)."""
    units = units_of(segment.text)
    if not units:
        return []
    characters = len(joined(units))
    duration = max(segment.end - segment.start, 0.0)
    pieces = max(1, math.ceil(characters / (MAX_LINE * MAX_LINES)), math.ceil(duration / MAX_SECONDS - 1e-9))
    pieces = min(pieces, len(units))
    runs = _split(units, pieces)
    while runs is None and pieces < len(units):
        pieces += 1
        runs = _split(units, pieces)
    if runs is None:
        runs = [[unit] for unit in units]
    if segment.words:
        timed = _word_timed(segment, runs)
        if timed is not None:
            return timed
    sizes = [len(joined(run)) for run in runs]
    total = sum(sizes)
    cues, done = [], 0
    for run, size in zip(runs, sizes, strict=True):
        start = segment.start + duration * done / total
        done += size
        end = segment.start + duration * done / total
        lines = lines_of(run) or (joined(run),)
        cues.append(Cue(start, end, lines))
    return cues


def _word_timed(segment: TimedText, runs: list[list[_Unit]]) -> list[Cue] | None:
    """Cues for ``runs`` timed by the segment's words: each from the start of the word its first character
    belongs to, to the end of the word its last character belongs to. None when the words cannot be found in
    the text in order (then the time is shared out by characters)."""
    text = segment.text
    owner = [-1] * len(text)  # the word each character of the text belongs to
    position = 0
    for number, word in enumerate(segment.words):
        found = text.find(word.text, position)
        if found < 0 or not word.text:
            return None
        owner[found : found + len(word.text)] = [number] * len(word.text)
        position = found + len(word.text)
    cues, position = [], 0
    for run in runs:
        first_unit = text.find(run[0].text, position)
        last_unit = text.find(run[-1].text, first_unit + sum(len(u.text) for u in run[:-1]))
        if first_unit < 0 or last_unit < 0:
            return None
        position = last_unit + len(run[-1].text)
        first_words = [w for w in owner[first_unit:position] if w >= 0]
        if not first_words:
            return None
        start, end = segment.words[first_words[0]].start, segment.words[first_words[-1]].end
        cues.append(Cue(start, max(start, end), lines_of(run) or (joined(run),)))
    return cues


def build_cues(segments: Sequence[TimedText]) -> list[Cue]:
    """Subtitle cues for ``segments`` (in any order; they must not overlap), within the rules above.

    Each segment's cues are laid out from its start: a cue lasts at least :data:`MIN_SECONDS` (pushing the next
    cue of the same segment later, into the silence after the speech if need be), the last one as long as
    reading needs and up to :data:`LINGER_SECONDS` after the speech; nothing runs into the next segment's
    speech. Where the speech that follows leaves too little room, the segment's cues start earlier, into the
    silence before it.
    """
    ordered = sorted((s for s in segments if s.text.strip()), key=lambda s: s.start)
    timed: list[Cue] = []
    for position, segment in enumerate(ordered):
        following = ordered[position + 1].start if position + 1 < len(ordered) else math.inf
        earliest = timed[-1].end + GAP_SECONDS if timed else 0.0
        timed += _lay_out(_cues_of(segment), segment, earliest, following - GAP_SECONDS)
    return timed


def _lay_out(cues: list[Cue], segment: TimedText, earliest: float, latest: float) -> list[Cue]:
    """Times for one segment's cues between ``earliest`` (after the previous cue) and ``latest`` (before the
    next speech)."""
    out: list[tuple[float, float]] = []
    for position, cue in enumerate(cues):
        start = max(cue.start, out[-1][1] + GAP_SECONDS if out else earliest)
        end = max(cue.end, start + MIN_SECONDS)
        if position == len(cues) - 1:  # into the silence after the speech, as long as reading needs
            # the last word's end: the segment's end, unless the words say the speech ends earlier
            speech_end = min(segment.end, cue.end) if segment.words else segment.end
            reading = min(start + cue.characters / MAX_CPS, max(speech_end + LINGER_SECONDS, start + MIN_SECONDS))
            end = max(end, reading)
        out.append((start, min(end, start + MAX_SECONDS)))
    overrun = out[-1][1] - latest if out else 0.0
    if overrun > 0:
        # the next speech comes too soon: start earlier (into the silence before), then cut the last cue short
        shift = min(overrun, max(0.0, out[0][0] - earliest))
        out = [(start - shift, end - shift) for start, end in out]
    if out and out[-1][1] > latest:
        # still no room: the cues share what there is (shorter than the rules want; the speech allows no more)
        first = out[0][0]
        durations = [end - start for start, end in out]
        room = max(latest - first - GAP_SECONDS * (len(out) - 1), 0.001 * len(out))
        scale = min(1.0, room / sum(durations))
        out, position = [], first
        for duration in durations:
            out.append((position, position + duration * scale))
            position += duration * scale + GAP_SECONDS
    return [Cue(round(start, 3), round(end, 3), cue.lines) for (start, end), cue in zip(out, cues, strict=True)]
