"""What names and describes a job: its spec (the message payload), its plan, and its storage keys."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import assemble
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.media.plan import Chunk
from pipeline.media.probe import MediaInfo
from pipeline.sources import SourceRef, job_id_for, resolve_source
from pipeline.storage import Storage


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
    # the file's utterances, [start, end] in seconds (speech detection at ingest); None: planned before it
    speech: list[list[float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "info": self.info.to_dict(),
            "chunks": [c.to_dict() for c in self.chunks],
            "fps": self.fps,
            "frame_shape": self.frame_shape,
            "timings": self.timings,
            "speech": self.speech,
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

    ``runs_model``: this worker runs the model, which must be the job's (each model has its own GPU queue,
    so this only fails for a worker started on another model's queue by hand).
    """
    wanted = {k: v for k, v in spec.config.items() if k in Settings.model_fields}
    if runs_model and spec.config.get("model") not in (None, settings.model):
        raise ConfigError(
            f"job {spec.job_id} was enqueued for model {spec.config.get('model')!r} but this worker runs "
            f"{settings.model!r}; start a worker with OMNIQ_MODEL={spec.config.get('model')}"
        )
    return settings.model_copy(update=wanted)


def put_json(storage: Storage, key: str, document: Any, *, if_changed: bool = True) -> None:
    storage.put_bytes(key, assemble.dumps(document), "application/json", if_changed=if_changed)


def get_json(storage: Storage, key: str) -> Any:
    return json.loads(storage.get_bytes(key))


def load_plan(storage: Storage, job_id: str) -> JobPlan:
    return JobPlan.from_dict(get_json(storage, f"{work_prefix(job_id)}/plan.json"))
