"""The last step: result files and the manifest (written last, it marks the job done or failed)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import __version__, prompts
from pipeline.config import Settings, config_hash_of
from pipeline.errors import SourceNotFound, error_text
from pipeline.media import pack
from pipeline.results import assemble, cues, viewer
from pipeline.results.assemble import ChunkResult
from pipeline.spec import (
    JobPlan,
    JobSpec,
    chunk_prefix,
    get_json,
    language_key,
    pack_key,
    put_json,
    results_prefix,
    work_prefix,
)
from pipeline.storage import Storage

RANDOM_NOTICE = (
    "Written by the tiny random-weight test model: this text is random and says nothing about the media. "
    "Use a real checkpoint (--model Qwen/Qwen3-Omni-30B-A3B-Instruct or a local path) for real output."
)
# with Whisper writing the transcript, only the captions and summaries are the random model's
RANDOM_CAPTIONS_NOTICE = (
    "The captions and summaries were written by the tiny random-weight test model: their text is random and says "
    "nothing about the media. The transcript is real: Whisper {whisper} wrote it. Use a real checkpoint "
    "(--model Qwen/Qwen3-Omni-30B-A3B-Instruct or a local path) for real captions and summaries."
)
RESULT_FILES = (
    "transcript.json",
    "transcript.srt",
    "transcript.vtt",
    "transcript.txt",
    "captions.json",
    "summary.json",
    "index.html",
    "manifest.json",
)
CONTENT_TYPES = {".json": "application/json", ".srt": "application/x-subrip", ".vtt": "text/vtt", ".txt": "text/plain"}


def now_iso() -> str:
    """Now, as manifests and the producer's batch records write it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _base_manifest(spec: JobSpec, settings: Settings) -> dict[str, Any]:
    return {
        "status": None,
        "source": spec.source,
        "media_id": spec.media_id,
        "job_id": spec.job_id,
        "run_id": spec.run_id,
        "input_uri": spec.input_uri,
        "fingerprint": spec.fingerprint,
        "config_hash": config_hash_of(spec.config),
        "model": spec.config.get("model", settings.model),
        "tag": spec.tag,
        "prompt_version": prompts.PROMPT_VERSION,
        "settings": spec.config,
        "omniq_version": __version__,
    }


def planned_rows(job_plan: JobPlan) -> int:
    """How many rows a job's results have: per chunk its transcript rows (one per utterance for Qwen3-Omni, one
    for Whisper's transcript of the chunk), its caption and its summary; and the file summary."""
    from pipeline.infer import chunk_utterances

    by_whisper = job_plan.spec.config.get("transcriber") == "whisper"
    rows = 1
    for chunk in job_plan.chunks:
        utterances = chunk_utterances(job_plan, chunk)
        rows += (min(1, len(utterances)) if by_whisper else len(utterances)) + 1
        rows += int(job_plan.info.has_video or job_plan.info.has_audio)
    return rows


def failed_rows(chunks: list[ChunkResult], summary: dict[str, Any], duration: float) -> list[dict[str, Any]]:
    """Every row that failed for good, ``{kind, chunk, start, end, reason}`` (the manifest's list): by chunk, each
    chunk's transcript rows (in time order), caption and summary; then the file summary."""
    order = {"transcript": 0, "caption": 1, "summary": 2}
    rows = [
        {"kind": e["kind"], "chunk": c.index, "start": e["start"], "end": e["end"], "reason": e["reason"]}
        for c in chunks
        for e in c.errors
    ]
    rows.sort(key=lambda row: (row["chunk"], order.get(row["kind"], 3), row["start"]))
    if summary.get("error"):
        rows.append({"kind": "file_summary", "chunk": None, "start": 0.0, "end": duration, "reason": summary["error"]})
    return rows


def partial_reason(failed: list[dict[str, Any]], total: int) -> str:
    """One line for ``omniq status`` and the events: how many rows failed and the first one's reason."""
    first = failed[0]
    where = f"chunk {first['chunk']}" if first["chunk"] is not None else "the file"
    span = f"{first['start']:.1f}-{first['end']:.1f} s"
    return f"{len(failed)} of {total} rows failed; first: the {first['kind']} of {where} ({span}): {first['reason']}"


