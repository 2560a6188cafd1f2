"""The job as pure steps: ingest (probe → plan → extract) → infer chunks → summarize → finalize.

The same functions run in-process (``omniq run``, :func:`run_job`) and inside Celery tasks; only
the driver differs. Every step is idempotent: its outputs are deterministic keys in storage, and
a step that finds its output already written reuses it.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline import prompts
from pipeline.assemble import ChunkResult
from pipeline.config import Settings, config_hash_of
from pipeline.engines.base import Engine, GenerationRequest
from pipeline.errors import OmniqError
from pipeline.finalize import (
    CONTENT_TYPES,
    RANDOM_NOTICE,
    RESULT_FILES,
    finalize,
    finished_manifest,
    write_failure,
)
from pipeline.media import extract, pack, plan
from pipeline.media.plan import Chunk
from pipeline.media.probe import check_limits, probe_media
from pipeline.sources import fetch_source
from pipeline.spec import (
    JobPlan,
    JobSpec,
    chunk_prefix,
    get_json,
    load_plan,
    make_spec,
    pack_key,
    put_json,
    results_prefix,
    settings_for,
    work_prefix,
)
from pipeline.storage import Storage

# Re-exported: callers drive a job through this one module.
__all__ = [
    "CONTENT_TYPES",
    "RANDOM_NOTICE",
    "RESULT_FILES",
    "JobOutcome",
    "JobPlan",
    "JobSpec",
    "config_hash_of",
    "finalize",
    "finished_manifest",
    "infer_chunks",
    "ingest",
    "load_plan",
    "make_spec",
    "results_prefix",
    "run_job",
    "settings_for",
    "summarize",
    "update_index",
    "work_prefix",
    "write_failure",
]

if TYPE_CHECKING:
    from pipeline.search import SearchIndex

log = logging.getLogger(__name__)


def ingest(spec: JobSpec, settings: Settings, storage: Storage) -> JobPlan:
    """Probe, check limits, decode once, plan chunks at silences and store each chunk's frames and audio."""
    plan_key = f"{work_prefix(spec.job_id)}/plan.json"
    if storage.exists(plan_key):
        return JobPlan.from_dict(get_json(storage, plan_key))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="omniq-ingest-") as temp:
        directory = Path(temp)
        local = fetch_source(spec.input_uri, directory, settings)
        info = probe_media(local, spec.source)
        check_limits(info, settings, spec.source)
        media = extract.extract_media(
            local,
            directory / "decoded",
            info,
            settings.fps,
            settings.frame_max_pixels,
            settings.ffmpeg_timeout_seconds,
            spec.source,
        )
        samples = media.audio()
        silences = extract.detect_silences(samples, settings.silence_noise_db, settings.silence_min_seconds)
        chunks = plan.plan_chunks(
            info.duration_s,
            settings.chunk_seconds,
            silences,
            settings.silence_search_seconds,
            settings.chunk_overlap_seconds,
        )
        frame_shape = store_chunk_packs(storage, spec.job_id, chunks, media, samples, settings.fps)
        timings = {"ingest_s": round(time.monotonic() - started, 3), "ffmpeg_s": round(media.seconds, 3)}
        job_plan = JobPlan(spec, info, chunks, settings.fps, frame_shape, timings)
    put_json(storage, plan_key, job_plan.to_dict())
    return job_plan


UPLOAD_THREADS = 8  # parallel PUTs at ingest; also bounds how many packs wait in memory (twice this)


