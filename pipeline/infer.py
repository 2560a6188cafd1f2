"""The model steps of a job: read chunk packs back, transcribe / caption / summarise them, summarise the file.

Chunks are fetched and decoded by a few threads at once, and as many chunks as a :class:`ChunkBudget` allows
are held decoded at a time (all-or-nothing per call, so callers never deadlock over it). With a
:class:`~pipeline.engines.pipelined.PipelinedEngine`, several callers (messages, files) run these functions at
once and their rows share ``generate`` calls.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline import languages, prompts
from pipeline.config import Settings
from pipeline.engines import whisper
from pipeline.engines.base import Engine, GenerationRequest
from pipeline.errors import ConfigError, ModelError
from pipeline.media import extract, pack, speech
from pipeline.media.plan import Chunk
from pipeline.results.assemble import ChunkResult
from pipeline.spec import JobPlan, chunk_prefix, get_json, language_key, pack_key, put_json, work_prefix
from pipeline.storage import Storage

log = logging.getLogger(__name__)
LOAD_THREADS = 4  # chunk packs fetched and decoded at once by one call
Row = tuple[int, str, GenerationRequest, tuple[float, float] | None]  # chunk, kind, request, utterance span


class ChunkBudget:
    """How many chunks may be held decoded at once in this process (across all callers).

    A chunk's place is taken before it is fetched and given back once its rows are prepared (their model inputs
    now hold the data), so the next chunks are fetched while the model works: decoded chunks in memory are at
    most this budget plus the rows of the batches prepared or generating.
    """

    def __init__(self, chunks: int) -> None:
        self.total = max(1, chunks)
        self._free = self.total
        self._condition = threading.Condition()

    def hold(self, chunks: int) -> Hold:
        """Take ``chunks`` places (at most the whole budget), waiting for them all at once."""
        wanted = min(max(chunks, 0), self.total)
        with self._condition:
            self._condition.wait_for(lambda: self._free >= wanted)
            self._free -= wanted
        return Hold(self, wanted)

    @contextmanager
    def reserve(self, chunks: int) -> Iterator[Hold]:
        """Hold ``chunks`` places while the block runs (or until the hold is released early)."""
        held = self.hold(chunks)
        try:
            yield held
        finally:
            held.release()

    def _give_back(self, chunks: int) -> None:
        with self._condition:
            self._free += chunks
            self._condition.notify_all()


class Hold:
    """Places taken from a :class:`ChunkBudget`; :meth:`release` gives them back once (later calls do nothing)."""

    def __init__(self, budget: ChunkBudget | None, chunks: int) -> None:
        self._budget, self._chunks, self._lock = budget, chunks, threading.Lock()

    def release(self) -> None:
        with self._lock:
            budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self._chunks)


@dataclass
class ChunkMedia:
    chunk: Chunk
    frames: np.ndarray | None  # uint8 (T, H, W, 3)
    audio: np.ndarray | None  # float32 at 16 kHz, from ``chunk.media_start``
    utterances: list[tuple[float, float]]  # the speech in this chunk (file times), one transcript row each
    seconds: float = 0.0  # fetching and decoding it

    def clip(self, start: float, end: float) -> np.ndarray:
        """The audio of ``[start, end]`` (file times)."""
        assert self.audio is not None
        first = max(0, round((start - self.chunk.media_start) * extract.SAMPLE_RATE))
        return self.audio[first : max(first, round((end - self.chunk.media_start) * extract.SAMPLE_RATE))]


def load_chunk_media(storage: Storage, job_plan: JobPlan, index: int, settings: Settings) -> ChunkMedia:
    """Read one chunk's pack back from storage (one GET) and decode it into arrays for the engine."""
    started = time.perf_counter()
    chunk = job_plan.chunks[index]
    key = pack_key(job_plan.spec.job_id, index)
    contents = pack.unpack_chunk(storage.get_bytes(key), storage.uri(key))
    frames = None
    if contents.frames:
        images = []
        for data in contents.frames:
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(image.convert("RGB")))
        if len(images) == 1:  # the video processor groups frames in pairs; one frame stands for two
            images.append(images[0])
        frames = np.stack(images)
    audio = None
    utterances: list[tuple[float, float]] = []
    if contents.audio is not None and contents.audio.size:
        audio = contents.audio.astype(np.float32) / 32768.0
        if job_plan.speech is not None:
            utterances = speech.within([(a, b) for a, b in job_plan.speech], chunk.start, chunk.end)
        else:  # planned before speech detection (a job from an older version): the chunk, unless quiet
            quiet = extract.detect_silences(contents.audio, settings.silence_noise_db, settings.silence_min_seconds)
            if sum(end - start for start, end in quiet) < 0.98 * (audio.size / extract.SAMPLE_RATE) - 0.05:
                utterances = [(chunk.start, chunk.end)]
    return ChunkMedia(chunk, frames, audio, utterances, time.perf_counter() - started)


