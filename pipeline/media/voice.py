"""Synthetic speech for samples and tests, offline: espeak-ng from the ``espeakng-loader`` wheel (the library and
its voices, no system package), driven through its C API.

A generated sample speaks known sentences at known times, so the demo has something to transcribe and tests can
check segment times against the speech's real edges.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ConfigError
from pipeline.media.extract import SAMPLE_RATE

SENTENCES = (
    "Welcome to the omniq demonstration.",
    "This sample was spoken by a speech synthesizer.",
    "Every utterance gets its own subtitle.",
    "The quick brown fox jumps over the lazy dog.",
    "Pictures and sound are described as well.",
    "Search finds the sentence you are looking for.",
    "Silence between sentences is not transcribed.",
    "Thank you for watching.",
)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE = 1  # espeakRATE: words per minute
_EVENT_END_OF_LIST, _EVENT_WORD = 0, 1
_lock = threading.Lock()  # the library has one global state
_engine: list[tuple[ctypes.CDLL, int]] = []


@dataclass
class SpeechTrack:
    """A soundtrack of spoken sentences: 16 kHz mono int16 ``samples``, each sentence's speech ``spans`` and
    ``words``: each word's text and the time espeak-ng started speaking it (seconds in the track)."""

    samples: np.ndarray
    spans: list[tuple[float, float]]
    texts: list[str]
    words: list[list[tuple[str, float]]] = field(default_factory=list)


@dataclass
class Spoken:
    """One synthesised text: 16 kHz mono int16 ``samples`` and its words with their onsets (seconds)."""

    samples: np.ndarray
    words: list[tuple[str, float]]


class _Event(ctypes.Structure):
    """espeak_EVENT (speak_lib.h): what the synthesizer reached, and where in its audio."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds from the start of the synthesis
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


def _library() -> tuple[ctypes.CDLL, int]:
    if not _engine:
        try:
            import espeakng_loader
        except ImportError as error:  # pragma: no cover - a dependency of omniq
            raise ConfigError("speech synthesis needs espeakng-loader: pip install espeakng-loader") from error
        library = ctypes.CDLL(espeakng_loader.get_library_path())
        library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        library.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        rate = library.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise ConfigError("espeak-ng could not start (espeakng-loader's data directory is missing?)")
        _engine.append((library, rate))
    return _engine[0]


def synthesize(text: str, voice: str = "en", words_per_minute: int = 170) -> np.ndarray:
    """``text`` spoken by espeak-ng, as 16 kHz mono int16 samples (trimmed to the speech)."""
    return speak(text, voice, words_per_minute).samples


def speak(text: str, voice: str = "en", words_per_minute: int = 170) -> Spoken:
    """``text`` spoken by espeak-ng (trimmed to the speech), with the onset of each of its words as espeak-ng
    reports it (its word events): the reference that word timestamps are measured against."""
    pieces: list[np.ndarray] = []
    events: list[tuple[int, int, int]] = []  # text position (1-based), length, audio position (ms)

    def collect(wav: ctypes.POINTER(ctypes.c_short), count: int, event: ctypes.POINTER(_Event)) -> int:  # type: ignore[valid-type]
        if count > 0 and wav:
            pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        position = 0
        while event and event[position].type != _EVENT_END_OF_LIST:
            if event[position].type == _EVENT_WORD:
                events.append((event[position].text_position, event[position].length, event[position].audio_position))
            position += 1
        return 0

    callback = _Callback(collect)
    data = text.encode()
    with _lock:
        library, rate = _library()
        library.espeak_SetSynthCallback(callback)
        if library.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ConfigError(f"espeak-ng has no voice {voice!r}")
        library.espeak_SetParameter(_RATE, words_per_minute, 0)
        library.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        library.espeak_Synchronize()
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, dtype=np.float32)
    resampled = np.interp(
        np.arange(0, len(audio) / rate, 1 / SAMPLE_RATE), np.arange(len(audio)) / rate, audio
    )  # 22.05 kHz to 16 kHz
    samples = resampled.astype(np.int16)
    first, last = _loud_range(samples)
    characters = text.encode()  # espeak counts characters of the UTF-8 text; positions are 1-based
    words = []
    for position, length, millis in events:
        word = characters[position - 1 : position - 1 + length].decode(errors="ignore").strip()
        if word:
            words.append((word, round(max(0.0, millis / 1000 - first / SAMPLE_RATE), 3)))
    return Spoken(samples[first:last], words)


def _loud_range(samples: np.ndarray) -> tuple[int, int]:
    """Where the speech is: the quiet before and after it is cut, so its edges are where the sound is."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 0.02 * max(1, int(np.abs(samples).max())))
    return (int(loud[0]), int(loud[-1]) + 1) if loud.size else (0, 0)


def speech_track(
    texts: Sequence[str],
    starts: Sequence[float],
    duration: float,
    voice: str = "en",
    longest: float | None = None,
    words_per_minute: int = 170,
) -> SpeechTrack:
    """Sentences spoken at the given start times in ``duration`` seconds of otherwise silent audio.

    A sentence longer than ``longest`` seconds is spoken faster until it fits (and cut if it still does not).
    """
    samples = np.zeros(int(duration * SAMPLE_RATE), dtype=np.int16)
    spans, words = [], []
    for text, start in zip(texts, starts, strict=True):
        spoken = speak(text, voice, words_per_minute)
        for faster in (220, 280, 360, 450):
            if longest is None or len(spoken.samples) <= longest * SAMPLE_RATE:
                break
            spoken = speak(text, voice, faster)
        speech = spoken.samples
        if longest is not None:
            speech = speech[: int(longest * SAMPLE_RATE)]
        first = round(start * SAMPLE_RATE)
        speech = speech[: max(0, len(samples) - first)]
        if not speech.size:
            continue
        samples[first : first + len(speech)] = speech
        begin, end = first / SAMPLE_RATE, (first + len(speech)) / SAMPLE_RATE
        spans.append((begin, end))
        words.append([(word, round(begin + onset, 3)) for word, onset in spoken.words if begin + onset < end])
    return SpeechTrack(samples, spans, list(texts)[: len(spans)], words)