def store_chunk_packs(
    storage: Storage,
    job_id: str,
    chunks: list[Chunk],
    media: extract.ExtractedMedia,
    samples: np.ndarray,
    fps: float,
) -> list[int] | None:
    """Write one pack per chunk with parallel uploads; return the frames' ``[height, width]`` (None: no video).

    Packs are built in chunk order and at most ``2 * UPLOAD_THREADS`` wait for their upload, so memory stays
    flat for long files. Ingest runs only while the job has no plan, so the packs are new: no compare-first.
    """
    frame_shape = None
    pending: deque[Future[bool]] = deque()
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="omniq-upload") as uploads:
        for chunk in chunks:
            frames = [path.read_bytes() for path in media.frame_paths(chunk.media_start, chunk.end)]
            if frames and frame_shape is None:
                with Image.open(io.BytesIO(frames[0])) as image:
                    frame_shape = [image.height, image.width]
            audio = None
            if media.audio_path is not None:
                first = int(chunk.media_start * extract.SAMPLE_RATE)
                audio = np.asarray(samples[first : int(chunk.end * extract.SAMPLE_RATE)])
            meta = {**chunk.to_dict(), "fps": fps, "frames": len(frames), "has_audio": audio is not None}
            data = pack.pack_chunk(meta, frames, audio)
            key = pack_key(job_id, chunk.index)
            pending.append(uploads.submit(storage.put_bytes, key, data, pack.CONTENT_TYPE, if_changed=False))
            while len(pending) > 2 * UPLOAD_THREADS:
                pending.popleft().result()
        for upload in pending:
            upload.result()  # raises the first upload error (the others finish or fail on their own)
    return frame_shape


@dataclass
class ChunkMedia:
    chunk: Chunk
    frames: np.ndarray | None  # uint8 (T, H, W, 3)
    audio: np.ndarray | None  # float32 at 16 kHz
    silent: bool


def load_chunk_media(storage: Storage, job_plan: JobPlan, index: int, settings: Settings) -> ChunkMedia:
    """Read one chunk's pack back from storage (one GET) and decode it into arrays for the engine."""
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
    silent = True
    if contents.audio is not None and contents.audio.size:
        audio = contents.audio.astype(np.float32) / 32768.0
        quiet = extract.detect_silences(contents.audio, settings.silence_noise_db, settings.silence_min_seconds)
        covered = sum(end - start for start, end in quiet)
        silent = covered >= 0.98 * (audio.size / extract.SAMPLE_RATE) - 0.05
    return ChunkMedia(chunk, frames, audio, silent)


def infer_chunks(
    job_plan: JobPlan, indices: list[int], engine: Engine, storage: Storage, settings: Settings
) -> list[ChunkResult]:
    """Transcribe, caption and summarise the given chunks in batched ``generate`` calls.

    A chunk whose result is already stored is not run again (redelivered tasks cost nothing).
    """
    job_id = job_plan.spec.job_id
    done: dict[int, ChunkResult] = {}
    todo: list[ChunkMedia] = []
    for index in indices:
        key = f"{chunk_prefix(job_id, index)}/result.json"
        if storage.exists(key):
            done[index] = ChunkResult.from_dict(get_json(storage, key))
        else:
            todo.append(load_chunk_media(storage, job_plan, index, settings))
    if todo:
        results = {m.chunk.index: ChunkResult(m.chunk.index, m.chunk.start, m.chunk.end) for m in todo}
        requests: list[tuple[int, str, GenerationRequest]] = []
        for media in todo:
            if media.audio is not None and not media.silent:
                request = prompts.transcript_request(media.audio, settings.language, settings.transcript_max_new_tokens)
                requests.append((media.chunk.index, prompts.TRANSCRIPT, request))
            if media.frames is not None or media.audio is not None:
                request = prompts.caption_request(
                    media.frames, job_plan.fps, media.audio, settings.caption_max_new_tokens
                )
                requests.append((media.chunk.index, prompts.CAPTION, request))
        _run(engine, requests, results, todo)
        summaries = [
            (
                index,
                prompts.CHUNK_SUMMARY,
                prompts.chunk_summary_request(
                    r.start, r.end, r.transcript, r.visual, r.audio, settings.summary_max_new_tokens
                ),
            )
            for index, r in results.items()
        ]
        _run(engine, summaries, results, todo)
        for index, result in results.items():
            # checked absent above: one PUT, no compare-first (3 requests per chunk in all, with the pack's GET)
            put_json(storage, f"{chunk_prefix(job_id, index)}/result.json", result.to_dict(), if_changed=False)
            done[index] = result
    return [done[index] for index in indices]


