"""Job events: a Redis stream (``omniq:events``) that every change of a job is appended to, for the systems
downstream (an upload service, a CMS, a search front end) and for ``omniq events``.

The ``workers.state`` scripts append each event in the same atomic step as the change itself: ``queued`` when
a job is created, one event named after the new status at every status change (``ingesting``, ``running``,
``summarizing``, ``finalizing``, ``done``, ``partial``, ``failed``, ``cancelled``), and ``progress`` when a batch
of chunks is done. A ``partial`` event carries ``failed_rows`` (how many rows failed for good) and the first
one's reason in ``error``. A redelivered step that changes nothing appends nothing. The stream is capped near
``EVENTS_MAX_LENGTH`` entries; any reader can follow it with its own consumer group (``XREADGROUP``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis

from workers.state import EVENTS

ENDED = ("done", "partial", "failed", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    """One entry of the stream; ``id`` is the stream's entry id (time-ordered, ``<ms>-<n>``)."""

    id: str
    # queued | ingesting | running | progress | summarizing | finalizing | done | partial | failed | cancelled
    event: str
    job_id: str
    media_id: str
    source: str
    tag: str | None
    status: str
    error: str | None
    chunks_done: int
    chunks_total: int
    at: float  # seconds since the epoch
    failed_rows: int = 0  # a partial job's rows that failed for good

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> JobEvent:
        def number(name: str) -> float:
            try:
                return float(fields.get(name) or 0)
            except ValueError:
                return 0.0

        return cls(
            id=entry_id,
            event=fields.get("event", ""),
            job_id=fields.get("job_id", ""),
            media_id=fields.get("media_id", ""),
            source=fields.get("source", ""),
            tag=fields.get("tag") or None,
            status=fields.get("status", ""),
            error=fields.get("error") or None,
            chunks_done=int(number("chunks_done")),
            chunks_total=int(number("chunks_total")),
            at=number("at"),
            failed_rows=int(number("failed_rows")),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_events(
    client: redis.Redis, after: str = "0-0", count: int = 1000, block_ms: int | None = None
) -> list[JobEvent]:
    """Events after the entry id ``after`` (``0-0``: from the start), at most ``count``; with ``block_ms``,
    wait that long for the first one when there is none yet."""
    answer = client.xread({EVENTS: after}, count=count, block=block_ms)
    if not answer:
        return []
    (_, entries), *_ = answer
    return [JobEvent.from_entry(entry_id, fields) for entry_id, fields in entries]


def last_events(client: redis.Redis, count: int) -> list[JobEvent]:
    """The newest ``count`` events, oldest first."""
    entries = client.xrevrange(EVENTS, count=count)
    return [JobEvent.from_entry(entry_id, fields) for entry_id, fields in reversed(entries)]


def follow(client: redis.Redis, after: str, block_ms: int = 5000) -> Iterator[JobEvent]:
    """Every event after ``after``, as they come, for ever (the caller stops it)."""
    while True:
        for event in read_events(client, after, block_ms=block_ms):
            after = event.id
            yield event
