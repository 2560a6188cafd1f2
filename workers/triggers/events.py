"""S3 event notifications in the shapes real deployments send, reduced to one ``ObjectEvent`` type.

Pure code (no network): ``parse_message`` reads raw S3 events, SNS envelopes, EventBridge events and MinIO
webhook bodies; ``KeyFilter`` says which objects are media to enqueue; ``handle_events`` dedupes a batch
and hands the rest to an ``enqueue_fn``. The SQS listener, the webhook and the Lambda handler in
``workers.triggers`` are thin adapters around these three.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol
from urllib.parse import unquote_plus

from pipeline.config import Settings
from pipeline.errors import ConfigError, PermanentError
from pipeline.storage import bucket_problem, split_s3_uri

log = logging.getLogger(__name__)

# How EventBridge names the operation (detail.reason) vs the S3 notification event name suffix.
_EVENTBRIDGE_REASONS = {
    "PutObject": "Put",
    "POST Object": "Post",
    "CopyObject": "Copy",
    "CompleteMultipartUpload": "CompleteMultipartUpload",
}
# Outcomes after which an event needs nothing more; "rejected" and "failed" are worth another delivery.
DONE = frozenset({"enqueued", "skipped", "ignored"})


class MalformedEvent(PermanentError):
    """A message that is not an S3 event notification omniq can read; redelivering it cannot help."""


@dataclass(frozen=True)
class ObjectEvent:
    """One object-level event: which object, what happened to it, and the content it named."""

    bucket: str
    key: str  # decoded: exactly the object's key
    event_name: str  # normalised without the "s3:" prefix, e.g. "ObjectCreated:Put"
    size: int | None = None
    etag: str | None = None  # without quotes
    sequencer: str | None = None
    shape: str = "s3"  # s3 | minio | eventbridge, prefixed "sns/" when it came in an SNS envelope

    @property
    def is_created(self) -> bool:
        return self.event_name.startswith("ObjectCreated:")

    @property
    def uri(self) -> str:
        """The ``s3://`` URI to enqueue: keys go in verbatim (``pipeline.storage.split_s3_uri`` takes them so),
        and the bucket was checked by S3's naming rules when the event was parsed."""
        return f"s3://{self.bucket}/{self.key}"


class Outcome(Protocol):
    """What ``workers.producer.enqueue`` returns per source (``Enqueued``)."""

    source: str
    job_id: str | None
    status: str
    reason: str | None


EnqueueFn = Callable[[list[str]], Sequence[Outcome]]


@dataclass(frozen=True)
class EventOutcome:
    """What became of one event: ``ignored`` (filtered), the producer's status, or ``failed`` (it raised)."""

    event: ObjectEvent
    status: str  # ignored | enqueued | skipped | rejected | failed
    reason: str | None = None
    job_id: str | None = None

    @property
    def done(self) -> bool:
        return self.status in DONE

    def to_dict(self) -> dict[str, object]:
        return {
            "bucket": self.event.bucket,
            "key": self.event.key,
            "event": self.event.event_name,
            "status": self.status,
            "job_id": self.job_id,
            "reason": self.reason,
        }


# -- parsing ------------------------------------------------------------------------------------------


def parse_message(body: str | bytes | dict[str, Any]) -> list[ObjectEvent]:
    """The object events in one message body; ``[]`` for test events and SNS subscription messages.

    Raises ``MalformedEvent`` with the reason when the body is not JSON or not an S3 notification.
    """
    if isinstance(body, str | bytes):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise MalformedEvent(f"body is not JSON ({type(error).__name__}: {error})") from error
    if not isinstance(body, dict):
        raise MalformedEvent(f"body is a JSON {type(body).__name__}, not an object")
    return _parse(body, wrapper="")