def finalize(
    job_plan: JobPlan, storage: Storage, settings: Settings, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Assemble and write the result files; the manifest is written last and marks the job ``done``, or
    ``partial`` when rows failed for good (README "Partial results"; the work files are kept for a retry), or
    ``failed`` when every row did."""
    spec = job_plan.spec
    started = time.monotonic()
    chunks = [
        ChunkResult.from_dict(get_json(storage, f"{chunk_prefix(spec.job_id, c.index)}/result.json"))
        for c in job_plan.chunks
    ]
    summary = get_json(storage, f"{work_prefix(spec.job_id)}/summary.json")
    failed = failed_rows(chunks, summary, job_plan.info.duration_s)
    total = planned_rows(job_plan)
    if failed and len(failed) >= total:
        return write_failure(spec, storage, settings, f"every row failed; first: {failed[0]['reason']}", timings)
    segments = assemble.transcript_segments(chunks)
    subtitles = cues.build_cues(segments)
    language, language_by = _language(settings, storage, spec.job_id)
    transcriber = settings.transcriber_name
    # text from the random-weight test model says so in every document that has room for it (README "Results");
    # a transcript Whisper wrote is not that model's
    notice = RANDOM_NOTICE if summary.get("random_weights") else None
    if notice and transcriber == "whisper":
        notice = RANDOM_CAPTIONS_NOTICE.format(whisper=settings.whisper_model)
    transcript_notice = notice if transcriber != "whisper" else None
    marked = (lambda document: {"notice": notice, **document}) if notice else (lambda document: document)
    transcript = assemble.transcript_doc(segments, language, transcriber)
    documents: dict[str, bytes] = {
        "transcript.json": assemble.dumps(
            {"notice": transcript_notice, **transcript} if transcript_notice else transcript
        ),
        "transcript.srt": assemble.to_srt(subtitles).encode(),
        "transcript.vtt": assemble.to_vtt(subtitles, transcript_notice).encode(),
        "transcript.txt": assemble.to_txt(subtitles).encode(),
        "captions.json": assemble.dumps(marked(assemble.captions_doc(chunks))),
        "summary.json": assemble.dumps(marked(assemble.summary_doc(summary["summary"], chunks))),
    }
    prefix = results_prefix(spec.media_id)
    for name, data in documents.items():
        storage.put_bytes(f"{prefix}/{name}", data, CONTENT_TYPES[Path(name).suffix])
    all_timings = {**job_plan.timings, **(timings or {})}
    all_timings["model_s"] = round(sum(c.model_seconds for c in chunks) + float(summary.get("seconds", 0)), 3)
    all_timings["prepare_s"] = round(sum(c.prepare_seconds for c in chunks), 3)
    if any(c.asr_seconds for c in chunks):  # Whisper's time: transcribing, or aligning Qwen3-Omni's words
        all_timings["asr_s"] = round(sum(c.asr_seconds for c in chunks), 3)
    all_timings["finalize_s"] = round(time.monotonic() - started, 3)
    manifest = _base_manifest(spec, settings) | {
        "status": "partial" if failed else "done",
        "duration_s": job_plan.info.duration_s,
        "chunks": len(job_plan.chunks),
        "model": summary.get("model", spec.config.get("model")),
        "random_weights": bool(summary.get("random_weights")),
        "media": job_plan.info.to_dict(),
        "language": language,
        "language_by": language_by,
        "transcriber": transcriber,
        "whisper_model": settings.whisper_model if transcriber == "whisper" else None,
        # "words": each segment has its words' times; "utterances": only each segment's start and end
        "times": transcript["times"],
        "word_times": _word_times(settings, transcriber, language, transcript["times"], bool(segments)),
        "speech_s": round(sum(b - a for a, b in job_plan.speech or []), 3),
        "segments": len(segments),
        "cues": len(subtitles),
        "timings": all_timings,
        "tokens": sum(c.new_tokens for c in chunks),
        "error": partial_reason(failed, total) if failed else None,
        # README "Partial results": each row that failed for good, with its reason and time range
        "rows": {"total": total, "failed": len(failed)},
        "failed_rows": failed,
        "summary_chunks_missing": summary.get("chunks_missing") or [],
        "finished_at": now_iso(),
        "outputs": {name: storage.uri(f"{prefix}/{name}") for name in RESULT_FILES},
    }
    if notice:
        manifest["notice"] = notice
    # the results page, with thumbnails from each chunk's first frame (work/ still exists here)
    first_frames = _first_frames(storage, job_plan) if job_plan.frame_shape else {}
    viewer.write_viewer(storage, manifest, first_frames, settings)
    put_json(storage, f"{prefix}/manifest.json", manifest)
    if not settings.keep_work and not failed:  # a partial job keeps its packs and good rows for a retry
        storage.delete_prefix(work_prefix(spec.job_id))
    return manifest


def _word_times(settings: Settings, transcriber: str, language: str | None, times: str, speech: bool) -> str | None:
    """Who timed the transcript's words, or why nobody did (``None`` without speech)."""
    from pipeline.engines import whisper

    model = settings.whisper_model
    if not speech:
        return None
    if transcriber == "whisper":
        return f"whisper {model}"
    if times == "words":
        return f"aligned by whisper {model}"
    if not settings.align_words:
        return "none: utterance times only (OMNIQ_ALIGN_WORDS is off)"
    if not whisper.can_align(model, language):
        return (
            f"none: utterance times only (whisper {model} cannot align {language or 'an unknown language'}; "
            "set OMNIQ_WHISPER_MODEL to a multilingual model such as large-v3)"
        )
    return "none: utterance times only (the aligner found no words or could not run: see the GPU worker's log)"


def _language(settings: Settings, storage: Storage, job_id: str) -> tuple[str | None, str | None]:
    """The transcript's language and who said so: the setting, or what the GPU step detected
    (``infer.file_language``: Qwen3-Omni, Whisper, or an English-only Whisper model); None without speech."""
    if settings.language:
        return settings.language, "setting"
    key = language_key(job_id)
    if not storage.exists(key):
        return None, None
    record = get_json(storage, key)
    return record.get("language"), record.get("by", "omni")


def _first_frames(storage: Storage, job_plan: JobPlan) -> dict[int, bytes]:
    """Each chunk's first frame, read from its pack with one ranged GET (chunks without frames are left out)."""
    frames = {}
    for chunk in job_plan.chunks:
        try:
            frame = pack.read_first_frame(storage, pack_key(job_plan.spec.job_id, chunk.index))
        except SourceNotFound:
            continue  # a re-run after the work files were removed: the page is written without this thumbnail
        if frame is not None:
            frames[chunk.index] = frame
    return frames


def write_failure(
    spec: JobSpec,
    storage: Storage,
    settings: Settings,
    error: BaseException | str,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Record a failed job: a manifest with the reason, so status and results say why."""
    manifest = _base_manifest(spec, settings) | {
        "status": "failed",
        "error": error_text(error),
        "timings": timings or {},
        "finished_at": now_iso(),
        "outputs": {},
    }
    put_json(storage, f"{results_prefix(spec.media_id)}/manifest.json", manifest)
    if not settings.keep_work:
        storage.delete_prefix(work_prefix(spec.job_id))
    return manifest


def job_manifest(storage: Storage, media_id: str, job_id: str) -> dict[str, Any] | None:
    """The manifest this very job run wrote (done or failed), if it has written one."""
    key = f"{results_prefix(media_id)}/manifest.json"
    if not storage.exists(key):
        return None
    manifest = get_json(storage, key)
    return manifest if manifest.get("job_id") == job_id else None


def finished_manifest(storage: Storage, media_id: str, config_hash: str) -> dict[str, Any] | None:
    """The manifest of a finished (done) job for this media and config, if there is one."""
    key = f"{results_prefix(media_id)}/manifest.json"
    if not storage.exists(key):
        return None
    manifest = get_json(storage, key)
    if manifest.get("status") == "done" and manifest.get("config_hash") == config_hash:
        return manifest
    return None
