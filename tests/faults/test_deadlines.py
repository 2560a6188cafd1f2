"""Hung work on a live installation: an ffmpeg that blocks on a stalled input and a ``generate`` that never
returns are stopped at their deadlines (scaled down here), and nothing else is lost (README "Deadlines")."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.cluster import Cluster, Worker

pytestmark = pytest.mark.slow

# the defaults (600 s floor, 1 s per second of media, 2 s per token) scaled down to seconds
SCALED = {"OMNIQ_DEADLINE_MIN_SECONDS": "3", "OMNIQ_DEADLINE_FACTOR": "0.25", "OMNIQ_DEADLINE_TOKEN_SECONDS": "0.1"}


def _timeouts(cluster: Cluster, job_ids: list[str]) -> dict[str, str]:
    return {
        f"{job_id}/{field.rpartition(':')[0]}": value
        for job_id in job_ids
        for field, value in cluster.state.units(job_id).items()
        if field.endswith(":timeouts")
    }


def _run_beside(
    cluster: Cluster,
    queue: str,
    name: str,
    env: dict[str, str],
    files: list[Path],
    baseline: dict[str, dict[str, bytes]],
    timeout: float,
) -> tuple[list[str], float, Worker]:
    """Run ``files`` with worker ``name`` (``env`` on top of the cluster's) in place of the ``queue`` worker; every
    job must end done, byte-identical to an undisturbed run. Returns the job ids, the wall time and the worker."""
    usual = cluster.workers[queue]
    usual.terminate()
    worker = cluster.add_worker(name, queue, env=env)
    try:
        started = time.monotonic()
        job_ids = cluster.enqueue(files, force=True)
        jobs = cluster.wait(job_ids, timeout=timeout)
        elapsed = time.monotonic() - started
    finally:
        cluster.retire(name)
        usual.start()
    assert {job["status"] for job in jobs.values()} == {"done"}, jobs
    for job in jobs.values():
        assert cluster.results(job["media_id"]) == baseline[job["media_id"]]
    return job_ids, elapsed, worker


def test_an_ffmpeg_that_hangs_is_stopped_at_its_deadline_and_the_worker_goes_on(cluster: Cluster, media, baseline):
    """The first decode reads a stalled input (``media.ffmpeg=hang``): at ingest's deadline (3 s + 0.25 x the
    file's 13 s) its ffmpeg is killed, the unit counts a death and runs again; the other file waits only that
    long behind it on the one media process."""
    env = {**SCALED, "OMNIQ_FAILPOINTS": "media.ffmpeg=hang"}
    job_ids, elapsed, hanging = _run_beside(cluster, "media", "media-hang", env, media[1:3], baseline, 180)
    timed_out = _timeouts(cluster, job_ids)
    assert list(timed_out.values()) == ["1"] and next(iter(timed_out)).endswith("/ingest"), timed_out
    job_id = next(iter(timed_out)).split("/")[0]
    assert cluster.state.units(job_id)["ingest:deaths"] == "1"  # counted like a kill
    log = hanging.log_tail(200_000)
    assert "was stopped at its deadline" in log and "ffmpeg was still running at the step's deadline" in log
    assert elapsed < (3 + 0.25 * 14) + 8 + 60  # the deadline, one retry's backoff (2-8 s), the work


def test_a_generate_that_hangs_restarts_the_gpu_worker_and_nothing_is_lost(cluster: Cluster, media, baseline):
    """The GPU worker's first ``generate`` never returns (``gpu.generate=hang``): at the batch's deadline the units
    whose rows it runs are counted a death, the worker hands back its other slots' work and starts again in place
    (without the hang that fired), and every job finishes as an undisturbed run does."""
    env = {**SCALED, "OMNIQ_FAILPOINTS": "gpu.generate=hang"}
    job_ids, elapsed, hanging = _run_beside(cluster, "gpu", "gpu-hang", env, [media[0], media[3]], baseline, 240)
    timed_out = _timeouts(cluster, job_ids)
    assert timed_out and set(timed_out.values()) == {"1"}, timed_out  # each unit of the hung batch, once
    log = hanging.log_tail(200_000)
    assert "passed its deadline" in log and "a model call passed its deadline; starting it again" in log
    # a batch's deadline: 3 s + 0.25 x its rows' media (at most 2 chunks of 5 s) + 0.1 x 8 tokens, about 6.3 s
    assert elapsed < 6.3 + 4 + 60  # + OMNIQ_LEASE_SECONDS + 60 s
