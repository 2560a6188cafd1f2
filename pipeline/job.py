"""The job as pure steps: ingest (probe → plan → extract) → infer chunks → summarize → finalize.

The same functions run in-process (``omniq run``, :func:`run_job`) and inside Celery tasks; only
the driver differs. Every step is idempotent: its outputs are deterministic keys in storage, and
a step that finds its output already written reuses it.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import __version__, assemble, prompts
from pipeline.assemble import ChunkResult
from pipeline.config import Settings, config_hash_of
from pipeline.engines.base import Engine, GenerationRequest
from pipeline.errors import ConfigError, OmniqError
from pipeline.media import extract, plan
from pipeline.media.plan import Chunk
from pipeline.media.probe import MediaInfo, check_limits, probe_media
from pipeline.sources import SourceRef, fetch_source, job_id_for, resolve_source
from pipeline.storage import Storage

if TYPE_CHECKING:
    from pipeline.search import SearchIndex

log = logging.getLogger(__name__)

RANDOM_NOTICE = (
    "Written by the tiny random-weight test model: this text is random and says nothing about the media. "
    "Use a real checkpoint (--model Qwen/Qwen3-Omni-30B-A3B-Instruct or a local path) for real output."
)
RESULT_FILES = (
    "transcript.json",
    "transcript.srt",
    "transcript.vtt",
    "transcript.txt",
    "captions.json",
    "summary.json",
    "manifest.json",
)
CONTENT_TYPES = {".json": "application/json", ".srt": "application/x-subrip", ".vtt": "text/vtt", ".txt": "text/plain"}


@dataclass
class JobSpec:
    """What a queue message carries: references and the settings that shape the outputs, never media."""

    job_id: str
    media_id: str
    source: str  # the URI the user gave, normalised
    input_uri: str  # where the bytes are read (the source, or its uploaded copy)
    fingerprint: str
    config: dict[str, Any]
    tag: str | None = None  # a per-run label (``--tag``); recorded in the manifest and the index
    priority: int = 5  # 0 (lowest) .. 9 (most urgent)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**data)


@dataclass
class JobPlan:
    """The outcome of ingest, stored at ``work/<job>/plan.json`` for the later steps."""

    spec: JobSpec
    info: MediaInfo
    chunks: list[Chunk]
    fps: float
    frame_shape: list[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "info": self.info.to_dict(),
            "chunks": [c.to_dict() for c in self.chunks],
            "fps": self.fps,
            "frame_shape": self.frame_shape,
            "timings": self.timings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPlan:
        return cls(
            JobSpec.from_dict(data["spec"]),
            MediaInfo.from_dict(data["info"]),
            [Chunk.from_dict(c) for c in data["chunks"]],
            float(data["fps"]),
            data.get("frame_shape"),
            dict(data.get("timings", {})),
        )


def work_prefix(job_id: str) -> str:
    return f"work/{job_id}"


def chunk_prefix(job_id: str, index: int) -> str:
    return f"work/{job_id}/chunks/{index:05d}"


def results_prefix(media_id: str) -> str:
    return f"results/{media_id}"


def make_spec(
    source: str,
    settings: Settings,
    input_uri: str | None = None,
    ref: SourceRef | None = None,
    tag: str | None = None,
    priority: int = 5,
) -> JobSpec:
    """Name a job: deterministic ids from the source fingerprint and the effective config.

    The tag and priority do not change outputs, so they are not part of the job id.
    """
    ref = ref or resolve_source(source, settings)
    return JobSpec(
        job_id=job_id_for(ref.media_id, settings.config_hash()),
        media_id=ref.media_id,
        source=ref.uri,
        input_uri=input_uri or ref.uri,
        fingerprint=ref.fingerprint,
        config=settings.effective_config(),
        tag=tag,
        priority=priority,
    )


def settings_for(spec: JobSpec, settings: Settings) -> Settings:
    """The worker's settings with the job's output-shaping config applied (the job was named with it)."""
    wanted = {k: v for k, v in spec.config.items() if k in Settings.model_fields and k != "model"}
    if spec.config.get("model") not in (None, settings.model):
        raise ConfigError(
            f"job {spec.job_id} was enqueued for model {spec.config.get('model')!r} but this worker runs "
            f"{settings.model!r}; start a worker with OMNIQ_MODEL={spec.config.get('model')}"
        )
    return settings.model_copy(update=wanted)


def _put_json(storage: Storage, key: str, document: Any) -> None:
    storage.put_bytes(key, assemble.dumps(document), "application/json")


def _get_json(storage: Storage, key: str) -> Any:
    return json.loads(storage.get_bytes(key))


def ingest(spec: JobSpec, settings: Settings, storage: Storage) -> JobPlan:
    """Probe, check limits, decode once, plan chunks at silences and store each chunk's frames and audio."""
    plan_key = f"{work_prefix(spec.job_id)}/plan.json"
    if storage.exists(plan_key):
        return JobPlan.from_dict(_get_json(storage, plan_key))
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
        frame_shape = None
        for chunk in chunks:
            prefix = chunk_prefix(spec.job_id, chunk.index)
            frames = media.frame_paths(chunk.media_start, chunk.end)
            for number, frame in enumerate(frames):
                storage.put_file(f"{prefix}/frames/{number:06d}.jpg", frame)
            if frames and frame_shape is None:
                from PIL import Image

                with Image.open(frames[0]) as image:
                    frame_shape = [image.height, image.width]
            has_audio = media.audio_path is not None
            if has_audio:
                first = int(chunk.media_start * extract.SAMPLE_RATE)
                last = int(chunk.end * extract.SAMPLE_RATE)
                buffer = io.BytesIO()
                extract.write_wav(buffer, np.asarray(samples[first:last]))
                storage.put_bytes(f"{prefix}/audio.wav", buffer.getvalue(), "audio/wav")
            chunk_doc = {**chunk.to_dict(), "fps": settings.fps, "frames": len(frames), "has_audio": has_audio}
            _put_json(storage, f"{prefix}/chunk.json", chunk_doc)
        timings = {"ingest_s": round(time.monotonic() - started, 3), "ffmpeg_s": round(media.seconds, 3)}
        job_plan = JobPlan(spec, info, chunks, settings.fps, frame_shape, timings)
    _put_json(storage, plan_key, job_plan.to_dict())
    return job_plan


