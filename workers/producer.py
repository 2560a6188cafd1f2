"""Enqueue media: discover sources, name each job, skip finished or running ones, publish in batches.

For large inputs (an S3 prefix of 10,000 objects) the costs are: one S3 listing request per 1,000 objects
(fingerprints come from the listing), one Redis round trip per 500 jobs to find finished/running ones, and
one broker connection for all messages. The store is read only for jobs Redis does not know.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from pipeline import job
from pipeline.config import Settings
from pipeline.discover import Discovered, Filters, discover
from pipeline.errors import OmniqError
from pipeline.sources import local_path
from pipeline.storage import Storage
from workers.state import ACTIVE, JobState

log = logging.getLogger(__name__)

BATCH = 500


@dataclass
class Enqueued:
    source: str
    job_id: str | None
    status: str  # enqueued | skipped | rejected
    reason: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"source": self.source, "job_id": self.job_id, "status": self.status, "reason": self.reason}


def _batches(items: Iterable[Discovered], size: int) -> Iterator[list[Discovered]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class _StoreCheck:
    """Finds finished jobs in the store for jobs Redis does not know (e.g. after Redis was replaced)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._with_manifest: set[str] | None = None

    def done(self, spec: job.JobSpec) -> bool:
        if self._with_manifest is None:  # one listing instead of one request per source
            self._with_manifest = {
                key.split("/")[1] for key in self.storage.list_keys("results") if key.endswith("/manifest.json")
            }
        if spec.media_id not in self._with_manifest:
            return False
        return job.finished_manifest(self.storage, spec.media_id, job.config_hash_of(spec.config)) is not None


def enqueue(
    sources: Iterable[str],
    settings: Settings,
    storage: Storage,
    state: JobState,
    *,
    force: bool = False,
    tag: str | None = None,
    priority: int = 5,
    filters: Filters | None = None,
    progress: Callable[[Enqueued], None] | None = None,
) -> list[Enqueued]:
    """Enqueue every source (files, directories, S3 prefixes); returns one outcome per discovered source.

    A job already done with the same content and config is skipped unless ``force``; a job that is queued
    or running is always skipped (forcing it would restart work in flight).
    """
    from workers.app import app
    from workers.tasks import ingest

    filters = filters or Filters(settings.media_extension_set())
    store_check = _StoreCheck(storage)
    outcomes: list[Enqueued] = []

    def record(outcome: Enqueued) -> None:
        outcomes.append(outcome)
        if progress:
            progress(outcome)

    seen: set[str] = set()
    with app.connection_for_write() as connection:
        for batch in _batches(discover(sources, settings, filters), BATCH):
            slots: list[Enqueued | None] = [None] * len(batch)  # outcomes in input order
            specs: list[tuple[int, job.JobSpec]] = []
            for position, item in enumerate(batch):
                if item.ref is None:
                    slots[position] = Enqueued(item.uri, None, "rejected", item.rejected)
                    continue
                spec = job.make_spec(item.uri, settings, ref=item.ref, tag=tag, priority=priority)
                if spec.job_id in seen:
                    slots[position] = Enqueued(spec.source, spec.job_id, "skipped", "given twice")
                    continue
                seen.add(spec.job_id)
                specs.append((position, spec))
            statuses = state.statuses([spec.job_id for _, spec in specs])
            to_publish: list[tuple[int, job.JobSpec]] = []
            for (position, spec), status in zip(specs, statuses, strict=True):
                if status in ACTIVE:
                    slots[position] = Enqueued(spec.source, spec.job_id, "skipped", f"already {status}")
                elif not force and (status == "done" or (status is None and store_check.done(spec))):
                    slots[position] = Enqueued(spec.source, spec.job_id, "skipped", "already done with this config")
                else:
                    try:
                        _prepare(spec, storage, force)
                        to_publish.append((position, spec))
                    except OmniqError as error:
                        slots[position] = Enqueued(spec.source, spec.job_id, "rejected", str(error))
            payloads = [spec.to_dict() for _, spec in to_publish]
            created = state.create_many(payloads)
            for (position, spec), payload, result in zip(to_publish, payloads, created, strict=True):
                if result != "created":  # another producer got there first
                    slots[position] = Enqueued(spec.source, spec.job_id, "skipped", f"already {result}")
                    continue
                ingest.publish(
                    spec.priority,
                    f"{spec.job_id}-ingest-{uuid.uuid4().hex[:8]}",  # readable in Flower, unique per run
                    connection=connection,  # one connection for the whole run
                    job_id=spec.job_id,
                    source=spec.source,
                    spec=payload,
                )
                slots[position] = Enqueued(spec.source, spec.job_id, "enqueued")
            for outcome in slots:
                assert outcome is not None
                record(outcome)
    return outcomes


def _prepare(spec: job.JobSpec, storage: Storage, force: bool) -> None:
    """Make the source readable by every worker; a forced run starts without an earlier run's chunks."""
    if force:
        storage.delete_prefix(job.work_prefix(spec.job_id))
    path = local_path(spec.source)
    if path is not None and not storage.url.startswith("file:"):
        key = f"{job.work_prefix(spec.job_id)}/input/{path.name}"
        storage.put_file(key, path)  # remote workers cannot read this machine's disk
        spec.input_uri = storage.uri(key)
