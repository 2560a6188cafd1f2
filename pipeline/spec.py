"""What names and describes a job: its spec (the message payload), its plan, and its storage keys."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from pipeline.config import CONFIG_KEYS, OUTPUT_SETTINGS, Settings, config_hash_of
from pipeline.errors import ConfigError, MalformedMessage
from pipeline.media.plan import Chunk
from pipeline.media.probe import MediaInfo
from pipeline.results import assemble
from pipeline.sources import SourceRef, job_id_for, local_path, resolve_source
from pipeline.storage import Storage

MAX_TAG_LENGTH = 200
_MAX_TEXT = 4096  # URIs, ids and fingerprints
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REQUIRED = frozenset({"job_id", "media_id", "source", "input_uri", "fingerprint", "config"})


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
    run_id: str | None = None  # one enqueue of the job (a forced re-run gets a new one); in the manifest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """A spec from a message, a job record or a plan, checked as omniq writes them: the known fields with
        their types, only output-shaping settings in ``config``, and ids that follow from the content (the
        media id from the source and its fingerprint, the job id from the media id and the config). Raises
        :class:`MalformedMessage` naming what is wrong."""
        if not isinstance(data, dict):
            raise MalformedMessage(f"a job spec must be a JSON object, not {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(data) - names, _REQUIRED - set(data)
        if unknown or missing:
            raise MalformedMessage(f"job spec fields: unknown {sorted(unknown)[:5]}, missing {sorted(missing)}")
        for name in _REQUIRED - {"config"}:
            if not isinstance(data[name], str) or not data[name] or len(data[name]) > _MAX_TEXT:
                raise MalformedMessage(f"job spec field {name!r} must be a non-empty string")
        config = data["config"]
        if not isinstance(config, dict) or not set(config) <= CONFIG_KEYS:
            extra = sorted(set(config) - CONFIG_KEYS) if isinstance(config, dict) else []
            raise MalformedMessage(f"job spec config may hold only output-shaping settings; not {extra[:5]}")
        if not all(value is None or isinstance(value, str | int | float) for value in config.values()):
            raise MalformedMessage("job spec config values must be strings, numbers or null")
        tag, run_id, priority = data.get("tag"), data.get("run_id"), data.get("priority", 5)
        if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG_LENGTH or not tag.isprintable()):
            raise MalformedMessage(f"job spec tag must be printable text of at most {MAX_TAG_LENGTH} characters")
        if run_id is not None and (not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id)):
            raise MalformedMessage("job spec run_id must be at most 64 letters, digits, '-' or '_'")
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
            raise MalformedMessage("job spec priority must be an integer from 0 to 9")
        spec = cls(**data)
        named = SourceRef(spec.source, spec.fingerprint, 0).media_id
        if spec.media_id != named or spec.job_id != job_id_for(named, config_hash_of(config)):
            raise MalformedMessage(
                f"job spec ids do not follow from its source, fingerprint and config (job {spec.job_id[:40]!r})"
            )
        return spec


@dataclass
class JobPlan:
    """The outcome of ingest, stored at ``work/<job>/plan.json`` for the later steps."""

    spec: JobSpec
    info: MediaInfo
    chunks: list[Chunk]
    fps: float
    frame_shape: list[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # the file's utterances, [start, end] in seconds (speech detection at ingest); None: planned before it
    speech: list[list[float]] | None = None
    # chunks whose failed rows this run runs again (their good rows are kept: ``infer.reopen_failed``)
    reopened: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "info": self.info.to_dict(),
            "chunks": [c.to_dict() for c in self.chunks],
            "fps": self.fps,
            "frame_shape": self.frame_shape,
            "timings": self.timings,
            "speech": self.speech,
            "reopened": self.reopened,
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
            data.get("speech"),
            [int(i) for i in data.get("reopened") or []],
        )


def work_prefix(job_id: str) -> str:
    return f"work/{job_id}"


def chunk_prefix(job_id: str, index: int) -> str:
    return f"work/{job_id}/chunks/{index:05d}"


def language_key(job_id: str) -> str:
    """The file's detected language (``infer.file_language``), read again by later units and by finalize."""
    return f"{work_prefix(job_id)}/language.json"


def pack_key(job_id: str, index: int) -> str:
    """The one object that holds a chunk's frames, audio and metadata (``pipeline.media.pack``)."""
    return f"{chunk_prefix(job_id, index)}/media.pack"


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
    if tag is not None and (len(tag) > MAX_TAG_LENGTH or not tag.isprintable()):
        raise ConfigError(f"--tag {tag[:40]!r}...: a tag is printable text of at most {MAX_TAG_LENGTH} characters")
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


