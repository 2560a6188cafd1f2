"""Where people speak: Silero VAD over a file's soundtrack, once at ingest, and the utterances cut from it.

The spans are what the transcript's times are made of (Qwen3-Omni gives no timestamps): each utterance is
transcribed on its own, and its segment starts and ends with its speech. Chunk boundaries go into the gaps
between speech. Music, tones, noise and silence hold no speech, so they are not transcribed.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.media.extract import SAMPLE_RATE

if TYPE_CHECKING:
    from pipeline.config import Settings

Span = tuple[float, float]

# Silero runs window by window (32 ms) with a state carried from one to the next; one window at a time from
# Python was 90x real time on one core, more than the ffmpeg pass itself. The soundtrack is cut into blocks that
# run side by side as one batch, each started a second early so that its state has settled by its own first
# window (the probabilities match the sequential run's within one window at the edges): about 5x faster.
BLOCK_SECONDS = 8.0  # one row of the batch
WARM_WINDOWS = 32  # windows each block hears before its own (1 s): the state the sequential run would have
GROUP_SECONDS = 600.0  # blocks of this much audio go to the model at a time: memory stays flat for long files
_WINDOW = 512  # Silero's window at 16 kHz (32 ms)
_model_lock = threading.Lock()


@dataclass(frozen=True)
class SpeechOptions:
    """How speech spans become utterances (``OMNIQ_VAD_THRESHOLD``, ``OMNIQ_UTTERANCE_*``: :meth:`from_settings`)."""

    threshold: float = 0.5  # Silero's speech probability threshold
    min_speech_seconds: float = 0.25  # shorter bursts are not speech
    min_silence_seconds: float = 0.1  # a pause must last this long to end a span
    merge_seconds: float = 0.3  # spans closer than this are one utterance
    max_utterance_seconds: float = 10.0  # longer runs are split at their quietest point
    pad_seconds: float = 0.05  # an utterance's audio and times reach this far beyond its speech

    @classmethod
    def from_settings(cls, settings: Settings) -> SpeechOptions:
        return cls(
            threshold=settings.vad_threshold,
            merge_seconds=settings.utterance_merge_seconds,
            max_utterance_seconds=settings.utterance_max_seconds,
        )


def speech_probabilities(samples: np.ndarray) -> np.ndarray:
    """Silero's speech probability for each 32 ms window of 16 kHz mono int16 ``samples``, blocks batched."""
    count = -(-len(samples) // _WINDOW)
    blocks = -(-count // _block_windows())
    group = max(1, int(GROUP_SECONDS / BLOCK_SECONDS))  # blocks per model run
    parts = [block_probabilities(samples, range(b, min(b + group, blocks))) for b in range(0, blocks, group)]
    return np.concatenate(parts)[:count] if parts else np.zeros(0, dtype=np.float32)


def _block_windows() -> int:
    return int(BLOCK_SECONDS * SAMPLE_RATE) // _WINDOW


def block_probabilities(samples: np.ndarray, blocks: range) -> np.ndarray:
    """The probabilities of the windows of ``blocks`` (consecutive), run side by side as one batch. A block
    needs only its own samples and the warm-up before them, so the result does not depend on how blocks are
    grouped."""
    import torch

    block = _block_windows()
    steps = WARM_WINDOWS + block
    batch = np.zeros((len(blocks), steps, _WINDOW), dtype=np.float32)
    for row, number in enumerate(blocks):  # each row: its warm-up windows, then its own
        first = max(0, (number * block - WARM_WINDOWS) * _WINDOW)
        last = min(len(samples), (number + 1) * block * _WINDOW)
        piece = np.asarray(samples[first:last], dtype=np.float32) / 32768.0
        offset = WARM_WINDOWS * _WINDOW - (number * block * _WINDOW - first)  # zeros before the file's start
        batch[row].reshape(-1)[offset : offset + len(piece)] = piece
    with _model_lock, torch.no_grad():  # the model keeps state between windows: one user at a time per process
        model = _vad_model()
        model.reset_states()
        rows = torch.from_numpy(batch)
        out = np.stack([model(rows[:, step], SAMPLE_RATE).numpy()[:, 0] for step in range(steps)], 1)
    return out[:, WARM_WINDOWS:].reshape(-1)


def detect_speech(samples: np.ndarray, options: SpeechOptions | None = None) -> list[Span]:
    """Speech spans (seconds) in 16 kHz mono int16 ``samples``, by Silero VAD (its own rules on its
    probabilities: threshold with hysteresis, shortest speech, shortest pause)."""
    from silero_vad import get_speech_timestamps_from_probs

    options = options or SpeechOptions()
    if len(samples) < _WINDOW:
        return []
    found = get_speech_timestamps_from_probs(
        [float(p) for p in speech_probabilities(samples)],
        sampling_rate=SAMPLE_RATE,
        threshold=options.threshold,
        min_speech_duration_ms=int(options.min_speech_seconds * 1000),
        min_silence_duration_ms=int(options.min_silence_seconds * 1000),
        speech_pad_ms=0,
        audio_length_samples=len(samples),
    )
    return [(round(span["start"] / SAMPLE_RATE, 3), round(span["end"] / SAMPLE_RATE, 3)) for span in found]


@cache
def _vad_model() -> Any:
    """Silero's model, loaded once per process from the wheel's weights."""
    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # silero-vad's loader uses APIs its dependencies deprecate; nothing to do
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return load_silero_vad(onnx=False)


def gaps_between(spans: Sequence[Span], duration: float) -> list[Span]:
    """The stretches without speech in ``[0, duration]`` (where chunk boundaries may go)."""
    gaps, position = [], 0.0
    for start, end in spans:
        if start > position:
            gaps.append((position, start))
        position = max(position, end)
    if duration > position:
        gaps.append((position, duration))
    return gaps


def utterances(spans: Sequence[Span], samples: np.ndarray, duration: float, options: SpeechOptions) -> list[Span]:
    """Speech spans as utterances: spans closer than ``merge_seconds`` joined, runs longer than
    ``max_utterance_seconds`` split at their quietest point, each padded by ``pad_seconds`` (never into
    its neighbour, never beyond the file)."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start - merged[-1][1] < options.merge_seconds:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    pieces: list[tuple[float, float, bool, bool]] = []  # start, end, padded at the start, at the end
    for start, end in merged:
        first = True
        while end - start > options.max_utterance_seconds:
            cut = _quietest(samples, start, end, options.max_utterance_seconds)
            pieces.append((start, cut, first, False))
            start, first = cut, False
        pieces.append((start, end, first, True))
    out: list[Span] = []
    for position, (start, end, pad_start, pad_end) in enumerate(pieces):
        if pad_start:
            floor = out[-1][1] if out else 0.0
            start = max(start - options.pad_seconds, floor)
        if pad_end:
            ceiling = pieces[position + 1][0] if position + 1 < len(pieces) else duration
            end = min(end + options.pad_seconds, ceiling)
        out.append((round(start, 3), round(end, 3)))
    return out


def _quietest(samples: np.ndarray, start: float, end: float, longest: float) -> float:
    """The quietest 20 ms of ``[start, end]`` that leaves a first piece of 1 s .. ``longest`` seconds (and,
    when the rest would fit in one piece, a rest no longer than ``longest``)."""
    low = start + 1.0 if end - start > 2 * longest else max(start + 1.0, end - longest)
    high = min(start + longest, end - 1.0)
    if high <= low:
        return round(start + min(longest, (end - start) / 2), 3)
    window = int(0.02 * SAMPLE_RATE)
    first, last = int(low * SAMPLE_RATE), int(high * SAMPLE_RATE)
    region = np.asarray(samples[first:last], dtype=np.float32)
    count = len(region) // window
    if count == 0:
        return round((low + high) / 2, 3)
    energy = (region[: count * window].reshape(count, window) ** 2).mean(axis=1)
    quietest = int(np.argmin(energy))
    return round((first + quietest * window + window // 2) / SAMPLE_RATE, 3)


def within(spans: Sequence[Span], start: float, end: float) -> list[Span]:
    """The parts of ``spans`` inside ``[start, end)`` (a span cut by a chunk boundary is cut there too)."""
    out = []
    for a, b in spans:
        a, b = max(a, start), min(b, end)
        if b - a > 0.05:
            out.append((a, b))
    return out