def _run(
    engine: Engine,
    requests: list[tuple[int, str, GenerationRequest]],
    results: dict[int, ChunkResult],
    media: list[ChunkMedia],
) -> None:
    if not requests:
        return
    answers = engine.generate([request for _, _, request in requests])
    streams = {m.chunk.index: (m.frames is not None, m.audio is not None) for m in media}
    for (index, kind, _), answer in zip(requests, answers, strict=True):
        result = results[index]
        result.new_tokens += answer.new_tokens
        result.model_seconds += answer.seconds / max(answer.batch_size, 1)
        if kind == prompts.TRANSCRIPT:
            result.transcript = answer.text.strip()
        elif kind == prompts.CAPTION:
            result.visual, result.audio = prompts.parse_caption(answer.text, *streams[index])
        else:
            result.summary = answer.text.strip()


def summarize(job_plan: JobPlan, engine: Engine, storage: Storage, settings: Settings) -> dict[str, Any]:
    """The file summary from the chunk summaries; stored at ``work/<job>/summary.json``."""
    key = f"{work_prefix(job_plan.spec.job_id)}/summary.json"
    if storage.exists(key):
        return get_json(storage, key)
    chunks = [
        ChunkResult.from_dict(get_json(storage, f"{chunk_prefix(job_plan.spec.job_id, c.index)}/result.json"))
        for c in job_plan.chunks
    ]
    request = prompts.file_summary_request(
        [(c.start, c.end, c.summary) for c in chunks], settings.summary_max_new_tokens
    )
    answer = engine.generate([request])[0]
    document = {
        "summary": answer.text.strip(),
        "model": engine.model_id,
        "random_weights": bool(engine.random_weights),
        "seconds": round(answer.seconds, 3),
    }
    put_json(storage, key, document)
    return document


@dataclass
class JobOutcome:
    """One line of ``omniq run`` output."""

    source: str
    media_id: str | None
    status: str  # done | failed | skipped
    result_uri: str | None
    error: str | None
    manifest: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "media_id": self.media_id,
            "status": self.status,
            "result_uri": self.result_uri,
            "error": self.error,
        }


def update_index(index: SearchIndex | None, storage: Storage, media_id: str) -> None:
    """Add a finished job to the search index (or drop a failed one). The store stays the source of truth:
    an index failure is logged, never fails the job, and ``omniq index rebuild`` repairs it."""
    if index is None:
        return
    from pipeline.search import index_media

    try:
        index_media(storage, media_id, index)
    except OmniqError as error:
        log.warning("could not index %s (run 'omniq index rebuild' later): %s", media_id, error)


def run_job(
    source: str, settings: Settings, storage: Storage, engine: Engine, index: SearchIndex | None = None
) -> JobOutcome:
    """Run every step in this process. Permanent errors become a failed manifest, not an exception."""
    try:
        spec = make_spec(source, settings)
    except OmniqError as error:
        return JobOutcome(source, None, "failed", None, str(error))
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        job_plan = ingest(spec, settings, storage)
        infer_started = time.monotonic()
        infer_chunks(job_plan, [c.index for c in job_plan.chunks], engine, storage, settings)
        timings["infer_s"] = round(time.monotonic() - infer_started, 3)
        summarize_started = time.monotonic()
        summarize(job_plan, engine, storage, settings)
        timings["summarize_s"] = round(time.monotonic() - summarize_started, 3)
        timings["total_s"] = round(time.monotonic() - started, 3)
        manifest = finalize(job_plan, storage, settings, timings)
    except OmniqError as error:
        log.warning("job %s for %s failed: %s", spec.job_id, spec.source, error)
        manifest = write_failure(spec, storage, settings, error, timings)
        update_index(index, storage, spec.media_id)
        return JobOutcome(spec.source, spec.media_id, "failed", None, manifest["error"], manifest)
    update_index(index, storage, spec.media_id)
    result_uri = storage.uri(results_prefix(spec.media_id))
    return JobOutcome(spec.source, spec.media_id, "done", result_uri, None, manifest)
