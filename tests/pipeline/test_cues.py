"""The subtitle cue builder: every cue within the rules, whatever the text and timing."""

from __future__ import annotations

import random

import pytest

from pipeline.results.cues import (
    GAP_SECONDS,
    LINGER_SECONDS,
    MAX_CPS,
    MAX_LINE,
    MAX_LINES,
    MAX_SECONDS,
    MIN_SECONDS,
    Cue,
    TimedText,
    build_cues,
    units_of,
)

WORDS = "the a speech model writes what people say in every file of a large media library quickly".split()


def check_rules(cues: list[Cue], segments: list[TimedText]) -> None:
    """Assert the rules that hold for any input whose utterances leave room (see the module's docstring)."""
    for cue in cues:
        assert 1 <= len(cue.lines) <= MAX_LINES, cue
        assert all(0 < len(line) <= MAX_LINE for line in cue.lines), cue
        assert all(line == line.strip() for line in cue.lines), cue
        assert cue.end - cue.start <= MAX_SECONDS + 1e-6, cue
    for before, after in zip(cues, cues[1:], strict=False):
        assert after.start - before.end >= GAP_SECONDS - 1e-6, (before, after)
    # every word of the text is in the cues, in order, and no word is broken (words fit on a line here)
    spoken = " ".join(s.text for s in sorted(segments, key=lambda s: s.start)).split()
    assert " ".join(cue.text.replace("\n", " ") for cue in cues).split() == spoken


def test_a_long_utterance_becomes_cues_of_two_balanced_lines_broken_after_punctuation():
    text = (
        "So this is the first sentence of the talk, and it goes on for quite a while. "
        "Then a second one follows right after it, and a third one closes the thought."
    )
    segment = TimedText(1.0, 9.0, text)
    cues = build_cues([segment])
    check_rules(cues, [segment])
    assert len(cues) == 2
    assert cues[0].lines[-1].endswith("while.")  # the cue ends with the sentence
    assert cues[0].lines[0].endswith("talk,")  # its lines break after the comma
    # times inside the utterance are shared out by characters; the edges are the utterance's
    assert cues[0].start == 1.0 and abs(cues[-1].end - 9.0) < 1e-6
    share = (cues[0].characters + 1) / (cues[0].characters + cues[1].characters + 1)
    assert abs((cues[0].end - 1.0) / 8.0 - share) < 0.05


def test_short_cues_last_at_least_five_sixths_of_a_second_and_can_be_read():
    segments = [TimedText(1.0, 1.3, "Yes."), TimedText(4.0, 5.0, "That is a much longer answer to read.")]
    cues = build_cues(segments)
    check_rules(cues, segments)
    assert cues[0].end - cues[0].start >= MIN_SECONDS - 1e-3  # times are written to the millisecond
    # 37 characters need 1.85 s at 20 cps: the cue runs into the silence after the speech, by at most 0.5 s
    assert cues[1].end == pytest.approx(5.0 + LINGER_SECONDS)
    assert cues[1].start == 4.0


def test_reading_speed_is_kept_where_the_silence_allows_but_never_into_the_next_cue():
    segments = [TimedText(0.0, 1.0, "A fairly long sentence spoken very fast."), TimedText(1.3, 3.5, "Next one.")]
    cues = build_cues(segments)
    check_rules(cues, segments)
    assert cues[0].end <= cues[1].start - GAP_SECONDS + 1e-6
    assert cues[1].start >= 1.3 - 1e-6  # the next cue keeps its speech's start


def test_a_word_longer_than_a_line_is_cut_into_line_sized_pieces():
    word = "https://example.com/" + "x" * 80
    cues = build_cues([TimedText(0.0, 4.0, f"see {word} now")])
    lines = [line for cue in cues for line in cue.lines]
    assert all(len(line) <= MAX_LINE for line in lines)
    assert "".join(lines).replace(" ", "") == f"see{word}now"


def test_words_are_never_broken_inside():
    text = "internationalisation characteristically overcomplicates straightforward responsibilities"
    cues = build_cues([TimedText(0.0, 5.0, text)])
    assert [w for cue in cues for line in cue.lines for w in line.split()] == text.split()


def test_scripts_without_spaces_break_between_characters_and_keep_punctuation_attached():
    text = "我们今天去公园散步。然后回家吃晚饭，晚上一起看电影好不好？我觉得这是一个非常好的主意，大家都同意吗？"
    assert [u.text for u in units_of("我们。你好")] == ["我", "们。", "你", "好"]
    cues = build_cues([TimedText(0.0, 6.0, text)])
    assert "".join("".join(cue.lines) for cue in cues) == text
    for cue in cues:
        assert all(len(line) <= MAX_LINE for line in cue.lines)
        assert not any(line[0] in "。，？" for line in cue.lines)  # punctuation never starts a line


def test_text_too_long_for_its_span_is_still_shown_whole():
    text = " ".join(WORDS * 3)
    segments = [TimedText(0.0, 2.0, text), TimedText(2.4, 3.0, "Next.")]
    cues = build_cues(segments)
    check_rules(cues, segments)
    assert all(cue.end <= 2.4 - GAP_SECONDS + 1e-6 for cue in cues[:-1])  # it cannot borrow the next speech


def test_a_long_pause_never_falls_inside_a_cue():
    segments = [TimedText(0.0, 1.5, "Before the pause."), TimedText(4.0, 5.5, "After the pause.")]
    cues = build_cues(segments)
    assert len(cues) == 2 and cues[0].end <= 1.5 + LINGER_SECONDS + 1e-6 and cues[1].start >= 4.0 - 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_random_transcripts_keep_every_rule(seed):
    rng = random.Random(seed)
    segments, position = [], 0.0
    for _ in range(rng.randint(1, 12)):
        position += rng.uniform(0.35, 3.0)
        length = rng.uniform(1.0, 10.0)
        words = [rng.choice(WORDS) for _ in range(max(1, int(length * rng.uniform(1.5, 3.0))))]
        segments.append(TimedText(round(position, 3), round(position + length, 3), " ".join(words) + "."))
        position += length
    cues = build_cues(segments)
    check_rules(cues, segments)
    for cue in cues:
        speech = [s for s in segments if s.start < cue.end and cue.start < s.end + LINGER_SECONDS]
        assert speech, cue  # every cue shows while its words are spoken (or just after)
        if cue.characters / (cue.end - cue.start) > MAX_CPS + 1e-6:
            # too fast only where the audio leaves no room: the next cue (or the end of the linger) is in the way
            later = [c for c in cues if c.start > cue.start]
            assert (later and later[0].start - GAP_SECONDS - cue.end < 1e-3) or any(
                abs(cue.end - (s.end + LINGER_SECONDS)) < 1e-3 or s.end > cue.end for s in speech
            ), cue
