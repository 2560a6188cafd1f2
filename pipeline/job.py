"""The job as pure steps: ingest (probe → plan → extract) → infer chunks → summarize → finalize.

The same functions run in-process (``omniq run``, :func:`run_job`) and inside Celery tasks; only
the driver differs. Every step is idempotent: its outputs are deterministic keys in storage, and
a step that finds its output already written reuses it.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline import deadlines
from pipeline.config import Settings, config_hash_of
from pipeline.engines.base import Engine
from pipeline.errors import OmniqError
from pipeline.infer import (
    ChunkBudget,
    fail_chunks,
    fail_file_summary,
    infer_chunks,
    infer_file,
    reopen_failed,
    summarize,
)
from pipeline.media import extract, pack, plan, speech
from pipeline.media.plan import Chunk
from pipeline.media.probe import check_limits, probe_media
from pipeline.results.finalize import (
    CONTENT_TYPES,
    RANDOM_NOTICE,
    RESULT_FILES,
    finalize,
    finished_manifest,
    write_failure,
)
from pipeline.sources import SourceRef, fetch_source
from pipeline.spec import (
    JobPlan,
    JobSpec,
    check_input,
    get_json,
    load_plan,
    make_spec,
    pack_key,
    put_json,
    results_prefix,
    settings_for,
    staged_input_key,
    work_prefix,
)
from pipeline.storage import Storage

# Re-exported: callers drive a job through this one module.
__all__ = [
    "CONTENT_TYPES",
    "RANDOM_NOTICE",
    "RESULT_FILES",
    "ChunkBudget",
    "JobOutcome",
    "JobPlan",
    "JobSpec",
    "check_input",
    "config_hash_of",
    "fail_chunks",
    "fail_file_summary",
    "finalize",
    "finished_manifest",
    "infer_chunks",
    "ingest",
    "load_plan",
    "make_spec",
    "results_prefix",
    "run_job",
    "run_jobs",
    "settings_for",
    "staged_input_key",
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
        stored = JobPlan.from_dict(get_json(storage, plan_key))
        if spec.run_id is None or stored.spec.run_id == spec.run_id:
            return stored
        # a new run of a job whose work was kept (it ended partial): its failed rows run again, nothing else
        reopened = sorted(set(reopen_failed(stored, storage)) | set(stored.reopened))
        log.info("job %s: run %s reuses the stored chunks; %d chunks run their failed rows", spec.job_id,
                 spec.run_id, len(reopened))  # fmt: skip
        stored.spec, stored.reopened = spec, reopened
        put_json(storage, plan_key, stored.to_dict())
        return stored
    started = time.monotonic()
    watched = deadlines.watch(f"ingest of {spec.source}", settings.deadline_min_seconds)
    with watched, tempfile.TemporaryDirectory(prefix="omniq-ingest-") as temp:
        directory = Path(temp)
        local = fetch_source(spec.input_uri, directory, settings, name=spec.source)  # allows for its download
        info = probe_media(local, spec.source)
        check_limits(info, settings, spec.source)
        deadlines.allow(deadlines.ingest_seconds(settings, info.duration_s))
        media = extract.extract_media(
            local,
            directory / "decoded",
            info,
            settings.fps,
            settings.frame_max_pixels,
            settings.ffmpeg_timeout_seconds,
            spec.source,
            settings.max_duration_seconds,
        )
        samples = media.audio()
        vad_started = time.monotonic()
        options = speech.SpeechOptions.from_settings(settings)
        spans = speech.detect_speech(samples, options) if len(samples) else []
        utterances = speech.utterances(spans, samples, info.duration_s, options)
        vad_seconds = time.monotonic() - vad_started
        if utterances:  # boundaries between utterances
            silences = speech.gaps_between(utterances, info.duration_s)
        else:  # no speech (music, tones, silence): boundaries at the quiet, by level
            silences = extract.detect_silences(samples, settings.silence_noise_db, settings.silence_min_seconds)
        chunks = plan.plan_chunks(
            info.duration_s,
            settings.chunk_seconds,
            silences,
            settings.silence_search_seconds,
            settings.chunk_overlap_seconds,
        )
        frame_shape = store_chunk_packs(storage, spec.job_id, chunks, media, samples, settings.fps)
        timings = {
            "ingest_s": round(time.monotonic() - started, 3),
            "ffmpeg_s": round(media.seconds, 3),
            "vad_s": round(vad_seconds, 3),
        }
        job_plan = JobPlan(
            spec, info, chunks, settings.fps, frame_shape, timings, speech=[[a, b] for a, b in utterances]
        )
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
class JobOutcome:
    """One line of ``omniq run`` output."""

    source: str
    media_id: str | None
    status: str  # done | partial | failed | skipped
    result_uri: str | None
    error: str | None
    manifest: dict[str, Any] | None = None

    @property
    def failed_rows(self) -> int:
        """How many rows failed for good (a ``partial`` job's gaps)."""
        return int(((self.manifest or {}).get("rows") or {}).get("failed") or 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "media_id": self.media_id,
            "status": self.status,
            "result_uri": self.result_uri,
            "error": self.error,
            "failed_rows": self.failed_rows,
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
    except Exception as error:  # an embedding model that breaks, a damaged file: the job is done all the same
        log.warning("could not index %s (run 'omniq index rebuild' later): %s", media_id, error, exc_info=True)


def run_job(
    source: str | SourceRef,
    settings: Settings,
    storage: Storage,
    engine: Engine,
    index: SearchIndex | None = None,
    *,
    budget: ChunkBudget | None = None,
    ingest_lock: threading.Lock | None = None,
    force: bool = False,
) -> JobOutcome:
    """Run every step in this process. Permanent errors become a failed manifest, not an exception.

    A source already done with the same content and output-shaping settings is ``skipped`` unless ``force``.
    ``ingest_lock`` lets one file decode at a time while others run the model (see :func:`run_jobs`).
    """
    name = source.uri if isinstance(source, SourceRef) else source
    try:
        spec = make_spec(name, settings, ref=source if isinstance(source, SourceRef) else None)
    except OmniqError as error:
        return JobOutcome(name, None, "failed", None, str(error))
    spec.run_id = uuid.uuid4().hex[:12]  # a run after a partial one reruns only its failed rows (ingest)
    if force:  # from the start: not even a partial run's good rows are kept
        storage.delete_prefix(work_prefix(spec.job_id))
    result_uri = storage.uri(results_prefix(spec.media_id))
    if not force:
        done = finished_manifest(storage, spec.media_id, config_hash_of(spec.config))
        if done is not None:
            return JobOutcome(spec.source, spec.media_id, "skipped", result_uri, None, done)
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        with ingest_lock or nullcontext():
            job_plan = ingest(spec, settings, storage)
        timings |= job_plan.timings  # a failure later still records what ingest took
        infer_started = time.monotonic()
        infer_file(job_plan, engine, storage, settings, budget)
        timings["infer_s"] = round(time.monotonic() - infer_started, 3)
        summarize_started = time.monotonic()
        summarize(job_plan, engine, storage, settings)
        timings["summarize_s"] = round(time.monotonic() - summarize_started, 3)
        timings["total_s"] = round(time.monotonic() - started, 3)
        manifest = finalize(job_plan, storage, settings, timings)
        if manifest["status"] == "failed":  # every row failed
            update_index(index, storage, spec.media_id)
            return JobOutcome(spec.source, spec.media_id, "failed", result_uri, manifest["error"], manifest)
    except OmniqError as error:
        log.warning("job %s for %s failed: %s", spec.job_id, spec.source, error)
        timings["total_s"] = round(time.monotonic() - started, 3)
        manifest = write_failure(spec, storage, settings, error, timings)
        update_index(index, storage, spec.media_id)
        return JobOutcome(spec.source, spec.media_id, "failed", result_uri, manifest["error"], manifest)
    update_index(index, storage, spec.media_id)
    return JobOutcome(spec.source, spec.media_id, manifest["status"], result_uri, manifest["error"], manifest)


def run_jobs(
    sources: Iterable[str | SourceRef],
    settings: Settings,
    storage: Storage,
    engine: Engine,
    index: SearchIndex | None = None,
    *,
    force: bool = False,
) -> Iterator[JobOutcome]:
    """Run many files in this process and yield their outcomes in order.

    Up to ``2 x batch_size`` files are under way at once: one decodes (ffmpeg uses every core) while the others
    run the model, and their rows share ``generate`` calls through one :class:`PipelinedEngine`. At most
    ``2 x batch_size`` chunks are held decoded at a time, however many files there are.
    """
    from pipeline.engines.base import ConcurrentEngine
    from pipeline.engines.pipelined import PipelinedEngine

    own = not isinstance(engine, ConcurrentEngine)  # a pipeline made here is closed here
    pipelined = PipelinedEngine(engine, settings) if own else engine  # type: ignore[arg-type]
    budget = ChunkBudget(2 * settings.batch_size)
    ingest_lock = threading.Lock()
    at_once = 2 * settings.batch_size
    try:
        with ThreadPoolExecutor(at_once, thread_name_prefix="omniq-file") as files:
            pending: deque[Future[JobOutcome]] = deque()
            for source in sources:
                pending.append(
                    files.submit(
                        run_job,
                        source,
                        settings,
                        storage,
                        pipelined,
                        index,
                        budget=budget,
                        ingest_lock=ingest_lock,
                        force=force,
                    )
                )
                while len(pending) > at_once and pending[0].done():
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        if own and isinstance(pipelined, PipelinedEngine):
            pipelined.close()
