"""Speech detection with Silero VAD on real (synthesised) speech, and the utterances cut from its spans."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.media import speech
from pipeline.media.extract import SAMPLE_RATE
from pipeline.media.plan import plan_chunks
from pipeline.media.speech import SpeechOptions, detect_speech, gaps_between, utterances, within
from pipeline.media.voice import SENTENCES, speech_track

EDGE = 0.15  # how close a detected edge must be to the real one


def close_to(found: list[tuple[float, float]], known: list[tuple[float, float]]) -> bool:
    return len(found) == len(known) and all(
        abs(a - c) <= EDGE and abs(b - d) <= EDGE for (a, b), (c, d) in zip(found, known, strict=True)
    )


def test_spoken_sentences_are_found_within_0_15_s_of_their_edges():
    starts = [0.7, 5.2, 7.9, 13.0]  # gaps of different lengths between them
    track = speech_track(SENTENCES[:4], starts, 18.0, longest=2.5)
    found = utterances(detect_speech(track.samples), track.samples, 18.0, SpeechOptions(pad_seconds=0.0))
    assert close_to(found, track.spans), (found, track.spans)


@pytest.mark.parametrize("kind", ["tone", "music", "noise", "silence"])
def test_sounds_that_are_not_speech_hold_no_speech(kind):
    t = np.arange(int(8.0 * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    if kind == "tone":
        signal = 0.5 * np.sin(2 * np.pi * 440 * t) * (np.mod(t, 2.0) < 1.5)
    elif kind == "music":  # chords on a beat: three notes each, changing every half second
        notes = [(262, 330, 392), (294, 370, 440), (330, 415, 494), (349, 440, 523)]
        chord = np.array([notes[int(x / 0.5) % 4] for x in t])
        signal = 0.2 * np.sin(2 * np.pi * chord * t[:, None]).sum(axis=1) * np.exp(-3 * np.mod(t, 0.5))
    elif kind == "noise":
        signal = 0.1 * rng.standard_normal(t.size)
    else:
        signal = np.zeros_like(t)
    samples = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
    assert detect_speech(samples) == []


def _sequential(samples):
    """Silero's own loop, one window at a time: what the batched blocks must match."""
    import torch
    from silero_vad import get_speech_timestamps

    found = get_speech_timestamps(
        torch.from_numpy(samples.astype(np.float32) / 32768), speech._vad_model(), sampling_rate=SAMPLE_RATE,
        min_speech_duration_ms=250, min_silence_duration_ms=100, speech_pad_ms=0,
    )  # fmt: skip
    return [(f["start"] / SAMPLE_RATE, f["end"] / SAMPLE_RATE) for f in found]


@pytest.mark.parametrize(("block", "group"), [(8.0, 600.0), (3.0, 600.0), (3.0, 6.0)])
def test_blocks_run_side_by_side_find_what_the_sequential_run_finds(monkeypatch, block, group):
    # blocks of 3 s cut inside sentences; groups of 6 s send them to the model two at a time
    track = speech_track(SENTENCES[:4], [0.2, 4.1, 9.0, 14.5], 20.0)
    monkeypatch.setattr(speech, "BLOCK_SECONDS", block)
    monkeypatch.setattr(speech, "GROUP_SECONDS", group)
    options = SpeechOptions()
    batched = utterances(detect_speech(track.samples), track.samples, 20.0, options)
    sequential = utterances(_sequential(track.samples), track.samples, 20.0, options)
    # what the transcript is made of: the same utterances, edges within one or two 32 ms windows (a pause right
    # at a block's start may be cut where the sequential run's probability stayed just above the threshold;
    # utterances merge such short pauses)
    assert len(batched) == len(sequential) == 4
    for (a, b), (c, d) in zip(batched, sequential, strict=True):
        assert abs(a - c) <= 0.07 and abs(b - d) <= 0.07


def test_close_spans_merge_and_long_runs_split_at_their_quietest_point():
    samples = np.full(30 * SAMPLE_RATE, 8000, dtype=np.int16)
    samples[int(13.0 * SAMPLE_RATE) : int(13.1 * SAMPLE_RATE)] = 0  # a breath inside a long run
    spans = [(1.0, 5.0), (5.2, 24.0), (26.0, 27.0)]
    found = utterances(spans, samples, 30.0, SpeechOptions(pad_seconds=0.05))
    assert found[0][0] == pytest.approx(0.95)  # padded at the start of speech
    assert any(abs(end - 13.05) < 0.05 for _, end in found)  # split at the quiet 100 ms
    assert all(end - start <= 10.0 + 0.05 + 1e-6 for start, end in found)
    assert found[-1] == pytest.approx((25.95, 27.05))
    assert all(b[0] >= a[1] for a, b in zip(found, found[1:], strict=False))  # never overlapping
    # the pieces of one run are back to back: no speech is lost between them
    run = [span for span in found if span[1] <= 24.1]
    assert all(b[0] == pytest.approx(a[1]) for a, b in zip(run, run[1:], strict=False))


def test_padding_never_reaches_into_the_neighbour_or_beyond_the_file():
    samples = np.zeros(10 * SAMPLE_RATE, dtype=np.int16)
    found = utterances([(0.02, 2.0), (2.35, 9.98)], samples, 10.0, SpeechOptions(pad_seconds=0.2))
    assert found[0][0] == 0.0 and found[-1][1] == 10.0
    assert found[0][1] <= found[1][0]


def test_chunk_boundaries_go_into_the_gaps_between_utterances():
    spans = [(0.5, 9.0), (9.8, 18.4), (19.6, 31.5), (32.4, 44.0)]
    chunks = plan_chunks(44.0, 10.0, gaps_between(spans, 44.0), search_seconds=3.0)
    for chunk in chunks[1:]:
        assert not any(start < chunk.start < end for start, end in spans), chunk
    # and an utterance a boundary had to cut (no gap near) is cut at the boundary, not lost
    assert within([(8.0, 12.0)], 0.0, 10.0) == [(8.0, 10.0)] and within([(8.0, 12.0)], 10.0, 20.0) == [(10.0, 12.0)]