def settings_for(spec: JobSpec, settings: Settings, *, runs_model: bool = False) -> Settings:
    """The worker's settings with the job's output-shaping config applied (the job was named with it).

    Only ``OUTPUT_SETTINGS`` come from the job, validated as the environment's are; endpoints, credentials,
    limits and paths stay the worker's own. ``runs_model``: this worker runs the model, which must be the
    job's (each model has its own GPU queue, so this only fails for a worker started on another model's
    queue by hand).
    """
    wanted = {k: v for k, v in spec.config.items() if k in OUTPUT_SETTINGS}
    if runs_model and spec.config.get("model") not in (None, settings.model):
        raise ConfigError(
            f"job {spec.job_id} was enqueued for model {spec.config.get('model')!r} but this worker runs "
            f"{settings.model!r}; start a worker with OMNIQ_MODEL={spec.config.get('model')}"
        )
    whisper_model = spec.config.get("whisper_model")
    if (
        runs_model
        and spec.config.get("transcriber") == "whisper"
        and whisper_model not in (None, settings.whisper_model)
    ):
        # the worker loads only the Whisper model it was started with (a message cannot name a folder to load)
        raise ConfigError(
            f"job {spec.job_id} was enqueued for whisper model {whisper_model!r} but this worker runs "
            f"{settings.whisper_model!r}; start GPU workers with OMNIQ_WHISPER_MODEL={whisper_model}"
        )
    try:
        return Settings.model_validate({**settings.model_dump(), **wanted})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise MalformedMessage(f"job {spec.job_id}: its settings are not valid ({problems})") from error


def staged_input_key(job_id: str, name: str) -> str:
    """Where the producer puts a local source's bytes in the store for the workers (a link or a copy)."""
    return f"{work_prefix(job_id)}/input/{name}"


def check_input(spec: JobSpec, settings: Settings, storage: Storage) -> None:
    """Refuse to read a job's input from anywhere omniq did not put it or the user did not allow.

    The input is the source itself or its staged copy in the store (else :class:`MalformedMessage`). S3
    sources are read with the worker's credentials, which IAM scopes; a local source is read only from under
    ``OMNIQ_LOCAL_SOURCE_ROOTS`` (by its real path), else :class:`ConfigError` saying what to set.
    """
    if not check_input_location(spec, storage):
        check_local_root(spec, settings)


def check_input_location(spec: JobSpec, storage: Storage) -> bool:
    """True when the input is the source's copy staged in the store; False when it is the source itself.
    Raises :class:`MalformedMessage` for anything else."""
    source_path = local_path(spec.source)  # only local sources are staged, under their own name
    if source_path is not None and spec.input_uri == storage.uri(staged_input_key(spec.job_id, source_path.name)):
        return True
    if spec.input_uri != spec.source:
        raise MalformedMessage(
            f"job {spec.job_id}: its input {spec.input_uri[:200]!r} is neither its source nor its copy in the store"
        )
    if local_path(spec.input_uri) is None and not spec.input_uri.startswith("s3://"):
        raise MalformedMessage(f"job {spec.job_id}: unsupported input {spec.input_uri[:200]!r}")
    return False


def check_local_root(spec: JobSpec, settings: Settings) -> None:
    """A local source outside ``OMNIQ_LOCAL_SOURCE_ROOTS`` is a :class:`ConfigError` saying what to set."""
    path = local_path(spec.input_uri)
    if path is None:
        return
    if not settings.allows_local_source(path):
        allowed = ", ".join(map(str, settings.local_source_paths())) or "none"
        raise ConfigError(
            f"{spec.source}: this worker reads local files only from its store and OMNIQ_LOCAL_SOURCE_ROOTS "
            f"(now: {allowed}); add the file's folder to OMNIQ_LOCAL_SOURCE_ROOTS on the workers, or enqueue it "
            "again with a producer that stages it in the store"
        )


def put_json(storage: Storage, key: str, document: Any, *, if_changed: bool = True) -> None:
    storage.put_bytes(key, assemble.dumps(document), "application/json", if_changed=if_changed)


def get_json(storage: Storage, key: str) -> Any:
    return json.loads(storage.get_bytes(key))


def load_plan(storage: Storage, job_id: str) -> JobPlan:
    return JobPlan.from_dict(get_json(storage, f"{work_prefix(job_id)}/plan.json"))