def _parse(body: dict[str, Any], wrapper: str) -> list[ObjectEvent]:
    kind = body.get("Type")
    if kind is not None and "TopicArn" in body:
        return _parse_sns(body, kind)
    if body.get("Event") == "s3:TestEvent":
        log.info("ignoring the s3:TestEvent S3 sent for bucket %r", body.get("Bucket"))
        return []
    if body.get("source") == "aws.s3" and "detail-type" in body:
        return [_parse_eventbridge(body, wrapper)]
    records = body.get("Records")
    if records is not None:
        if not isinstance(records, list):
            raise MalformedEvent("'Records' is not a list")
        minio = "EventName" in body
        events: list[ObjectEvent] = []
        for index, record in enumerate(records):
            if isinstance(record, dict) and isinstance(record.get("Sns"), dict):  # SNS -> Lambda
                events += _parse_sns(record["Sns"], record["Sns"].get("Type", "Notification"))
            else:
                events.append(_parse_record(record, index, wrapper, minio))
        return events
    if isinstance(body.get("EventName"), str) and isinstance(body.get("Key"), str):
        return [_parse_minio_key(body, wrapper)]
    raise MalformedEvent(
        "not an S3 event notification: expected 'Records', an SNS 'Notification', an EventBridge event from "
        f"'aws.s3' or an s3:TestEvent; got the fields {sorted(body)[:10]}"
    )


def _parse_sns(envelope: dict[str, Any], kind: str) -> list[ObjectEvent]:
    if kind in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        log.warning(
            "ignoring an SNS %s from topic %s: confirm the subscription in SNS (or subscribe the queue with "
            "`aws sns subscribe`), which SQS subscriptions in the same account do by themselves",
            kind,
            envelope.get("TopicArn"),
        )
        return []
    if kind != "Notification":
        raise MalformedEvent(f"SNS message of type {kind!r}; only 'Notification' carries S3 events")
    message = envelope.get("Message")
    if not isinstance(message, str):
        raise MalformedEvent("SNS Notification without a 'Message' string")
    try:
        inner = json.loads(message)
    except (json.JSONDecodeError, RecursionError) as error:
        raise MalformedEvent(f"the SNS Message is not JSON ({error})") from error
    if not isinstance(inner, dict):
        raise MalformedEvent("the SNS Message is not a JSON object")
    return _parse(inner, wrapper="sns/")


def _parse_record(record: Any, index: int, wrapper: str, minio: bool) -> ObjectEvent:
    where = f"Records[{index}]"
    if not isinstance(record, dict):
        raise MalformedEvent(f"{where} is not an object")
    name = record.get("eventName")
    s3 = record.get("s3")
    if not isinstance(name, str) or not isinstance(s3, dict):
        raise MalformedEvent(f"{where} has no 'eventName' and 's3' (source {record.get('eventSource')!r})")
    bucket = _bucket(_field(s3, ("bucket", "name"), f"{where}.s3.bucket.name"), f"{where}.s3.bucket.name")
    obj = s3.get("object") if isinstance(s3.get("object"), dict) else {}
    key = _field(s3, ("object", "key"), f"{where}.s3.object.key")
    source = str(record.get("eventSource", ""))
    return ObjectEvent(
        bucket=bucket,
        key=unquote_plus(key),  # S3 and MinIO both form-encode keys in records ('+' is a space)
        event_name=_normalise(name),
        size=_size(obj.get("size"), f"{where}.s3.object.size"),
        etag=_etag(obj.get("eTag") or obj.get("etag")),
        sequencer=_text(obj.get("sequencer")),
        shape=wrapper + ("minio" if minio or source.startswith("minio") else "s3"),
    )


def _parse_eventbridge(body: dict[str, Any], wrapper: str) -> ObjectEvent:
    detail = body.get("detail")
    if not isinstance(detail, dict):
        raise MalformedEvent("EventBridge event without a 'detail' object")
    obj = detail.get("object") if isinstance(detail.get("object"), dict) else {}
    detail_type = str(body["detail-type"])
    if detail_type == "Object Created":
        name = "ObjectCreated:" + _EVENTBRIDGE_REASONS.get(str(detail.get("reason")), "*")
    else:  # "Object Deleted", "Object Tags Added", ...: named so that is_created is False
        name = detail_type.replace(" ", "")
    return ObjectEvent(
        bucket=_bucket(_field(detail, ("bucket", "name"), "detail.bucket.name"), "detail.bucket.name"),
        key=_field(detail, ("object", "key"), "detail.object.key"),  # EventBridge keys are not encoded
        event_name=name,
        size=_size(obj.get("size"), "detail.object.size"),
        etag=_etag(obj.get("etag") or obj.get("eTag")),
        sequencer=_text(obj.get("sequencer")),
        shape=wrapper + "eventbridge",
    )


