"""Fixtures for the worker tests: a clean Redis database used as broker and job state."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import use_broker
from workers.state import JobState


@pytest.fixture
def broker(redis_url, monkeypatch):
    """A clean Redis database for this test, used as broker and job state."""
    url = redis_url.rsplit("/", 1)[0] + "/5"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()

    previous = use_broker(url)
    yield url, client, JobState(client)
    client.flushdb()
    use_broker(previous)


def queued(client, queue="media"):
    """Messages waiting in a queue, by Redis list (one list per priority step)."""
    keys = [queue] + [f"{queue}:{p}" for p in range(1, 10)]
    return {key: client.llen(key) for key in keys if client.llen(key)}