def load_plan(storage: Storage, job_id: str) -> JobPlan:
    return JobPlan.from_dict(_get_json(storage, f"{work_prefix(job_id)}/plan.json"))


@dataclass
class ChunkMedia:
    chunk: Chunk
    frames: np.ndarray | None  # uint8 (T, H, W, 3)
    audio: np.ndarray | None  # float32 at 16 kHz
    silent: bool


def load_chunk_media(storage: Storage, job_plan: JobPlan, index: int, settings: Settings) -> ChunkMedia:
    """Read one chunk's frames and audio back from storage as arrays for the engine."""
    from PIL import Image

    chunk = job_plan.chunks[index]
    prefix = chunk_prefix(job_plan.spec.job_id, index)
    doc = _get_json(storage, f"{prefix}/chunk.json")
    frames = None
    if doc["frames"]:
        images = []
        for number in range(doc["frames"]):
            data = storage.get_bytes(f"{prefix}/frames/{number:06d}.jpg")
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(image.convert("RGB")))
        if len(images) == 1:  # the video processor groups frames in pairs; one frame stands for two
            images.append(images[0])
        frames = np.stack(images)
    audio = None
    silent = True
    if doc["has_audio"]:
        audio = extract.wav_bytes_to_float(storage.get_bytes(f"{prefix}/audio.wav"))
        if audio.size == 0:
            audio = None
        else:
            quiet = extract.detect_silences(
                (audio * 32767).astype(np.int16), settings.silence_noise_db, settings.silence_min_seconds
            )
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
            done[index] = ChunkResult.from_dict(_get_json(storage, key))
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
            _put_json(storage, f"{chunk_prefix(job_id, index)}/result.json", result.to_dict())
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
        return _get_json(storage, key)
    chunks = [
        ChunkResult.from_dict(_get_json(storage, f"{chunk_prefix(job_plan.spec.job_id, c.index)}/result.json"))
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
    _put_json(storage, key, document)
    return document


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _base_manifest(spec: JobSpec, settings: Settings) -> dict[str, Any]:
    return {
        "status": None,
        "source": spec.source,
        "media_id": spec.media_id,
        "job_id": spec.job_id,
        "input_uri": spec.input_uri,
        "fingerprint": spec.fingerprint,
        "config_hash": config_hash_of(spec.config),
        "model": spec.config.get("model", settings.model),
        "tag": spec.tag,
        "prompt_version": prompts.PROMPT_VERSION,
        "settings": spec.config,
        "omniq_version": __version__,
    }


def finalize(
    job_plan: JobPlan, storage: Storage, settings: Settings, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Assemble and write the result files; the manifest is written last and marks the job done."""
    spec = job_plan.spec
    started = time.monotonic()
    chunks = [
        ChunkResult.from_dict(_get_json(storage, f"{chunk_prefix(spec.job_id, c.index)}/result.json"))
        for c in job_plan.chunks
    ]
    summary = _get_json(storage, f"{work_prefix(spec.job_id)}/summary.json")
    segments = assemble.transcript_segments(chunks)
    documents: dict[str, bytes] = {
        "transcript.json": assemble.dumps(assemble.transcript_doc(segments, settings.language)),
        "transcript.srt": assemble.to_srt(segments).encode(),
        "transcript.vtt": assemble.to_vtt(segments).encode(),
        "transcript.txt": assemble.to_txt(segments).encode(),
        "captions.json": assemble.dumps(assemble.captions_doc(chunks)),
        "summary.json": assemble.dumps(assemble.summary_doc(summary["summary"], chunks)),
    }
    prefix = results_prefix(spec.media_id)
    for name, data in documents.items():
        storage.put_bytes(f"{prefix}/{name}", data, CONTENT_TYPES[Path(name).suffix])
    all_timings = {**job_plan.timings, **(timings or {})}
    all_timings["model_s"] = round(sum(c.model_seconds for c in chunks) + float(summary.get("seconds", 0)), 3)
    all_timings["finalize_s"] = round(time.monotonic() - started, 3)
    manifest = _base_manifest(spec, settings) | {
        "status": "done",
        "duration_s": job_plan.info.duration_s,
        "chunks": len(job_plan.chunks),
        "model": summary.get("model", spec.config.get("model")),
        "random_weights": bool(summary.get("random_weights")),
        "media": job_plan.info.to_dict(),
        "timings": all_timings,
        "tokens": sum(c.new_tokens for c in chunks),
        "error": None,
        "finished_at": _now(),
        "outputs": {name: storage.uri(f"{prefix}/{name}") for name in RESULT_FILES},
    }
    if manifest["random_weights"]:
        manifest["notice"] = RANDOM_NOTICE
    _put_json(storage, f"{prefix}/manifest.json", manifest)
    if not settings.keep_work:
        storage.delete_prefix(work_prefix(spec.job_id))
    return manifest


def write_failure(
    spec: JobSpec, storage: Storage, settings: Settings, error: BaseException, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Record a failed job: a manifest with the reason, so status and results say why."""
    manifest = _base_manifest(spec, settings) | {
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "timings": timings or {},
        "finished_at": _now(),
        "outputs": {},
    }
    _put_json(storage, f"{results_prefix(spec.media_id)}/manifest.json", manifest)
    if not settings.keep_work:
        storage.delete_prefix(work_prefix(spec.job_id))
    return manifest


def finished_manifest(storage: Storage, media_id: str, config_hash: str) -> dict[str, Any] | None:
    """The manifest of a finished (done) job for this media and config, if there is one."""
    key = f"{results_prefix(media_id)}/manifest.json"
    if not storage.exists(key):
        return None
    manifest = _get_json(storage, key)
    if manifest.get("status") == "done" and manifest.get("config_hash") == config_hash:
        return manifest
    return None


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
