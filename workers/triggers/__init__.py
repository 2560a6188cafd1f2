"""Enqueue media as it lands in a bucket: an SQS listener, an HTTP webhook (MinIO) and an AWS Lambda handler.

Each is a thin adapter: it receives event messages, lets ``workers.triggers.events`` parse, filter and dedupe them,
and acknowledges only what is done. An SQS message is deleted after its objects are enqueued (or
deliberately ignored), so a crash or a Redis outage means redelivery, never a lost upload.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError, TransientError
from workers.triggers.events import (
    EnqueueFn,
    EventOutcome,
    KeyFilter,
    MalformedEvent,
    Outcome,
    count,
    handle_events,
    handle_messages,
    log_outcomes,
    parse_message,
)
from workers.triggers.webhook import make_webhook_server, serve_webhook, webhook_token

__all__ = [
    "ListenStats",
    "default_enqueue_fn",
    "lambda_handler",
    "listen_sqs",
    "make_webhook_server",
    "open_queue",
    "parse_queue",
    "serve_webhook",
    "webhook_token",
]

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0
_AWS_QUEUE_HOST = re.compile(r"^sqs\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?$")
_LEGACY_QUEUE_HOST = re.compile(r"^(?:(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.)?queue\.amazonaws\.com$")


def default_enqueue_fn(settings: Settings, tag: str | None = None) -> EnqueueFn:
    """The real ``enqueue_fn``: ``workers.producer.enqueue`` with the configured store and job state."""
    from pipeline.storage import open_storage
    from workers.producer import enqueue
    from workers.state import JobState

    storage = open_storage(settings.storage_url, settings)
    state = JobState.from_url(settings.broker_url)

    def enqueue_sources(sources: list[str]) -> Sequence[Outcome]:
        return enqueue(sources, settings, storage, state, tag=tag)

    return enqueue_sources


# -- SQS ----------------------------------------------------------------------------------------------


@dataclass
class ListenStats:
    """Counters of one ``listen_sqs`` run (events by outcome, messages by fate)."""

    polls: int = 0
    messages: int = 0
    deleted: int = 0
    kept: int = 0  # left for redelivery after the visibility timeout
    malformed: int = 0
    errors: int = 0  # failed receives and deletes
    enqueued: int = 0
    skipped: int = 0
    ignored: int = 0
    rejected: int = 0
    failed: int = 0

    def add(self, outcomes: Sequence[EventOutcome]) -> None:
        for status, number in count(outcomes).items():
            if status in self.__dataclass_fields__:  # the producer's statuses, "ignored" and "failed"
                setattr(self, status, getattr(self, status) + number)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class QueueTarget:
    """Where a queue is: its URL (None until a bare name is looked up), name, endpoint and region."""

    url: str | None
    name: str | None
    endpoint_url: str | None
    region: str | None


def parse_queue(queue: str, settings: Settings) -> QueueTarget:
    """``sqs://QUEUE_URL``, a queue URL or a queue name (``sqs://NAME`` too) → where to send requests.

    The region comes from an AWS queue URL's host; any other host (ElasticMQ, LocalStack, moto) is used as
    the endpoint unless ``OMNIQ_SQS_ENDPOINT_URL`` says otherwise.
    """
    rest = queue.removeprefix("sqs://").strip()
    if not rest:
        raise ConfigError(f"queue {queue!r} is empty: give sqs://QUEUE_URL, a queue URL or a queue name")
    if "/" in rest and not rest.startswith(("http://", "https://")):
        rest = "https://" + rest
    if not rest.startswith(("http://", "https://")):
        return QueueTarget(None, rest, settings.sqs_endpoint_url, settings.s3_region)
    parsed = urlparse(rest)
    host = parsed.hostname or ""
    name = parsed.path.rstrip("/").rsplit("/", 1)[-1]
    if not host or not name:
        raise ConfigError(f"queue URL {rest!r} has no host or queue name; copy it from `aws sqs get-queue-url`")
    match = _AWS_QUEUE_HOST.match(host) or _LEGACY_QUEUE_HOST.match(host)
    if match:
        region = match.group("region") or "us-east-1"
        return QueueTarget(rest, name, settings.sqs_endpoint_url, region)
    endpoint = settings.sqs_endpoint_url or f"{parsed.scheme}://{parsed.netloc}"
    return QueueTarget(rest, name, endpoint, settings.s3_region)


def sqs_client(target: QueueTarget, wait_seconds: int = 20) -> Any:
    """A boto3 SQS client for ``target`` whose read timeout outlasts a long poll."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=wait_seconds + 30)
    session = boto3.session.Session()
    region = target.region or session.region_name or "us-east-1"
    return session.client("sqs", endpoint_url=target.endpoint_url, region_name=region, config=config)


def open_queue(queue: str, settings: Settings, wait_seconds: int = 20) -> tuple[Any, str]:
    """An SQS client and the queue URL, checked once so a wrong name or credentials fail at startup."""
    from botocore.exceptions import BotoCoreError, ClientError

    target = parse_queue(queue, settings)
    client = sqs_client(target, wait_seconds)
    try:
        url = target.url or client.get_queue_url(QueueName=target.name)["QueueUrl"]
        attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
    except (BotoCoreError, ClientError) as error:
        raise ConfigError(
            f"cannot use SQS queue {queue!r}: {error}. Check the queue URL or name, the region, "
            "OMNIQ_SQS_ENDPOINT_URL and the AWS credentials (sqs:ReceiveMessage, sqs:DeleteMessage)"
        ) from error
    if "RedrivePolicy" not in attributes.get("Attributes", {}):
        log.warning(
            "queue %s has no redrive policy: messages whose objects cannot be enqueued come back forever; "
            "give it a dead-letter queue",
            url,
        )
    return client, url