LANGUAGE_PROBE_SECONDS = 10.0  # how much of a file's first speech the language question hears


def file_language(
    job_plan: JobPlan, engine: Engine, storage: Storage, settings: Settings, loaded: Sequence[ChunkMedia] = ()
) -> str | None:
    """The file's language (ISO 639-1): the configured one, or the one detected once from its first speech
    (stored at ``work/<job>/language.json``, so later units and finalize reuse it); None without speech or
    when the model's answer names no language."""
    if settings.language:
        return settings.language
    key = language_key(job_plan.spec.job_id)
    if storage.exists(key):
        return get_json(storage, key).get("language")
    if settings.transcriber_name == "whisper" and whisper.english_only(settings.whisper_model):
        # an English-only model hears English in everything: say so rather than guess
        put_json(storage, key, {"language": "en", "by": f"{settings.whisper_model} (English only)"})
        return "en"
    # the first speech, as the chunks hold it (a piece long enough to hear: an utterance may be cut by a boundary)
    pieces = (
        (chunk, start, end)
        for utterance in job_plan.speech or []
        for chunk in job_plan.chunks
        for start, end in speech.within([(utterance[0], utterance[1])], chunk.start, chunk.end)
        if end - start >= 0.2
    )
    first = next(pieces, None)
    if first is None:
        return None
    chunk, start, end = first
    media = next((m for m in loaded if m.chunk.index == chunk.index), None)
    if media is None:
        media = load_chunk_media(storage, job_plan, chunk.index, settings)
    if media.audio is None:
        return None
    heard = media.clip(start, min(end, start + LANGUAGE_PROBE_SECONDS))
    if settings.transcriber_name == "whisper":
        asr = whisper_for(settings)
        found, probability = asr.submit(asr.detect_language, heard).result()
        code = languages.code_of(found)
        record = {"language": code, "by": f"whisper {settings.whisper_model}", "probability": probability}
        put_json(storage, key, record | {"heard": [start, end]})
        return code
    answer = engine.generate([prompts.language_request(heard)])[0]
    code = languages.parse_answer(answer.text)
    put_json(storage, key, {"language": code, "answer": answer.text.strip(), "heard": [start, end]})
    return code


def whisper_for(settings: Settings) -> whisper.WhisperTranscriber:
    """This process's Whisper for the job's settings (loaded once, on first use)."""
    return whisper.transcriber(settings.whisper_model, settings.device, settings.whisper_compute_type)


def _align_rows(
    asr: whisper.WhisperTranscriber, media: Sequence[ChunkMedia], language: str, results: dict[int, ChunkResult]
) -> None:
    """Word times for Qwen3-Omni's transcript segments, by forced alignment (in Whisper's thread)."""
    for item in media:
        result = results[item.chunk.index]
        if item.audio is None or not result.segments:
            continue
        started = time.perf_counter()
        spans = [(s["start"], s["end"], s["text"]) for s in result.segments]
        for segment, words in zip(
            result.segments, asr.align(item.audio, item.chunk.media_start, spans, language), strict=True
        ):
            segment["words"] = [w.to_dict() for w in words]
        result.asr_seconds += time.perf_counter() - started


