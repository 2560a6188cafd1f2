"""The Celery app: JSON only, late acks, prefetch 1, no result backend; queue ``media`` and one GPU queue per model."""

from __future__ import annotations

import hashlib
import re

from celery import Celery
from celery.exceptions import SecurityError
from kombu import Queue

from pipeline.config import Settings
from pipeline.errors import ConfigError

MEDIA_QUEUE = "media"
GPU_QUEUE = "gpu"  # the kind; each model has its own queue, see gpu_queue_for
GPU_TASKS = frozenset({"omniq.infer", "omniq.summarize"})

TASK_ROUTES = {
    "omniq.ingest": {"queue": MEDIA_QUEUE},
    "omniq.finalize": {"queue": MEDIA_QUEUE},
    "omniq.infer": {"queue": GPU_QUEUE},  # publishers name the model's queue (gpu_queue_for)
    "omniq.summarize": {"queue": GPU_QUEUE},
}


def gpu_queue_for(model: str) -> str:
    """The GPU queue of one model: ``gpu.tiny``, ``gpu.Qwen-Qwen3-Omni-30B-A3B-Instruct``.

    A worker consumes only its own model's queue, so a job never reaches a worker with another model.
    Names that had to be changed to fit (paths, odd characters) get a short hash so two never collide.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.")[:80] or "model"
    if slug != model:
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{GPU_QUEUE}.{slug}"


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
        "task_queues": [Queue(MEDIA_QUEUE), Queue(gpu_queue_for(settings.model))],
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
        # A lost broker connection does not stop running tasks: they ride out the outage (job state retries
        # on a time budget) and are idempotent if their message comes back; leases catch the rest.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_max_retries": None,  # workers reconnect by themselves, however long Redis is away
        # publishing (next steps, retries) waits out a short broker outage: ~5 s between tries
        "task_publish_retry_policy": {
            "max_retries": max(1, int(settings.redis_retry_seconds // 5)),
            "interval_start": 0.5,
            "interval_step": 1.0,
            "interval_max": 5.0,
        },
        # SIGTERM (a deploy): let running tasks finish for this long, then hand their messages back
        # (``omniq worker`` maps SIGTERM to Celery's cold shutdown, which honours this timeout)
        "worker_soft_shutdown_timeout": settings.soft_shutdown_seconds,
    }


def signing_config(settings: Settings) -> dict[str, object]:
    """Celery's message signing (its ``auth`` serializer over JSON) when the settings name a key: every task,
    event and control message is signed with this process's key, and only messages signed by a certificate in
    the store are accepted (README "Security")."""
    if settings.signing_key is None:
        return {}
    for name, path in (("OMNIQ_SIGNING_KEY", settings.signing_key), ("OMNIQ_SIGNING_CERT", settings.signing_cert)):
        if path is None or not path.is_file():
            raise ConfigError(f"{name}={path}: no such file; give the PEM file")
    store = settings.signing_cert_store
    if store is None or not store.is_dir() or not any(store.iterdir()):
        raise ConfigError(f"OMNIQ_SIGNING_CERT_STORE={store}: give a folder holding the trusted certificates (PEM)")
    for path in sorted(store.iterdir()):  # Celery reads every file there as a certificate
        if not path.is_file() or b"-----BEGIN CERTIFICATE-----" not in path.read_bytes():
            raise ConfigError(
                f"OMNIQ_SIGNING_CERT_STORE: {path} is not a PEM certificate; the folder holds certificates only "
                "(keep private keys elsewhere)"
            )
    return {
        "task_serializer": "auth",
        "event_serializer": "auth",
        "accept_content": ["auth"],
        "security_key": str(settings.signing_key),
        "security_certificate": str(settings.signing_cert),
        "security_cert_store": f"{store}/*",
        "security_digest": "sha256",
    }


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("omniq", include=["workers.tasks", "workers.reliability.lifecycle"])
    app.conf.update(celery_config(settings))
    signing = signing_config(settings)
    if signing:
        app.conf.update(signing)
        try:
            app.setup_security(allowed_serializers=["json"], serializer="json")  # the signed content stays JSON
        except SecurityError as error:  # e.g. a key that is not RSA, an expired certificate
            raise ConfigError(f"message signing: {error}; check OMNIQ_SIGNING_KEY and OMNIQ_SIGNING_CERT") from error
    return app


app = create_app()
