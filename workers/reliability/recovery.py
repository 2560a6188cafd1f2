"""What the watchdog does about a job, decided from its state alone (pure: no Redis, no Celery).

A job's units of work (``ingest``, ``infer-<first chunk>``, ``summarize``, ``finalize``) each record when
they were sent, started and finished. :func:`decide` finds the ones that a dead worker or a dead producer
left behind and says what to do: re-publish them, or fail the job when the same unit has killed its worker
``max_deaths`` times while it ran alone there (a death beside other units may be another unit's fault; the
GPU worker runs such a unit alone next time). Work that is merely waiting in a queue is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.state import ACTIVE

INGEST, SUMMARIZE, FINALIZE = "ingest", "summarize", "finalize"


@dataclass
class UnitView:
    """One unit as the watchdog sees it."""

    name: str
    sent: float | None = None
    started: str | None = None  # the raw value, so an abandon can check it has not changed meanwhile
    done: bool = False
    deaths: int = 0  # deaths while it ran alone in its worker (its own fault)
    chunks: list[int] | None = None
    retry_at: float | None = None
    holder: str | None = None  # the live lease's holder; None when nobody holds it
    shared: bool = False  # it runs (or ran last) beside other units in one worker: a death may be another's


@dataclass
class JobView:
    job_id: str
    status: str
    created_at: float
    updated_at: float
    chunks_total: int = 0
    chunks_done: set[int] = field(default_factory=set)
    units: dict[str, UnitView] = field(default_factory=dict)

    def unit(self, name: str) -> UnitView:
        return self.units.get(name) or UnitView(name)


@dataclass
class Action:
    """``publish`` a unit (``chunks`` for an infer batch), or ``abandon`` a started unit whose worker died
    and then publish it again, or fail the job with ``reason`` when it died too often."""

    kind: str  # publish | abandon
    unit: str
    chunks: list[int] | None = None
    started: str = ""  # abandon: the 'started' value seen
    fail_reason: str | None = None  # abandon: fail the job instead of publishing again
    why: str = ""


def parse_units(fields: dict[str, str], holders: dict[str, str | None] | None = None) -> dict[str, UnitView]:
    """Unit views from the raw ``<unit>:<field>`` hash (see ``JobState.units``) and live lease holders."""
    units: dict[str, UnitView] = {}
    for key, value in fields.items():
        name, _, part = key.rpartition(":")
        unit = units.setdefault(name, UnitView(name))
        if part == "sent":
            unit.sent = float(value)
        elif part == "started":
            unit.started = value
        elif part == "done":
            unit.done = True
        elif part == "deaths":
            unit.deaths = int(value)
        elif part == "shared":
            unit.shared = value == "1"
        elif part == "chunks":
            unit.chunks = [int(c) for c in value.split(",") if c]
        elif part == "retry_at":
            unit.retry_at = float(value)
    for name, holder in (holders or {}).items():
        units.setdefault(name, UnitView(name)).holder = holder
    return units


def describe(unit: str, chunks: list[int] | None) -> str:
    """What a unit does, for messages: ``processing chunks 4-7`` (with an en dash), ``ingesting``."""
    if unit == INGEST:
        return "ingesting (probe, decode, split)"
    if unit == SUMMARIZE:
        return "writing the file summary"
    if unit == FINALIZE:
        return "finalizing (writing the result files)"
    if not chunks:
        return f"processing {unit}"
    if chunks == list(range(chunks[0], chunks[-1] + 1)):
        if len(chunks) == 1:
            return f"processing chunk {chunks[0]}"
        return f"processing chunks {chunks[0]}–{chunks[-1]}"  # noqa: RUF001 - a range, typeset
    return "processing chunks " + ", ".join(str(c) for c in chunks)


def decide(
    job: JobView, now: float, *, max_deaths: int, lease_seconds: float, publish_grace_seconds: float
) -> list[Action]:
    """The actions that bring a stalled job back; none for a healthy or finished one."""
    if job.status not in ACTIVE:
        return []
    actions: list[Action] = []
    for unit in job.units.values():
        if unit.done or unit.holder:
            continue
        if unit.started:  # a worker took it and its lease is gone: the worker died (or was cut off)
            deaths = unit.deaths + (0 if unit.shared else 1)
            reason = None
            if deaths >= max_deaths and not unit.shared:
                reason = f"worker died {deaths} times while {describe(unit.name, unit.chunks)}"
            actions.append(
                Action("abandon", unit.name, _missing(unit, job), unit.started, reason, "its worker stopped renewing")
            )
        elif unit.retry_at is not None and now > unit.retry_at + lease_seconds:
            # a retry is due and nobody started it: the worker holding the delayed message died
            actions.append(Action("publish", unit.name, _missing(unit, job), why="its retry was not picked up"))
    ingest = job.unit(INGEST)
    if (
        job.status == "queued"
        and ingest.sent is None
        and not ingest.started
        and ingest.retry_at is None
        and now - job.created_at > publish_grace_seconds
    ):
        actions.append(Action("publish", INGEST, why="its message was never published"))
    busy = any(u.started or u.holder for u in job.units.values())
    quiet = now - job.updated_at > publish_grace_seconds
    if not busy and quiet and ingest.done and job.chunks_total and len(job.chunks_done) >= job.chunks_total:
        # safety nets for a successor whose sending was lost (e.g. writes lost in a Redis crash)
        summary, final = job.unit(SUMMARIZE), job.unit(FINALIZE)
        if summary.sent is None and not summary.done:
            actions.append(Action("publish", SUMMARIZE, why="all chunks are done but it was never sent"))
        elif summary.done and final.sent is None and not final.done:
            actions.append(Action("publish", FINALIZE, why="the summary is done but it was never sent"))
    return actions


def _missing(unit: UnitView, job: JobView) -> list[int] | None:
    """An infer batch's chunks that are not done yet (all of them when every one is done, so the unit runs
    to its end and sends what follows it)."""
    if unit.chunks is None:
        return None
    missing = [c for c in unit.chunks if c not in job.chunks_done]
    return missing or list(unit.chunks)