def _whisper_rows(
    asr: whisper.WhisperTranscriber, media: Sequence[ChunkMedia], language: str | None, results: dict[int, ChunkResult]
) -> None:
    """Whisper's transcript of each chunk's utterances into ``results`` (in Whisper's thread)."""
    for item in media:
        if not item.utterances or item.audio is None:
            continue
        started = time.perf_counter()
        heard = asr.transcribe(item.audio, item.chunk.media_start, item.utterances, language)
        result = results[item.chunk.index]
        result.asr_seconds += time.perf_counter() - started
        result.segments = [
            {"start": h.start, "end": h.end, "text": h.text, "words": [w.to_dict() for w in h.words]} for h in heard
        ]
        result.transcript = " ".join(h.text for h in heard if h.text)


def infer_chunks(
    job_plan: JobPlan,
    indices: list[int],
    engine: Engine,
    storage: Storage,
    settings: Settings,
    budget: ChunkBudget | None = None,
) -> list[ChunkResult]:
    """Transcribe, caption and summarise the given chunks in batched ``generate`` calls.

    A chunk whose result is already stored is not run again (redelivered tasks cost nothing). Its result is
    stored before this returns: a queue message is acknowledged only after that.
    """
    job_id = job_plan.spec.job_id
    done: dict[int, ChunkResult] = {}
    todo: list[int] = []
    for index in indices:
        key = f"{chunk_prefix(job_id, index)}/result.json"
        if storage.exists(key):
            done[index] = ChunkResult.from_dict(get_json(storage, key))
        else:
            todo.append(index)
    step = budget.total if budget else len(todo)  # never hold more decoded chunks than the budget
    for first in range(0, len(todo), step):
        done.update(_infer_group(job_plan, todo[first : first + step], engine, storage, settings, budget))
    return [done[index] for index in indices]


def _infer_group(
    job_plan: JobPlan,
    todo: list[int],
    engine: Engine,
    storage: Storage,
    settings: Settings,
    budget: ChunkBudget | None,
) -> dict[int, ChunkResult]:
    with budget.reserve(len(todo)) if budget else _nothing() as held:
        with ThreadPoolExecutor(min(len(todo), LOAD_THREADS), thread_name_prefix="omniq-load") as loaders:
            media = list(loaders.map(lambda index: load_chunk_media(storage, job_plan, index, settings), todo))
        results = {m.chunk.index: ChunkResult(m.chunk.index, m.chunk.start, m.chunk.end) for m in media}
        for item in media:
            results[item.chunk.index].prepare_seconds += item.seconds
        speaks = any(m.utterances for m in media)
        language = file_language(job_plan, engine, storage, settings, media) if speaks else None
        requests: list[Row] = []
        heard: Future[None] | None = None
        if settings.transcriber_name == "whisper" and speaks:  # Whisper writes the transcript, beside the model
            asr = whisper_for(settings)
            heard = asr.submit(_whisper_rows, asr, media, language, results)
        for item in media:
            for start, end in item.utterances if heard is None else ():  # one row per utterance: its speech's times
                tokens = prompts.transcript_tokens(end - start, settings.transcript_max_new_tokens)
                request = prompts.transcript_request(item.clip(start, end), language, tokens)
                requests.append((item.chunk.index, prompts.TRANSCRIPT, request, (start, end)))
            if item.frames is not None or item.audio is not None:
                request = prompts.caption_request(
                    item.frames, job_plan.fps, item.audio, settings.caption_max_new_tokens
                )
                requests.append((item.chunk.index, prompts.CAPTION, request, None))
        streams = {m.chunk.index: (m.frames is not None, m.audio is not None) for m in media}
        try:
            _run(engine, requests, results, streams, prepared=held.release)
        finally:
            if heard is not None:
                heard.result()  # Whisper's rows (an error there fails the unit like a model error)
        if heard is None and speaks and settings.align_words and whisper.can_align(settings.whisper_model, language):
            try:
                asr = whisper_for(settings)
                asr.submit(_align_rows, asr, media, language, results).result()
            except (ConfigError, ModelError, RuntimeError) as error:  # word times are extra: the text stands
                log.warning(
                    "word alignment with whisper %s failed; utterance times only: %s", settings.whisper_model, error
                )
        del media, requests  # the decoded frames and audio go before the text-only summaries
    summaries: list[Row] = [
        (
            index,
            prompts.CHUNK_SUMMARY,
            prompts.chunk_summary_request(
                r.start, r.end, r.transcript, r.visual, r.audio, settings.summary_max_new_tokens
            ),
            None,
        )
        for index, r in results.items()
    ]
    _run(engine, summaries, results, streams)
    for index, result in results.items():
        # checked absent above: one PUT, no compare-first (3 requests per chunk in all, with the pack's GET)
        put_json(
            storage, f"{chunk_prefix(job_plan.spec.job_id, index)}/result.json", result.to_dict(), if_changed=False
        )
    return results


