"""Messages a worker fetched from Redis but never started: it died between the two.

kombu's Redis transport puts a message into its ``unacked`` hash (and the delivery time into
``unacked_index``) as it hands it to a worker, and gives it back to the queue only after the visibility
timeout (hours). A worker takes a unit's lease within milliseconds of receiving its message (a GPU worker on
receipt, ``tasks.lease_on_receipt``; a media worker when a process starts it), so a message delivered longer
than a lease period ago whose unit is not started, not leased, not done and not waiting to retry was fetched
by a worker that died before it could take the lease. The watchdog sends such a unit again and removes the
stranded copy (an acknowledgement of it later is a no-op).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import redis

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's Redis transport's keys
SIGNED = "application/data"  # Celery's auth serializer (OMNIQ_SIGNING_*): a signed JSON body


@dataclass
class Delivery:
    """One unacknowledged omniq message."""

    tag: str
    task: str
    kwargs: dict[str, Any]
    delivered_at: float = 0.0

    @property
    def job_id(self) -> str:
        return str(self.kwargs["job_id"])


def parse_delivery(tag: str, raw: str | bytes) -> Delivery | None:
    """The task and arguments of a stored message (``None`` for anything that is not an omniq task)."""
    try:
        message = json.loads(raw)[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        if message.get("content-type") == SIGNED:  # signer, signature, type, encoding, then the JSON body
            body = base64.b64decode(body).split(b"\x00\x01", 4)[4]  # only to name the unit: not trusted
        _, kwargs, _ = json.loads(body)
        task = message["headers"]["task"]
        if not str(task).startswith("omniq.") or "job_id" not in kwargs:
            return None
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return Delivery(str(tag), str(task), kwargs)


def stale_deliveries(client: redis.Redis, delivered_before: float, limit: int = 500) -> list[Delivery]:
    """omniq messages handed to a worker before ``delivered_before`` and not acknowledged since."""
    scored = client.zrangebyscore(UNACKED_INDEX, 0, delivered_before, start=0, num=limit, withscores=True)
    if not scored:
        return []
    raws = client.hmget(UNACKED, [tag for tag, _ in scored])
    found = []
    for (tag, when), raw in zip(scored, raws, strict=True):
        if raw and (delivery := parse_delivery(tag, raw)):
            delivery.delivered_at = float(when)
            found.append(delivery)
    return found


def in_flight(client: redis.Redis) -> list[Delivery]:
    """Every omniq message a worker holds now (fetched, not acknowledged): being run, waiting in a worker, or
    about to go back to its queue (a worker that stops hands its messages back from here)."""
    return [d for tag, raw in client.hgetall(UNACKED).items() if (d := parse_delivery(tag, raw))]


def forget(client: redis.Redis, tag: str) -> None:
    """Remove a stranded copy, so that kombu does not deliver it again after the visibility timeout."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hdel(UNACKED, tag)
        pipe.zrem(UNACKED_INDEX, tag)
        pipe.execute()
