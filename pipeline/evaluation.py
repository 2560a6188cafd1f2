"""How good a transcript is: word error rate on normalised text, and how far word onsets are from the truth.

Used by ``bench/bench_asr.py`` and the tests. Text is normalised as ASR evaluations usually do (Whisper's
English normaliser is the model): lower case, no punctuation, numbers written as words ("10" and "ten", "14th"
and "fourteenth" are the same word), British and American spellings of a few common words alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
    "twelve": "twelfth",
}  # fmt: skip
_SPELLING = {"harbour": "harbor", "colour": "color", "centre": "center", "theatre": "theater", "metre": "meter"}


def number_words(number: int) -> list[str]:
    """``number`` (0 .. 999 999) in English words: 42 -> ["forty", "two"]."""
    if number < 20:
        return [_ONES[number]]
    if number < 100:
        tens, ones = divmod(number, 10)
        return [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return [_ONES[hundreds], "hundred"] + (number_words(rest) if rest else [])
    thousands, rest = divmod(number, 1000)
    return [*number_words(thousands), "thousand"] + (number_words(rest) if rest else [])


def _ordinal(words: list[str]) -> list[str]:
    last = words[-1]
    if last in _ORDINAL:
        return [*words[:-1], _ORDINAL[last]]
    if last.endswith("y"):
        return [*words[:-1], last[:-1] + "ieth"]
    return [*words[:-1], last + "th"]


def normalise(text: str) -> list[str]:
    """The words of ``text`` as compared: lower case, punctuation gone, numbers and ordinals spelled out."""
    out: list[str] = []
    for token in re.findall(r"[\w']+", text.lower().replace("-", " ")):
        token = token.strip("'")
        match = re.fullmatch(r"(\d{1,6})(st|nd|rd|th)?", token)
        if match:
            spelled = number_words(int(match.group(1)))
            out += _ordinal(spelled) if match.group(2) else spelled
        elif token:
            out.append(_SPELLING.get(token, token))
    return out


@dataclass(frozen=True)
class Alignment:
    """Reference words against hypothesis words: the edit counts and the matched pairs (indices)."""

    substitutions: int
    deletions: int
    insertions: int
    pairs: list[tuple[int, int]]  # (reference index, hypothesis index) of words aligned one to one (equal or not)
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        return self.errors / max(1, self.reference_words)


def align(reference: Sequence[str], hypothesis: Sequence[str]) -> Alignment:
    """The Levenshtein alignment of two word lists (substitutions, deletions and insertions each cost 1)."""
    rows, cols = len(reference) + 1, len(hypothesis) + 1
    cost = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        cost[i][0] = i
    for j in range(cols):
        cost[0][j] = j
    for i in range(1, rows):
        for j in range(1, cols):
            same = reference[i - 1] == hypothesis[j - 1]
            cost[i][j] = min(cost[i - 1][j - 1] + (not same), cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    i, j = len(reference), len(hypothesis)
    substitutions = deletions = insertions = 0
    pairs: list[tuple[int, int]] = []
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            substitutions += reference[i - 1] != hypothesis[j - 1]
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            deletions, i = deletions + 1, i - 1
        else:
            insertions, j = insertions + 1, j - 1
    return Alignment(substitutions, deletions, insertions, pairs[::-1], len(reference))


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of ``hypothesis`` against ``reference`` after :func:`normalise`."""
    return align(normalise(reference), normalise(hypothesis)).wer


def onset_errors(reference: Sequence[tuple[str, float]], hypothesis: Sequence[tuple[str, float]]) -> list[float]:
    """Seconds between the true onset and the transcribed onset of each word both agree on.

    Each side is a list of ``(word, onset)``; words are normalised one by one (a word that normalises to several,
    like "14th", keeps its onset for the first) and aligned; only pairs whose words are equal are measured.
    """

    def spread(words: Sequence[tuple[str, float]]) -> tuple[list[str], list[float]]:
        texts, onsets = [], []
        for word, onset in words:
            for position, part in enumerate(normalise(word)):
                texts.append(part)
                onsets.append(onset if position == 0 else float("nan"))
        return texts, onsets

    ref_words, ref_onsets = spread(reference)
    hyp_words, hyp_onsets = spread(hypothesis)
    out = []
    for i, j in align(ref_words, hyp_words).pairs:
        if ref_words[i] == hyp_words[j] and ref_onsets[i] == ref_onsets[i] and hyp_onsets[j] == hyp_onsets[j]:
            out.append(abs(hyp_onsets[j] - ref_onsets[i]))
    return out
