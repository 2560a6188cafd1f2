"""Fixtures every test package can use: a real Redis and a real S3 endpoint, each started once per session.

The servers themselves live in ``tests/servers.py``; this file only adapts them to pytest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import PostgresServer, RedisServer, S3Server

# Indexing embeds every entry with a real sentence-transformers model, which each indexing process loads
# (about 5 s of CPU): tests of other things, and the worker and CLI processes they start, index by words
# only. The tests of search by meaning set the real default (all-MiniLM-L6-v2) themselves.
os.environ.setdefault("OMNIQ_EMBEDDING_MODEL", "none")
EMBEDDING_MODEL = "all-MiniLM-L6-v2"

# -- Redis ----------------------------------------------------------------------------------------------


def use_broker(url: str) -> str:
    """Point this process's Celery app at ``url`` and drop connections it pooled for an earlier broker
    (``apply_async`` publishes through that pool); returns the previous URL."""
    from workers.app import app

    previous = app.conf.broker_url
    app.conf.broker_url = url
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    from kombu import pools

    pools.reset()  # kombu keeps its own registry of pools by broker URL: a closed one would be handed out again
    return previous


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis for this session: ``OMNIQ_TEST_REDIS_URL`` if set, else a throwaway redis-server."""
    external_url = os.environ.get("OMNIQ_TEST_REDIS_URL")
    if external_url:
        yield external_url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of an empty-at-start PostgreSQL database for this session: ``OMNIQ_TEST_POSTGRES_URL`` if set, else
    a throwaway server on a free loopback port."""
    external_url = os.environ.get("OMNIQ_TEST_POSTGRES_URL")
    if external_url:
        yield external_url
        return
    with PostgresServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def pgvector_url() -> Iterator[str]:
    """URL of a PostgreSQL database whose server has the pgvector extension: ``OMNIQ_TEST_PGVECTOR_URL`` if
    set, else a throwaway PostgreSQL 16 from the pgserver wheel's build."""
    from tests.servers import pgvector_bin_dir

    external_url = os.environ.get("OMNIQ_TEST_PGVECTOR_URL")
    if external_url:
        yield external_url
        return
    binaries = Path(tempfile.mkdtemp(prefix="omniq-pgvector-"))
    try:
        with PostgresServer(bin_dir=pgvector_bin_dir(binaries)) as server:
            yield server.url
    finally:
        shutil.rmtree(binaries, ignore_errors=True)


# -- S3 -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 that only accepts requests signed with its own key pair."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket on ``s3_server``, deleted with its contents after the test."""
    name = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    yield name
    s3_server.delete_bucket(name)


# -- The tiny model -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``OMNIQ_CACHE_DIR`` holding the tiny random-weight Qwen3-Omni, built once for the session."""
    from pipeline.engines.tiny import ensure_tiny_model

    directory = tmp_path_factory.mktemp("omniq-cache")
    ensure_tiny_model(directory)
    return directory


# -- The vLLM engine's environment ----------------------------------------------------------------------

VLLM_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm"


@pytest.fixture(scope="session")
def vllm_bin() -> Path:
    """The ``bin`` folder of the environment ``make vllm`` builds (omniq beside vLLM's own torch and
    transformers): the vLLM engine's tests run its python and its ``omniq`` there."""
    if not (VLLM_VENV / "bin" / "omniq").exists():
        pytest.fail(f"{VLLM_VENV} is missing: run 'make vllm' (make test does) to build the vLLM environment")
    return VLLM_VENV / "bin"