def listen_sqs(
    queue: str,
    settings: Settings,
    enqueue_fn: EnqueueFn,
    *,
    stop: threading.Event | None = None,
    wait_seconds: int = 20,
    max_messages: int = 10,
    visibility_timeout: int | None = None,
) -> ListenStats:
    """Long-poll ``queue`` for S3 event notifications and enqueue their media until ``stop`` is set.

    A message is deleted once each of its events is enqueued, skipped as a duplicate or ignored (not media,
    not a creation, a test event), or when it is malformed (logged: it can never succeed). A message with an
    event the producer rejected or could not enqueue is kept: SQS redelivers it after the visibility timeout,
    and the queue's redrive policy moves it to a dead-letter queue if it keeps failing.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    stop = stop or threading.Event()
    client, url = open_queue(queue, settings, wait_seconds)
    key_filter = KeyFilter.from_settings(settings)
    stats = ListenStats()
    receive: dict[str, Any] = {
        "QueueUrl": url,
        "MaxNumberOfMessages": max(1, min(10, max_messages)),
        "WaitTimeSeconds": max(0, min(20, wait_seconds)),
    }
    if visibility_timeout is not None:
        receive["VisibilityTimeout"] = visibility_timeout
    log.info("listening for S3 events on %s", url)
    failures = 0
    while not stop.is_set():
        try:
            messages = client.receive_message(**receive).get("Messages", [])
        except (BotoCoreError, ClientError) as error:
            stats.errors += 1
            failures += 1
            log.warning("receiving from %s failed (%s); trying again", url, error)
        else:
            stats.polls += 1
            enqueue_failed = bool(messages) and _handle_sqs_batch(client, url, messages, key_filter, enqueue_fn, stats)
            failures = failures + 1 if enqueue_failed else 0
        if failures:
            stop.wait(min(MAX_BACKOFF_SECONDS, 2.0 ** (failures - 1)))
    log.info("stopped listening on %s: %s", url, stats.to_dict())
    return stats


def _handle_sqs_batch(
    client: Any,
    url: str,
    messages: list[dict[str, Any]],
    key_filter: KeyFilter,
    enqueue_fn: EnqueueFn,
    stats: ListenStats,
) -> bool:
    """Enqueue one received batch and delete the messages that are done.

    True when enqueueing itself failed (Redis or the broker down), which calls for backing off; a message kept
    because the producer rejected one of its objects does not slow the others down.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    results = handle_messages([m.get("Body", "") for m in messages], key_filter, enqueue_fn)
    stats.messages += len(messages)
    done = []
    for index, (message, result) in enumerate(zip(messages, results, strict=True)):
        stats.add(result.outcomes)
        stats.malformed += result.malformed is not None
        log_outcomes(result.outcomes)
        if result.done:
            done.append({"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]})
    stats.kept += len(messages) - len(done)
    if done:
        try:
            response = client.delete_message_batch(QueueUrl=url, Entries=done)
        except (BotoCoreError, ClientError) as error:  # the messages come back; their jobs are skipped then
            stats.errors += 1
            log.warning("deleting %d handled message(s) failed (%s); they will be delivered again", len(done), error)
        else:
            failed = response.get("Failed", [])
            stats.deleted += len(done) - len(failed)
            stats.errors += len(failed)
            for entry in failed:
                log.warning("deleting a handled message failed (%s); it will be delivered again", entry.get("Message"))
    return any(outcome.status == "failed" for result in results for outcome in result.outcomes)


# -- AWS Lambda ---------------------------------------------------------------------------------------

_lambda_enqueue_fn: EnqueueFn | None = None


def lambda_handler(
    event: dict[str, Any], context: Any, *, enqueue_fn: EnqueueFn | None = None, settings: Settings | None = None
) -> dict[str, Any]:
    """AWS Lambda entry point for S3 notifications: direct, via SNS, via EventBridge, or SQS batches.

    For an SQS batch it returns ``batchItemFailures`` (enable ``ReportBatchItemFailures`` on the event source
    mapping) so only the messages that are not done come back. A direct invocation that could not enqueue
    raises, so Lambda retries it; a malformed event is logged and dropped.
    """
    global _lambda_enqueue_fn
    settings = settings or Settings()
    if enqueue_fn is None:
        _lambda_enqueue_fn = _lambda_enqueue_fn or default_enqueue_fn(settings)  # one per warm container
        enqueue_fn = _lambda_enqueue_fn
    key_filter = KeyFilter.from_settings(settings)
    records = event.get("Records") if isinstance(event, dict) else None
    if isinstance(records, list) and records and all(_is_sqs_record(r) for r in records):
        results = handle_messages([str(r.get("body", "")) for r in records], key_filter, enqueue_fn)
        for result in results:
            log_outcomes(result.outcomes)
        return {
            "batchItemFailures": [
                {"itemIdentifier": r["messageId"]}
                for r, result in zip(records, results, strict=True)
                if not result.done
            ]
        }
    try:
        events = parse_message(event)
    except MalformedEvent as error:
        log.error("dropping a malformed event (%s)", error)
        return {"malformed": str(error)}
    outcomes = handle_events(events, key_filter, enqueue_fn)
    log_outcomes(outcomes)
    totals = count(outcomes)
    if totals["failed"] or totals["rejected"]:
        reasons = sorted({o.reason or o.status for o in outcomes if not o.done})
        raise TransientError(f"{totals['failed'] + totals['rejected']} object(s) not enqueued: {'; '.join(reasons)}")
    return totals


def _is_sqs_record(record: Any) -> bool:
    return isinstance(record, dict) and record.get("eventSource") == "aws:sqs" and "messageId" in record
