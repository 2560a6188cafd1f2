"""Workers that die: SIGKILLed GPU and media workers, and a SIGTERM that hands work back."""

from __future__ import annotations

import random
import socket
import time

import pytest

from tests.conftest import use_broker
from tests.faults.cluster import Cluster

pytestmark = pytest.mark.slow


def held_units(cluster: Cluster, pid: int) -> list[str]:
    """The units whose lease the process ``pid`` holds now (a GPU worker runs its tasks in its main process)."""
    held = []
    for key in cluster.state.redis.scan_iter("omniq:lease:*"):
        holder = cluster.state.redis.get(key) or ""
        if holder.split("|")[1:2] == [str(pid)]:
            held.append(key.rsplit(":", 1)[1])
    return held


def killable_units(cluster: Cluster, pid: int, job_ids: list[str]) -> list[str]:
    """The units of ``job_ids`` that ``pid`` holds and that have killed fewer than two workers: a third death
    would fail the unit's rows as poison (OMNIQ_MAX_WORKER_DEATHS, tested on its own), not test recovery."""
    units = []
    for job_id in job_ids:
        deaths = cluster.state.units(job_id)
        for key in cluster.state.redis.scan_iter(f"omniq:lease:{job_id}:*"):
            holder, unit = cluster.state.redis.get(key) or "", key.rsplit(":", 1)[1]
            if holder.split("|")[1:2] == [str(pid)] and int(deaths.get(f"{unit}:deaths", 0)) < 2:
                units.append(unit)
    return units


def assert_like_baseline(cluster: Cluster, jobs: dict, baseline: dict) -> None:
    for job_id, job in jobs.items():
        assert job["status"] == "done", job
        assert cluster.results(job["media_id"]) == baseline[job["media_id"]], job["source"]
        assert cluster.counter(job_id, "finalized") == 1  # the manifest and index were written once
        assert list(cluster.storage.list_keys(f"work/{job_id}")) == []


def test_gpu_worker_sigkilled_five_times(cluster: Cluster, media, baseline):
    job_ids = cluster.enqueue(media, force=True)
    gpu = cluster.workers["gpu"]
    rng = random.Random(7)
    kills = 0
    while kills < 5:
        cluster.wait_for(
            "the GPU worker to hold a unit",
            lambda: killable_units(cluster, gpu.pid, job_ids),
            timeout=90,
            interval=0.02,
        )
        time.sleep(rng.uniform(0.0, 0.3))  # a random point of the unit (or just after it)
        gpu.kill()
        kills += 1
        time.sleep(1.0)
        gpu.start()
    jobs = cluster.wait(job_ids, timeout=240)
    assert_like_baseline(cluster, jobs, baseline)
    recovered = sum(cluster.counter(job_id, "recovered") for job_id in job_ids)
    assert recovered >= 1  # the watchdog sent the killed units again (Redis would have waited 6 h)


def _kill_media_worker_during(cluster: Cluster, unit: str, path, attempts: int = 4) -> tuple[str, int]:
    """Enqueue ``path`` and SIGKILL the whole media worker while one of its processes holds ``unit``;
    restart it a second later. Returns the job id and how many tries it took to land the kill."""
    media = cluster.workers["media"]
    for attempt in range(1, attempts + 1):
        (job_id,) = cluster.enqueue([path], force=True)
        try:
            cluster.wait_for(
                f"a media process to hold {unit}",
                lambda: cluster.lease_holder_pid(job_id, unit) or cluster.state.status(job_id) == "done",
                timeout=60,
                interval=0.005,
            )
        except AssertionError:
            raise
        if cluster.state.status(job_id) != "done" and cluster.lease_holder_pid(job_id, unit):
            media.kill()
            time.sleep(1.0)
            media.start()
            return job_id, attempt
        cluster.wait([job_id], timeout=60)  # it was too quick to catch: try again
    raise AssertionError(f"could not catch {unit} in {attempts} tries")


def test_media_worker_sigkilled_during_ingest_and_during_finalize(cluster: Cluster, longer):
    reference = cluster.enqueue([longer])
    reference_job = cluster.wait(reference, timeout=180)[reference[0]]
    expected = cluster.results(reference_job["media_id"])
    for unit in ("ingest", "finalize"):
        job_id, _ = _kill_media_worker_during(cluster, unit, longer)
        job = cluster.wait([job_id], timeout=120)[job_id]
        assert job["status"] == "done", job
        assert cluster.results(job["media_id"]) == expected
        assert cluster.counter(job_id, "finalized") == 1
        units = cluster.state.units(job_id)
        assert units[f"{unit}:deaths"] == "1" and units[f"{unit}:starts"] == "2"  # seen dead once, run again
        assert list(cluster.storage.list_keys(f"work/{job_id}")) == []


def test_busy_gpu_worker_answers_and_sigterm_hands_its_unit_back_at_once(cluster: Cluster, tmp_path):
    """A long batch runs in the pool thread: the worker answers pings and inspect meanwhile (Flower shows it
    online), and a SIGTERM hands the unit back within the soft-shutdown time, to be run again at once by the
    next worker: no lease to wait out, no death counted, no watchdog involved."""
    from pipeline.media.sample import make_sample
    from workers.app import app

    clip = make_sample(tmp_path / "long-batch.mp4", 6.0, size="160x120")
    gpu = cluster.workers["gpu"]
    # thousands of tokens per row: a batch of several seconds with the tiny model
    (job_id,) = cluster.enqueue([clip], caption_max_new_tokens=4000, transcript_max_new_tokens=4000)
    cluster.wait_for(
        "the GPU worker to start the batch", lambda: cluster.lease_holder_pid(job_id, "infer-0") == gpu.pid, 120
    )
    name = f"gpu-{gpu.pid}@{socket.gethostname()}"
    use_broker(cluster.redis.url)
    for _ in range(2):
        time.sleep(1.0)
        assert app.control.ping(destination=[name], timeout=3) == [{name: {"ok": "pong"}}]
        active = app.control.inspect(destination=[name], timeout=3).active()
        assert [task["name"] for task in active[name]] == ["omniq.infer"]
    assert cluster.lease_holder_pid(job_id, "infer-0") == gpu.pid  # still in the same batch
    took = gpu.terminate()
    assert took < float(cluster.env["OMNIQ_SOFT_SHUTDOWN_SECONDS"]) + 5  # did not wait for the batch to end
    assert cluster.state.redis.get(f"omniq:lease:{job_id}:infer-0") is None  # given back, not left to expire
    gpu.start()
    job = cluster.wait([job_id], timeout=180)[job_id]
    assert job["status"] == "done"
    units = cluster.state.units(job_id)
    assert units["infer-0:starts"] == "2" and "infer-0:deaths" not in units
    assert cluster.counter(job_id, "recovered") == 0  # Redis gave the message back, not the watchdog
