"""``omniq listen`` and ``omniq webhook``: long-running triggers that enqueue media as it is uploaded."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from pipeline.config import Settings


def add_commands(subparsers: Any) -> None:
    """Add ``listen`` and ``webhook`` to the ``omniq`` command's subparsers."""
    listen = subparsers.add_parser(
        "listen", help="enqueue media uploaded to S3, from the bucket's event notifications in an SQS queue"
    )
    listen.add_argument("queue", metavar="QUEUE", help="sqs://QUEUE_URL, a queue URL, or a queue name")
    listen.add_argument("--tag", help="tag the jobs (shown by `omniq status`)")
    listen.add_argument(
        "--wait-seconds", type=int, default=20, choices=range(1, 21), metavar="1-20", help="long-poll wait (20)"
    )
    listen.add_argument("--visibility-timeout", type=int, help="seconds a received message stays hidden (queue's)")
    listen.set_defaults(func=cmd_listen)

    webhook = subparsers.add_parser(
        "webhook", help="serve an HTTP endpoint for S3-style event notifications (MinIO's webhook target)"
    )
    webhook.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    webhook.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    webhook.add_argument("--tag", help="tag the jobs (shown by `omniq status`)")
    webhook.set_defaults(func=cmd_webhook)


def cmd_listen(args: argparse.Namespace) -> int:
    from workers.triggers import default_enqueue_fn, listen_sqs

    settings = Settings()
    stop = _stop_on_signals()
    _show_trigger_logs()
    stats = listen_sqs(
        args.queue,
        settings,
        default_enqueue_fn(settings, args.tag),
        stop=stop,
        wait_seconds=args.wait_seconds,
        visibility_timeout=args.visibility_timeout,
    )
    summary = ", ".join(f"{name} {value}" for name, value in stats.to_dict().items() if value)
    print(f"omniq: stopped listening: {summary or 'nothing received'}", file=sys.stderr)
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    from workers.triggers import default_enqueue_fn, serve_webhook, webhook_token

    settings = Settings()
    token = webhook_token(settings)  # no token, no server
    stop = _stop_on_signals()
    _show_trigger_logs()
    serve_webhook(args.host, args.port, settings, default_enqueue_fn(settings, args.tag), token, stop=stop)
    return 0


def _stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set, so a trigger finishes its current batch and exits."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():  # asked twice: stop now
            raise KeyboardInterrupt
        print(f"omniq: {signal.Signals(signum).name}: stopping after the current batch", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _show_trigger_logs() -> None:
    """Each enqueued object is worth a line even without ``-v``."""
    for name in ("workers.triggers", "workers.triggers.webhook", "workers.triggers.events"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
