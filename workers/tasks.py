"""omniq's Celery tasks, and what the rest of omniq uses of them, gathered in one place: each step's task lives in
its own module under ``workers.steps`` (``ingest``, ``infer``, ``summarize``, ``finalize``; what they share in
``base``), this process's shared objects in ``workers.runtime``. Celery loads this module (``workers.app``).

Every message is one *unit* of a job (``ingest``, ``infer-<first chunk>``, ``summarize``, ``finalize``).
:class:`OmniqTask` holds the unit's lease while it runs (``workers.reliability.leases``), drops duplicates of units
that are done or held by a live worker, retries transient errors on a time budget and steps stopped at their
deadline, and ends a unit for good by failing its rows (a partial job) or its job.
"""

from __future__ import annotations

from workers import metrics
from workers.runtime import chunk_budget, engine, gpu_slots, leases, once, search_index, settings, state, storage
from workers.steps.base import (
    RUNS_IN,
    TRANSIENT,
    OmniqTask,
    broker_priority,
    lease_on_receipt,
    retry_delay,
    runs_shared,
    task_repr,
    unit_of,
)
from workers.steps.failures import fail_job, give_up, write_failure_manifest
from workers.steps.finalize import finalize
from workers.steps.flow import chunks_done, publish_unit
from workers.steps.infer import infer
from workers.steps.ingest import ingest
from workers.steps.summarize import summarize

__all__ = [
    "RUNS_IN",
    "TRANSIENT",
    "OmniqTask",
    "broker_priority",
    "chunk_budget",
    "chunks_done",
    "engine",
    "fail_job",
    "finalize",
    "give_up",
    "gpu_slots",
    "infer",
    "ingest",
    "lease_on_receipt",
    "leases",
    "metrics",
    "once",
    "publish_unit",
    "retry_delay",
    "runs_shared",
    "search_index",
    "settings",
    "state",
    "storage",
    "summarize",
    "task_repr",
    "unit_of",
    "write_failure_manifest",
]
