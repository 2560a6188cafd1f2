"""The Celery app: JSON only, late acks, prefetch 1, no result backend, queues ``media`` and ``gpu``."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipeline.config import Settings

MEDIA_QUEUE = "media"
GPU_QUEUE = "gpu"

TASK_ROUTES = {
    "omniq.ingest": {"queue": MEDIA_QUEUE},
    "omniq.finalize": {"queue": MEDIA_QUEUE},
    "omniq.infer": {"queue": GPU_QUEUE},
    "omniq.summarize": {"queue": GPU_QUEUE},
}


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery settings derived from omniq's; kept in one place so tests can read them."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,  # no chords, no result backend: job state lives in workers.state
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "task_acks_late": True,  # a task is acknowledged after it ran: a dead worker's task is redelivered
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_routes": TASK_ROUTES,
        "task_queues": [Queue(MEDIA_QUEUE), Queue(GPU_QUEUE)],
        "task_default_queue": MEDIA_QUEUE,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        # Redis redelivers an unacknowledged task after this long: it must exceed the longest task.
        # priority_steps: ten Redis lists per queue, 0 served first (see workers.producer.broker_priority)
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        "task_default_priority": 4,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("omniq", include=["workers.tasks"])
    app.conf.update(celery_config(settings))
    return app


app = create_app()
