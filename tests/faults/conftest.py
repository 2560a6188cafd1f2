"""Fixtures of the fault suite: one installation with short leases for most tests, media and a baseline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.media.sample import make_sample
from tests.faults.cluster import FAST_RECOVERY, Cluster


@pytest.fixture(scope="session")
def cluster(s3_server, tiny_cache_dir, tmp_path_factory) -> Iterator[Cluster]:
    """Redis (AOF) + S3 + a media and a GPU worker, with leases and the watchdog shortened to seconds."""
    installation = Cluster(
        tmp_path_factory.mktemp("faults"), s3_server, {**FAST_RECOVERY, "OMNIQ_CACHE_DIR": str(tiny_cache_dir)}
    )
    installation.add_worker("media", "media")
    installation.add_worker("gpu", "gpu")
    try:
        yield installation
    finally:
        installation.close()


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> list[Path]:
    """Four short files (three chunks each at 5 s chunks): three videos with sound, one audio-only."""
    directory = tmp_path_factory.mktemp("fault-media")
    files = [make_sample(directory / f"clip{i}.mp4", 12.0 + i, size="160x120") for i in range(3)]
    files.append(make_sample(directory / "talk.mp3", 12.5, video=False))
    return files


@pytest.fixture(scope="session")
def baseline(cluster: Cluster, media: list[Path]) -> dict[str, dict[str, bytes]]:
    """The result files of an undisturbed run, by media id: what every disturbed run must reproduce."""
    job_ids = cluster.enqueue(media, force=True)  # other tests may have run some of these files already
    jobs = cluster.wait(job_ids, timeout=240)
    assert {job["status"] for job in jobs.values()} == {"done"}, jobs
    return {job["media_id"]: cluster.results(job["media_id"]) for job in jobs.values()}


@pytest.fixture(scope="session")
def longer(tmp_path_factory) -> Path:
    """A 40 s video (8 chunks): an ingest and a finalize slow enough to be hit on purpose."""
    return make_sample(tmp_path_factory.mktemp("fault-longer") / "longer.mp4", 40.0)