def infer_file(
    job_plan: JobPlan, engine: Engine, storage: Storage, settings: Settings, budget: ChunkBudget | None = None
) -> None:
    """Every chunk of a file, in groups of ``batch_size``; with a pipelined engine two groups run at once, so
    one group's chunks are fetched and decoded while the other's generate."""
    from pipeline.engines.pipelined import PipelinedEngine

    indices = [c.index for c in job_plan.chunks]
    size = settings.batch_size
    groups = [indices[first : first + size] for first in range(0, len(indices), size)]
    if isinstance(engine, PipelinedEngine) and len(groups) > 1:
        file_language(job_plan, engine, storage, settings)  # once, before two groups could ask at the same time
        with ThreadPoolExecutor(2, thread_name_prefix="omniq-group") as runners:
            list(runners.map(lambda group: infer_chunks(job_plan, group, engine, storage, settings, budget), groups))
    else:
        for group in groups:
            infer_chunks(job_plan, group, engine, storage, settings, budget)


@contextmanager
def _nothing() -> Iterator[Hold]:
    yield Hold(None, 0)


def _run(
    engine: Engine,
    requests: list[Row],
    results: dict[int, ChunkResult],
    streams: dict[int, tuple[bool, bool]],
    prepared: Callable[[], None] | None = None,
) -> None:
    """Run ``requests`` and put the answers into ``results``; ``prepared`` is called once all of them have
    been turned into model inputs (a pipelined engine does that before generating; others when done)."""
    if not requests:
        return
    from pipeline.engines.pipelined import PipelinedEngine

    batch = [request for _, _, request, _ in requests]
    if isinstance(engine, PipelinedEngine):
        answers = engine.generate(batch, prepared=prepared)
    else:
        answers = engine.generate(batch)
    for (index, kind, _, span), answer in zip(requests, answers, strict=True):
        result = results[index]
        result.new_tokens += answer.new_tokens
        share = max(answer.batch_size, 1)
        result.model_seconds += answer.seconds / share
        result.prepare_seconds += answer.prepare_seconds / share
        if kind == prompts.TRANSCRIPT and span is not None:
            result.segments.append({"start": span[0], "end": span[1], "text": answer.text.strip()})
            result.transcript = " ".join(s["text"] for s in result.segments if s["text"])
        elif kind == prompts.CAPTION:
            result.visual, result.audio = prompts.parse_caption(answer.text, *streams[index])
        else:
            result.summary = answer.text.strip()


def summarize(job_plan: JobPlan, engine: Engine, storage: Storage, settings: Settings) -> dict[str, Any]:
    """The file summary from the chunk summaries; stored at ``work/<job>/summary.json``.

    A file of one chunk takes its chunk's summary as is: a second model call would only restate it.
    """
    key = f"{work_prefix(job_plan.spec.job_id)}/summary.json"
    if storage.exists(key):
        return get_json(storage, key)
    chunks = [
        ChunkResult.from_dict(get_json(storage, f"{chunk_prefix(job_plan.spec.job_id, c.index)}/result.json"))
        for c in job_plan.chunks
    ]
    if len(chunks) == 1:
        text, seconds = chunks[0].summary, 0.0
    else:
        request = prompts.file_summary_request(
            [(c.start, c.end, c.summary) for c in chunks], settings.summary_max_new_tokens
        )
        answer = engine.generate([request])[0]
        text, seconds = answer.text.strip(), answer.seconds / max(answer.batch_size, 1)
    document = {
        "summary": text,
        "model": engine.model_id,
        "random_weights": bool(engine.random_weights),
        "seconds": round(seconds, 3),
    }
    put_json(storage, key, document)
    return document
