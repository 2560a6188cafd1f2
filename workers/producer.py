"""Enqueue media: discover sources, name each job, skip finished or running ones, publish in batches.

For large inputs (an S3 prefix of 10,000 objects) the costs are: one S3 listing request per 1,000 objects
(fingerprints come from the listing), one Redis round trip per 500 jobs to find finished/running ones, and
one broker connection for all messages. The store is read only for jobs Redis does not know.

Each batch of jobs is recorded in the store (``work/_enqueued/<batch>.json``, one request) before their state is
created and their messages sent; the watchdog sends the message of a job that is ``queued`` but was never sent
(a producer that died between the two), and ``omniq recover`` rebuilds jobs from the store if Redis loses its
data.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

from pipeline import job
from pipeline.config import Settings
from pipeline.discover import Discovered, Filters, discover
from pipeline.errors import OmniqError
from pipeline.sources import local_path
from pipeline.storage import LocalStorage, Storage
from workers.reliability.leases import Leases
from workers.reliability.recovery import INGEST
from workers.reliability.restore import record_batch
from workers.reliability.watchdog import is_stale
from workers.state import ACTIVE, JobState

log = logging.getLogger(__name__)

BATCH = 500
PREPARE_THREADS = 16


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
    ignored: list[str] | None = None,
) -> list[Enqueued]:
    """Enqueue every source (files, directories, S3 prefixes); returns one outcome per discovered source.

    A job already done with the same content and config is skipped unless ``force``; a job that is queued
    or running is skipped, unless ``force`` and no worker has held it for a lease period (then it restarts).
    Files of directories and prefixes that the filters leave out are added to ``ignored``.
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
    leases = Leases(state, settings.lease_seconds, settings.lease_renew_seconds)
    with app.connection_for_write() as connection, ThreadPoolExecutor(PREPARE_THREADS) as pool:
        for batch in _batches(discover(sources, settings, filters, ignored), BATCH):
            slots: list[Enqueued | None] = [None] * len(batch)  # outcomes in input order
            specs: list[tuple[int, job.JobSpec]] = []
            for position, item in enumerate(batch):
                if item.ref is None:
                    slots[position] = Enqueued(item.uri, None, "rejected", item.rejected)
                    continue
                spec = job.make_spec(item.uri, settings, ref=item.ref, tag=tag, priority=priority)
                spec.run_id = uuid.uuid4().hex[:12]
                if spec.job_id in seen:
                    slots[position] = Enqueued(spec.source, spec.job_id, "skipped", "given twice")
                    continue
                seen.add(spec.job_id)
                specs.append((position, spec))
            statuses = state.statuses([spec.job_id for _, spec in specs])
            candidates: list[tuple[int, job.JobSpec]] = []
            forced: set[str] = set()
            for (position, spec), status in zip(specs, statuses, strict=True):
                if status in ACTIVE:
                    if not (force and is_stale(state, leases, spec.job_id, settings)):
                        slots[position] = Enqueued(spec.source, spec.job_id, "skipped", f"already {status}")
                        continue
                    forced.add(spec.job_id)  # no worker holds it and it made no progress: restart it
                elif not force and (status == "done" or (status is None and store_check.done(spec))):
                    slots[position] = Enqueued(spec.source, spec.job_id, "skipped", "already done with this config")
                    continue
                candidates.append((position, spec))
            # uploads (local sources to a remote store) in parallel: each is a request of its own
            errors = list(pool.map(lambda pair: _prepare(pair[1], storage, settings, force), candidates))
            to_publish: list[tuple[int, job.JobSpec]] = []
            for (position, spec), error in zip(candidates, errors, strict=True):
                if error is None:
                    to_publish.append((position, spec))
                else:
                    slots[position] = Enqueued(spec.source, spec.job_id, "rejected", str(error))
            payloads = [spec.to_dict() for _, spec in to_publish]
            if payloads:  # the store knows the batch before Redis does: a Redis that loses it loses no job
                record_batch(storage, payloads)
            created = state.create_many(payloads, forced)
            sent: list[tuple[str, str, None]] = []
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
                sent.append((spec.job_id, INGEST, None))
                slots[position] = Enqueued(spec.source, spec.job_id, "enqueued")
            # a crash before this line leaves jobs 'queued' without 'sent': the watchdog sends them
            state.mark_sent(sent)
            for outcome in slots:
                assert outcome is not None
                record(outcome)
    return outcomes


def _prepare(spec: job.JobSpec, storage: Storage, settings: Settings, force: bool) -> OmniqError | None:
    """Make the source readable by every worker; a forced run starts without an earlier run's files."""
    try:
        if force:
            storage.delete_prefix(job.work_prefix(spec.job_id))
        path = local_path(spec.source)
        if path is not None and not settings.allows_local_source(path):
            # workers read local files only from their store and OMNIQ_LOCAL_SOURCE_ROOTS (README "Security"),
            # and remote workers cannot read this machine's disk at all
            key = job.staged_input_key(spec.job_id, path.name)
            if isinstance(storage, LocalStorage):
                storage.link_file(key, path)
            else:
                storage.put_file(key, path)
            spec.input_uri = storage.uri(key)
    except OmniqError as error:
        return error
    return None
