"""omniq's distributed layer: the Celery app, thin tasks, job state in Redis, the producer and the CLI."""