def _parse_minio_key(body: dict[str, Any], wrapper: str) -> ObjectEvent:
    bucket, _, key = str(body["Key"]).partition("/")
    if not bucket or not key:
        raise MalformedEvent(f"MinIO 'Key' {body['Key']!r} is not 'bucket/key'")
    return ObjectEvent(_bucket(bucket, "Key"), key, _normalise(str(body["EventName"])), shape=wrapper + "minio")


def _bucket(name: str, field: str) -> str:
    """A bucket name by S3's rules: one with '/' or ':' would make the URI name another bucket, a store key
    or no S3 object at all, and no redelivery can fix that."""
    problem = bucket_problem(name)
    if problem is not None:
        raise MalformedEvent(f"{field}: {problem}")
    return name


def _field(container: dict[str, Any], path: tuple[str, str], name: str) -> str:
    inner = container.get(path[0])
    value = inner.get(path[1]) if isinstance(inner, dict) else None
    if not isinstance(value, str) or not value:
        raise MalformedEvent(f"{name} is missing or not a string")
    return value


def _size(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise MalformedEvent(f"{name} is not a number: {value!r}")
    try:
        return int(value)
    except ValueError as error:
        raise MalformedEvent(f"{name} is not a number: {value!r}") from error


def _etag(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip('"') or None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _normalise(event_name: str) -> str:
    return event_name.removeprefix("s3:")


# -- filtering ----------------------------------------------------------------------------------------


def _split(prefixes: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in prefixes.split(",") if p.strip())


@dataclass(frozen=True)
class KeyFilter:
    """Which created objects are media to enqueue; everything else is ignored with a reason."""

    extensions: frozenset[str]
    include: tuple[str, ...] = ()  # key prefixes; empty means every key
    exclude: tuple[str, ...] = ()
    own: tuple[tuple[str, str], ...] = ()  # (bucket, key prefix) pairs omniq itself writes to
    buckets: frozenset[str] = frozenset()  # the buckets events may come from; empty means any

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyFilter:
        """Extensions and prefixes from the settings, plus omniq's own S3 store: the chunk audio it writes
        there is media too, and enqueueing it would feed omniq its own output forever."""
        own: tuple[tuple[str, str], ...] = ()
        if settings.storage_url.startswith("s3://"):
            bucket, prefix = split_s3_uri(settings.storage_url, key_required=False)  # as open_storage reads it
            prefix = prefix.strip("/")
            own = ((bucket, f"{prefix}/"),) if prefix else ((bucket, "work/"), (bucket, "results/"))
        return cls(
            settings.media_extension_set(),
            _split(settings.trigger_include_prefixes),
            _split(settings.trigger_exclude_prefixes),
            own,
            frozenset(_split(settings.trigger_buckets)),
        )

    def skip_reason(self, event: ObjectEvent) -> str | None:
        """Why this event enqueues nothing, or None when its object should be enqueued.

        Every test reads the bucket and key back from the URI that would be enqueued, so that what is
        filtered is exactly what a worker would read."""
        if not event.is_created:
            return f"{event.event_name} is not an object creation"
        try:
            bucket, key = split_s3_uri(event.uri)
        except ConfigError as error:
            return f"not an S3 object omniq can read ({error})"
        if self.buckets and bucket not in self.buckets:
            return f"bucket {bucket!r} is not in OMNIQ_TRIGGER_BUCKETS"
        if key.endswith("/"):
            return "a folder marker"
        if event.size == 0:
            return "an empty object"
        for own_bucket, prefix in self.own:
            if bucket == own_bucket and key.startswith(prefix):
                return f"inside omniq's own store s3://{own_bucket}/{prefix}"
        excluded = next((p for p in self.exclude if key.startswith(p)), None)
        if excluded is not None:
            return f"under the excluded prefix {excluded!r}"
        if self.include and not key.startswith(self.include):
            return "outside OMNIQ_TRIGGER_INCLUDE_PREFIXES"
        suffix = PurePosixPath(key).suffix.lower()
        if suffix not in self.extensions:
            return f"not a media file ({suffix or 'no extension'})"
        return None


# -- handling -----------------------------------------------------------------------------------------


def handle_events(events: Sequence[ObjectEvent], key_filter: KeyFilter, enqueue_fn: EnqueueFn) -> list[EventOutcome]:
    """One outcome per event, in order. Wanted objects are enqueued in one call, each URI once.

    Events for one key are deduped by key, not ETag: the producer fingerprints the object as it is *now*,
    so an older event arriving late (out of order) names the current content, like the newest event does.
    Across batches the producer's deterministic job ids turn repeats into ``skipped``. If ``enqueue_fn``
    raises (Redis or the broker down), the wanted events come back ``failed`` so the caller can keep the
    message for redelivery.
    """
    reasons = [key_filter.skip_reason(event) for event in events]
    uris = list(dict.fromkeys(event.uri for event, reason in zip(events, reasons, strict=True) if reason is None))
    by_uri: dict[str, tuple[str, str | None, str | None]] = {}
    if uris:
        try:
            outcomes = list(enqueue_fn(uris))
            if len(outcomes) != len(uris):
                raise RuntimeError(f"enqueue returned {len(outcomes)} outcomes for {len(uris)} sources")
        # The boundary between a trigger and everything behind it: whatever broke, the event stays undelivered.
        except Exception as error:
            log.exception("enqueueing %d object(s) failed; their events will be delivered again", len(uris))
            failure = f"enqueue failed: {type(error).__name__}: {error}"
            by_uri = {uri: ("failed", failure, None) for uri in uris}
        else:
            by_uri = {uri: (o.status, o.reason, o.job_id) for uri, o in zip(uris, outcomes, strict=True)}
    results = []
    answered: set[str] = set()
    for event, reason in zip(events, reasons, strict=True):
        if reason is not None:
            log.debug("ignoring s3://%s/%s: %s", event.bucket, event.key, reason)
            results.append(EventOutcome(event, "ignored", reason))
            continue
        status, why, job_id = by_uri[event.uri]
        if event.uri in answered and status in ("enqueued", "skipped"):
            status, why = "skipped", "another event for this object in the same batch"
        answered.add(event.uri)
        results.append(EventOutcome(event, status, why, job_id))
    return results


@dataclass(frozen=True)
class MessageResult:
    """One message's events and what became of them; ``malformed`` holds the reason it was unreadable."""

    outcomes: list[EventOutcome]
    malformed: str | None = None

    @property
    def done(self) -> bool:
        """True when the message can be acknowledged: every event is done, or it can never be read."""
        return all(outcome.done for outcome in self.outcomes)


def handle_messages(bodies: Sequence[str], key_filter: KeyFilter, enqueue_fn: EnqueueFn) -> list[MessageResult]:
    """Parse a batch of message bodies and enqueue their objects in one call; one result per body.

    A malformed body is logged and counts as done: no redelivery can make it readable.
    """
    parsed: list[tuple[list[ObjectEvent], str | None]] = []
    for body in bodies:
        try:
            parsed.append((parse_message(body), None))
        except MalformedEvent as error:
            log.error("dropping a malformed event message (%s); body starts: %.300r", error, body)
            parsed.append(([], str(error)))
    outcomes = handle_events([event for events, _ in parsed for event in events], key_filter, enqueue_fn)
    results, start = [], 0
    for events, malformed in parsed:
        results.append(MessageResult(outcomes[start : start + len(events)], malformed))
        start += len(events)
    return results


def count(outcomes: Sequence[EventOutcome]) -> dict[str, int]:
    """How many events ended in each status (every status present, zero or not)."""
    totals = dict.fromkeys(("enqueued", "skipped", "ignored", "rejected", "failed"), 0)
    for outcome in outcomes:
        totals[outcome.status] = totals.get(outcome.status, 0) + 1
    return totals


def log_outcomes(outcomes: Sequence[EventOutcome]) -> None:
    """One log line per enqueued, skipped or rejected object."""
    for outcome in outcomes:
        where = f"s3://{outcome.event.bucket}/{outcome.event.key}"
        if outcome.status in ("enqueued", "skipped"):
            detail = f" ({outcome.reason})" if outcome.reason else ""
            log.info("%s %s: job %s%s", outcome.status, where, outcome.job_id, detail)
        elif outcome.status == "rejected":
            log.warning("rejected %s: %s", where, outcome.reason)
