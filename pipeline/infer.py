"""The model steps of a job: read chunk packs back, transcribe / caption / summarise them, summarise the file.

Chunks are fetched and decoded by a few threads at once, and as many chunks as a :class:`ChunkBudget` allows
are held decoded at a time (all-or-nothing per call, so callers never deadlock over it). With a concurrent engine
(:class:`~pipeline.engines.base.ConcurrentEngine`: the pipelined transformers engine, or vLLM), several callers
(messages, files) run these functions at once and their rows share the model's batches.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline import deadlines, failpoints, languages, prompts
from pipeline.config import Settings
from pipeline.engines import whisper
from pipeline.engines.base import ConcurrentEngine, Engine, GenerationRequest, GenerationResult
from pipeline.errors import ConfigError, ModelError, RowFailed, TransientError, error_text
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
            utterances = chunk_utterances(job_plan, chunk)
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


def _whisper_watch(
    settings: Settings, what: str, item: ChunkMedia, owner: deadlines.Owner | None
) -> AbstractContextManager[deadlines.Deadline]:
    """A Whisper call's deadline: the floor plus its chunk's audio (README "Deadlines")."""
    audio = len(item.audio) / extract.SAMPLE_RATE if item.audio is not None else 0.0
    seconds = deadlines.model_seconds(settings, audio, 0)
    return deadlines.watch(
        f"whisper {what} of chunk {item.chunk.index}", seconds, deadlines.MODEL, (owner,) if owner else ()
    )


def _align_rows(
    asr: whisper.WhisperTranscriber,
    media: Sequence[ChunkMedia],
    language: str,
    results: dict[int, ChunkResult],
    settings: Settings,
    owner: deadlines.Owner | None = None,
) -> None:
    """Word times for Qwen3-Omni's transcript segments, by forced alignment (in Whisper's thread); segments kept
    from an earlier run have theirs."""
    for item in media:
        result = results[item.chunk.index]
        todo = [s for s in result.segments if "words" not in s]
        if item.audio is None or not todo:
            continue
        started = time.perf_counter()
        spans = [(s["start"], s["end"], s["text"]) for s in todo]
        with _whisper_watch(settings, "alignment", item, owner):
            aligned = asr.align(item.audio, item.chunk.media_start, spans, language)
        for segment, words in zip(todo, aligned, strict=True):
            segment["words"] = [w.to_dict() for w in words]
        result.asr_seconds += time.perf_counter() - started


def _whisper_rows(
    asr: whisper.WhisperTranscriber,
    media: Sequence[ChunkMedia],
    language: str | None,
    results: dict[int, ChunkResult],
    settings: Settings,
    owner: deadlines.Owner | None = None,
) -> None:
    """Whisper's transcript of each chunk's utterances into ``results`` (in Whisper's thread). A chunk Whisper
    cannot transcribe is a failed row of its own; a transient error stops the unit (it is retried)."""
    for item in media:
        if not item.utterances or item.audio is None:
            continue
        started = time.perf_counter()
        result = results[item.chunk.index]
        try:
            failpoints.hit("infer.row", chunk=item.chunk.index, kind=prompts.TRANSCRIPT)
            with _whisper_watch(settings, "transcript", item, owner):
                heard = asr.transcribe(item.audio, item.chunk.media_start, item.utterances, language)
        except TransientError:
            raise
        except Exception as error:
            _row_failed(result, prompts.TRANSCRIPT, error, (item.utterances[0][0], item.utterances[-1][1]))
            continue
        finally:
            result.asr_seconds += time.perf_counter() - started
        result.segments = [
            {"start": h.start, "end": h.end, "text": h.text, "words": [w.to_dict() for w in h.words]} for h in heard
        ]
        result.transcript = " ".join(h.text for h in heard if h.text)


@dataclass
class Rows:
    """The rows of one chunk still to run: Qwen3-Omni's transcript rows (one per utterance), or Whisper's transcript
    of the chunk, its caption, and its summary (which reads the others)."""

    utterances: list[tuple[float, float]]
    whisper: bool
    caption: bool
    summary: bool


def chunk_utterances(job_plan: JobPlan, chunk: Chunk) -> list[tuple[float, float]]:
    """The speech in ``chunk`` as the plan knows it (file times)."""
    if job_plan.speech is None:
        return [(chunk.start, chunk.end)] if job_plan.info.has_audio else []
    return speech.within([(a, b) for a, b in job_plan.speech], chunk.start, chunk.end)


def rows_to_run(job_plan: JobPlan, chunk: Chunk, by_whisper: bool, kept: ChunkResult | None = None) -> Rows:
    """Every row of a new chunk, or only the failed rows of one kept from an earlier run (``by_whisper``: Whisper
    writes the transcript)."""
    if kept is None:
        utterances = chunk_utterances(job_plan, chunk)
        return Rows([] if by_whisper else utterances, by_whisper and bool(utterances), True, True)
    failed = kept.failed(prompts.TRANSCRIPT)
    utterances = [] if by_whisper else [(float(e["start"]), float(e["end"])) for e in failed]
    return Rows(utterances, by_whisper and bool(failed), bool(kept.failed("caption")), bool(kept.failed("summary")))


def fail_rows(result: ChunkResult, rows: Rows, reason: str, job_plan: JobPlan) -> None:
    """Record every row in ``rows`` as failed with ``reason`` (a chunk that cannot be decoded, or a unit that gave
    up)."""
    chunk = job_plan.chunks[result.index]
    for span in rows.utterances:
        result.fail(prompts.TRANSCRIPT, reason, span)
    if rows.whisper:
        spans = chunk_utterances(job_plan, chunk)
        result.fail(prompts.TRANSCRIPT, reason, (spans[0][0], spans[-1][1]) if spans else None)
    if rows.caption and (job_plan.info.has_video or job_plan.info.has_audio):
        result.fail("caption", reason)
    if rows.summary:
        result.fail("summary", reason)


def _row_failed(
    result: ChunkResult, kind: str, error: BaseException | str, span: tuple[float, float] | None = None
) -> None:
    reason = error_text(error)
    log.warning("chunk %d: the %s row failed for good: %s", result.index, kind, reason)
    result.fail(kind, reason, span)


def result_key(job_id: str, index: int) -> str:
    return f"{chunk_prefix(job_id, index)}/result.json"


def kept_key(job_id: str, index: int) -> str:
    """Where a new run of a job keeps a chunk result with failed rows while it runs them again."""
    return f"{chunk_prefix(job_id, index)}/kept.json"


def kept_result(job_plan: JobPlan, storage: Storage, index: int) -> ChunkResult | None:
    """The result a new run of the job set aside for chunk ``index`` (its good rows), if it reopened that chunk."""
    key = kept_key(job_plan.spec.job_id, index)
    if index not in job_plan.reopened or not storage.exists(key):
        return None
    return ChunkResult.from_dict(get_json(storage, key))


def infer_chunks(
    job_plan: JobPlan,
    indices: list[int],
    engine: Engine,
    storage: Storage,
    settings: Settings,
    budget: ChunkBudget | None = None,
) -> list[ChunkResult]:
    """Transcribe, caption and summarise the given chunks in batched ``generate`` calls.

    A chunk whose result is already stored is not run again (redelivered tasks cost nothing); a chunk kept from
    an earlier run (:func:`reopen_failed`) runs only its failed rows. Its result is stored before this returns: a
    queue message is acknowledged only after that. A row that fails for good is recorded in its chunk's
    ``errors`` (or, with ``OMNIQ_PARTIAL`` off, fails the call with :class:`RowFailed`).
    """
    job_id = job_plan.spec.job_id
    done: dict[int, ChunkResult] = {}
    kept: dict[int, ChunkResult] = {}
    todo: list[int] = []
    for index in indices:
        if storage.exists(result_key(job_id, index)):
            done[index] = ChunkResult.from_dict(get_json(storage, result_key(job_id, index)))
            continue
        if (found := kept_result(job_plan, storage, index)) is not None:
            kept[index] = found
        todo.append(index)
    step = budget.total if budget else len(todo)  # never hold more decoded chunks than the budget
    for first in range(0, len(todo), step):
        group = todo[first : first + step]
        done.update(_infer_group(job_plan, group, engine, storage, settings, budget, kept))
    return [done[index] for index in indices]


def _load_or_error(storage: Storage, job_plan: JobPlan, index: int, settings: Settings) -> ChunkMedia | Exception:
    """A chunk's media, or why it cannot be decoded (a transient error is raised: the unit is retried)."""
    try:
        return load_chunk_media(storage, job_plan, index, settings)
    except TransientError:
        raise
    except Exception as error:  # a pack that does not unpack, frames that do not decode: its rows fail
        return error


def _infer_group(
    job_plan: JobPlan,
    todo: list[int],
    engine: Engine,
    storage: Storage,
    settings: Settings,
    budget: ChunkBudget | None,
    kept: dict[int, ChunkResult],
) -> dict[int, ChunkResult]:
    results: dict[int, ChunkResult] = {}
    plans: dict[int, Rows] = {}
    for index in todo:
        chunk = job_plan.chunks[index]
        plans[index] = rows_to_run(job_plan, chunk, settings.transcriber_name == "whisper", kept.get(index))
        results[index] = kept[index] if index in kept else ChunkResult(index, chunk.start, chunk.end)
        results[index].errors = []  # the rows that failed are the ones run now
    with budget.reserve(len(todo)) if budget else _nothing() as held:
        with ThreadPoolExecutor(min(len(todo), LOAD_THREADS), thread_name_prefix="omniq-load") as loaders:
            loaded = list(loaders.map(lambda index: _load_or_error(storage, job_plan, index, settings), todo))
        media: list[ChunkMedia] = []
        for index, item in zip(todo, loaded, strict=True):
            if isinstance(item, ChunkMedia):
                media.append(item)
                results[index].prepare_seconds += item.seconds
            else:
                log.warning("chunk %d of job %s cannot be decoded: %s", index, job_plan.spec.job_id, item)
                fail_rows(results[index], plans[index], f"its media cannot be decoded: {error_text(item)}", job_plan)
        speaks = any(m.utterances for m in media if plans[m.chunk.index].utterances or plans[m.chunk.index].whisper)
        language = _language_or_none(job_plan, engine, storage, settings, media) if speaks else None
        requests: list[Row] = []
        heard: Future[None] | None = None
        by_whisper = [m for m in media if plans[m.chunk.index].whisper]
        if by_whisper:  # Whisper writes the transcript, beside the model
            asr = whisper_for(settings)
            heard = asr.submit(_whisper_rows, asr, by_whisper, language, results, settings, deadlines.current_owner())
        for item in media:
            rows = plans[item.chunk.index]
            for start, end in rows.utterances:  # one row per utterance: its speech's times
                tokens = prompts.transcript_tokens(end - start, settings.transcript_max_new_tokens)
                request = prompts.transcript_request(item.clip(start, end), language, tokens)
                requests.append((item.chunk.index, prompts.TRANSCRIPT, request, (start, end)))
            if rows.caption and (item.frames is not None or item.audio is not None):
                request = prompts.caption_request(
                    item.frames, job_plan.fps, item.audio, settings.caption_max_new_tokens
                )
                requests.append((item.chunk.index, prompts.CAPTION, request, None))
        streams = {m.chunk.index: (m.frames is not None, m.audio is not None) for m in media}
        try:
            _run(engine, requests, results, streams, prepared=held.release)
        finally:
            if heard is not None:
                heard.result()  # Whisper's rows (a transient error there retries the unit like a model error)
        omni_spoken = [m for m in media if plans[m.chunk.index].utterances]
        if omni_spoken and settings.align_words and whisper.can_align(settings.whisper_model, language):
            try:
                asr = whisper_for(settings)
                owner = deadlines.current_owner()
                asr.submit(_align_rows, asr, omni_spoken, language, results, settings, owner).result()
            except (ConfigError, ModelError, RuntimeError) as error:  # word times are extra: the text stands
                log.warning(
                    "word alignment with whisper %s failed; utterance times only: %s", settings.whisper_model, error
                )
        del media, requests, loaded  # the decoded frames and audio go before the text-only summaries
    summaries: list[Row] = []
    for index, result in results.items():
        result.segments.sort(key=lambda s: (s["start"], s["end"]))  # rows run again come back last
        result.transcript = " ".join(s["text"] for s in result.segments if s["text"])
        if not plans[index].summary or result.failed("summary"):  # not to run, or failed with its chunk already
            continue
        missing = sorted({e["kind"] for e in result.errors})
        if missing:  # the summary reads the chunk's transcript and caption: it waits for them
            result.fail("summary", f"not written: this chunk's {' and '.join(missing)} failed")
            continue
        request = prompts.chunk_summary_request(
            result.start, result.end, result.transcript, result.visual, result.audio, settings.summary_max_new_tokens
        )
        summaries.append((index, prompts.CHUNK_SUMMARY, request, None))
    _run(engine, summaries, results, streams)
    failed = [(index, e) for index, r in results.items() for e in r.errors]
    if failed and not settings.partial:
        index, first = failed[0]
        raise RowFailed(f"the {first['kind']} row of chunk {index} failed: {first['reason']} (OMNIQ_PARTIAL is off)")
    for index, result in results.items():
        # checked absent above: one PUT, no compare-first (3 requests per chunk in all, with the pack's GET)
        put_json(storage, result_key(job_plan.spec.job_id, index), result.to_dict(), if_changed=False)
    return results


def _language_or_none(
    job_plan: JobPlan, engine: Engine, storage: Storage, settings: Settings, media: Sequence[ChunkMedia]
) -> str | None:
    """:func:`file_language`; a detection that fails for good leaves the transcript rows without a language hint."""
    try:
        return file_language(job_plan, engine, storage, settings, media)
    except TransientError:
        raise
    except Exception as error:
        log.warning("language detection for job %s failed; no language hint: %s", job_plan.spec.job_id, error)
        return None


def reopen_failed(job_plan: JobPlan, storage: Storage) -> list[int]:
    """Before a new run of a job whose work was kept (it ended ``partial``): set aside each chunk result that has
    failed rows (``kept.json``: its good rows stay, only the failed ones run again) and drop a file summary that
    missed chunks or failed. Returns the chunks reopened; safe to call twice."""
    job_id = job_plan.spec.job_id
    stored = set(storage.list_keys(f"{work_prefix(job_id)}/chunks"))
    reopened = []
    for chunk in job_plan.chunks:
        key = result_key(job_id, chunk.index)
        if key not in stored:
            continue
        document = get_json(storage, key)
        if ChunkResult.from_dict(document).errors:
            put_json(storage, kept_key(job_id, chunk.index), document)
            storage.delete(key)
            reopened.append(chunk.index)
    summary = f"{work_prefix(job_id)}/summary.json"
    if storage.exists(summary):
        document = get_json(storage, summary)
        if reopened or document.get("error") or document.get("chunks_missing"):
            storage.delete(summary)
    return reopened


def fail_chunks(job_plan: JobPlan, indices: list[int], reason: str, storage: Storage) -> list[int]:
    """Store the chunks of ``indices`` that have no result yet with every row still to run failed with ``reason``
    (a unit that gave up: its retries are spent, or it took its worker down too often). Returns those chunks."""
    written = []
    job_id = job_plan.spec.job_id
    by_whisper = job_plan.spec.config.get("transcriber") == "whisper"
    for index in indices:
        if storage.exists(result_key(job_id, index)):
            continue
        chunk = job_plan.chunks[index]
        kept = kept_result(job_plan, storage, index)
        result = kept or ChunkResult(index, chunk.start, chunk.end)
        rows = rows_to_run(job_plan, chunk, by_whisper, kept)
        result.errors = []
        fail_rows(result, rows, reason, job_plan)
        put_json(storage, result_key(job_id, index), result.to_dict())
        written.append(index)
    return written


def infer_file(
    job_plan: JobPlan, engine: Engine, storage: Storage, settings: Settings, budget: ChunkBudget | None = None
) -> None:
    """Every chunk of a file, in groups of ``batch_size``; with a concurrent engine two groups run at once, so
    one group's chunks are fetched and decoded while the other's generate."""
    indices = [c.index for c in job_plan.chunks]
    size = settings.batch_size
    groups = [indices[first : first + size] for first in range(0, len(indices), size)]
    if isinstance(engine, ConcurrentEngine) and len(groups) > 1:
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
    been turned into model inputs (a pipelined engine does that before generating; others when done).

    A row that raises is recorded as failed in its chunk's result; a transient error is raised (the unit retries).
    """
    if not requests:
        return
    for index, _, request, _ in requests:
        request.chunk = index  # for logs and failpoints
    outcomes = generate_each(engine, [request for _, _, request, _ in requests], prepared)
    transient = next((o for o in outcomes if isinstance(o, TransientError)), None)
    if transient is not None:
        raise transient
    for (index, kind, _, span), answer in zip(requests, outcomes, strict=True):
        result = results[index]
        if isinstance(answer, BaseException):
            _row_failed(result, prompts.row_kind(kind) or kind, answer, span)
            continue
        result.new_tokens += answer.new_tokens
        share = max(answer.batch_size, 1)
        result.model_seconds += answer.seconds / share
        result.prepare_seconds += answer.prepare_seconds / share
        if kind == prompts.TRANSCRIPT and span is not None:
            result.segments.append({"start": span[0], "end": span[1], "text": answer.text.strip()})
        elif kind == prompts.CAPTION:
            result.visual, result.audio = prompts.parse_caption(answer.text, *streams[index])
        else:
            result.summary = answer.text.strip()


def generate_each(
    engine: Engine, requests: list[GenerationRequest], prepared: Callable[[], None] | None = None
) -> list[GenerationResult | BaseException]:
    """Each request's answer, or the exception it alone raised (a transient error of the batch is raised)."""
    if isinstance(engine, ConcurrentEngine):
        return engine.generate_each(requests, prepared=prepared)
    try:
        return list(engine.generate(requests))
    except TransientError:
        raise
    except Exception as error:
        if len(requests) == 1:
            return [error]
    outcomes: list[GenerationResult | BaseException] = []
    for request in requests:  # one bad row: find it, keep the others
        try:
            outcomes.extend(engine.generate([request]))
        except TransientError:
            raise
        except Exception as error:
            outcomes.append(error)
    return outcomes


def summarize(job_plan: JobPlan, engine: Engine, storage: Storage, settings: Settings) -> dict[str, Any]:
    """The file summary from the chunk summaries; stored at ``work/<job>/summary.json``.

    A file of one chunk takes its chunk's summary as is: a second model call would only restate it. Chunks whose
    summary failed are left out (``chunks_missing``: a new run of the job writes the summary again); a file
    summary that cannot be written is recorded with its ``error`` (or, with ``OMNIQ_PARTIAL`` off, raised).
    """
    key = f"{work_prefix(job_plan.spec.job_id)}/summary.json"
    if storage.exists(key):
        return get_json(storage, key)
    job_id = job_plan.spec.job_id
    chunks = [ChunkResult.from_dict(get_json(storage, result_key(job_id, c.index))) for c in job_plan.chunks]
    written = [c for c in chunks if not c.failed("summary")]
    missing = [c.index for c in chunks if c.failed("summary")]
    text, seconds, error = "", 0.0, None
    if len(chunks) == 1 and written:
        text = chunks[0].summary
    elif not written:
        error = "not written: no chunk has a summary"
    else:
        request = prompts.file_summary_request(
            [(c.start, c.end, c.summary) for c in written], settings.summary_max_new_tokens
        )
        answer = generate_each(engine, [request])[0]
        if isinstance(answer, BaseException):
            error = error_text(answer)
            log.warning("job %s: the file summary failed for good: %s", job_plan.spec.job_id, error)
        else:
            text, seconds = answer.text.strip(), answer.seconds / max(answer.batch_size, 1)
    if error and not settings.partial:
        raise RowFailed(f"the file summary failed: {error} (OMNIQ_PARTIAL is off)")
    document = _summary_document(text, engine.model_id, bool(engine.random_weights), seconds, missing, error)
    put_json(storage, key, document)
    return document


def _summary_document(
    text: str, model: str, random_weights: bool, seconds: float, missing: list[int], error: str | None
) -> dict[str, Any]:
    return {
        "summary": text,
        "model": model,
        "random_weights": random_weights,
        "seconds": round(seconds, 3),
        "chunks_missing": missing,  # chunks whose summary failed: left out of this one
        "error": error,  # why there is no file summary
    }


def fail_file_summary(job_plan: JobPlan, storage: Storage, reason: str) -> None:
    """Record the file summary as failed with ``reason`` (its unit gave up), unless it is stored already."""
    from pipeline.config import TINY_MODEL

    key = f"{work_prefix(job_plan.spec.job_id)}/summary.json"
    if storage.exists(key):
        return
    model = str(job_plan.spec.config.get("model") or "")
    put_json(storage, key, _summary_document("", model, model == TINY_MODEL, 0.0, [], reason))
