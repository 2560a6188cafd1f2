"""Enqueue files: name each job, skip finished ones, upload local files, send ``omniq.ingest``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline import job
from pipeline.config import Settings
from pipeline.errors import OmniqError
from pipeline.sources import local_path, resolve_source
from pipeline.storage import Storage
from workers.state import ACTIVE, JobState

log = logging.getLogger(__name__)


@dataclass
class Enqueued:
    source: str
    job_id: str | None
    status: str  # enqueued | skipped | rejected
    reason: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"source": self.source, "job_id": self.job_id, "status": self.status, "reason": self.reason}


def enqueue(
    sources: list[str], settings: Settings, storage: Storage, state: JobState, force: bool = False
) -> list[Enqueued]:
    """Enqueue each source; a finished job with the same content and config is skipped unless ``force``."""
    from workers.tasks import ingest

    outcomes = []
    for source in sources:
        try:
            ref = resolve_source(source, settings)
            spec = job.make_spec(source, settings, ref=ref)
            if not force:
                if job.finished_manifest(storage, spec.media_id, settings.config_hash()):
                    outcomes.append(Enqueued(ref.uri, spec.job_id, "skipped", "already done with this config"))
                    continue
                current = state.get(spec.job_id)
                if current and current["status"] in ACTIVE:
                    outcomes.append(Enqueued(ref.uri, spec.job_id, "skipped", f"already {current['status']}"))
                    continue
            if force:  # a forced re-run must not reuse chunk results of an earlier run
                storage.delete_prefix(job.work_prefix(spec.job_id))
            path = local_path(ref.uri)
            if path is not None and not storage.url.startswith("file:"):
                key = f"{job.work_prefix(spec.job_id)}/input/{ref.name}"
                storage.put_file(key, path)  # remote workers cannot read this machine's disk
                spec.input_uri = storage.uri(key)
            state.create(spec.job_id, spec.source, spec.media_id, spec.to_dict())
            ingest.apply_async(kwargs={"job_id": spec.job_id, "source": spec.source, "spec": spec.to_dict()})
            outcomes.append(Enqueued(ref.uri, spec.job_id, "enqueued"))
        except OmniqError as error:
            outcomes.append(Enqueued(source, None, "rejected", str(error)))
    return outcomes
