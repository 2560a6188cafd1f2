"""Redis and S3 outages in the middle of a run: nothing is lost, nothing is stuck, results are the same."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.faults.cluster import Cluster
from tests.faults.test_worker_deaths import assert_like_baseline

pytestmark = pytest.mark.slow


def _some_chunks_done(cluster: Cluster, job_ids: list[str]) -> bool:
    return any((cluster.state.get(j) or {}).get("chunks_done", 0) > 0 for j in job_ids)


def test_redis_restarted_with_its_append_only_file(cluster: Cluster, media, baseline):
    job_ids = cluster.enqueue(media, force=True)
    cluster.wait_for("the first chunks", lambda: _some_chunks_done(cluster, job_ids), timeout=120, interval=0.05)
    cluster.redis.pause()
    time.sleep(8)
    cluster.redis.resume()
    jobs = cluster.wait(job_ids, timeout=240)
    assert_like_baseline(cluster, jobs, baseline)


def _wipe_redis(cluster: Cluster) -> None:
    """Restart Redis without its data: queues, job state, leases and counters are gone."""
    cluster.redis.pause()
    for path in cluster.redis.directory.iterdir():
        if path.name != cluster.redis.log_path.name:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    cluster.redis.resume()
    assert cluster.state.redis.zcard("omniq:jobs") == 0


def _assert_same_files(cluster: Cluster, jobs: dict, baseline: dict) -> None:
    for job_id, job in jobs.items():  # the counters were lost with Redis: compare the files
        assert job["status"] == "done", job
        assert cluster.results(job["media_id"]) == baseline[job["media_id"]]
        assert list(cluster.storage.list_keys(f"work/{job_id}")) == []


def test_redis_restarted_without_its_data_then_omniq_recover(cluster: Cluster, media, baseline):
    """Workers hang while Redis loses everything; ``omniq recover`` rebuilds the jobs from the store."""
    job_ids = cluster.enqueue(media, force=True)
    cluster.wait_for("the first chunks", lambda: _some_chunks_done(cluster, job_ids), timeout=120, interval=0.05)
    workers = list(cluster.workers.values())
    for worker in workers:
        worker.freeze()
    try:
        _wipe_redis(cluster)
        recovered = cluster.cli("recover")
    finally:
        for worker in workers:
            worker.thaw()
    assert recovered.returncode == 0, recovered.stderr
    # e.g. "from the store: finished 3, infer 2, ingest 1, summarize 1" (earlier tests' jobs are in the store too)
    restored = dict(part.rsplit(" ", 1) for part in recovered.stdout.splitlines()[0].split(": ", 1)[1].split(", "))
    assert sum(int(n) for step, n in restored.items() if step in ("ingest", "infer", "summarize", "finalize")) >= 4
    assert "known" not in restored
    assert all(cluster.state.status(job_id) is not None for job_id in job_ids)  # their state is back
    _assert_same_files(cluster, cluster.wait(job_ids, timeout=240), baseline)


def test_redis_restarted_without_its_data_is_noticed_by_the_watchdog(cluster: Cluster, media, baseline):
    job_ids = cluster.enqueue(media, force=True)
    cluster.wait_for("the first chunks", lambda: _some_chunks_done(cluster, job_ids), timeout=120, interval=0.05)
    _wipe_redis(cluster)
    _assert_same_files(cluster, cluster.wait(job_ids, timeout=240), baseline)


def test_s3_stopped_for_a_minute(cluster: Cluster, media, baseline):
    job_ids = cluster.enqueue(media, force=True)
    cluster.wait_for("the first chunks", lambda: _some_chunks_done(cluster, job_ids), timeout=120, interval=0.05)
    cluster.s3.pause()
    try:
        deadline = time.monotonic() + 60
        retrying = None
        while time.monotonic() < deadline:
            if retrying is None:
                listing = cluster.cli("status", "--json", timeout=60)
                rows = json.loads(listing.stdout) if listing.returncode == 0 else []
                retrying = next((row["retry"] for row in rows if row["retry"]), None)
            time.sleep(1)
    finally:
        cluster.s3.resume()
    assert retrying is not None and "storage" in retrying["reason"]  # `omniq status` said why and when
    jobs = cluster.wait(job_ids, timeout=300)
    assert_like_baseline(cluster, jobs, baseline)
    for job in jobs.values():
        assert "will retry" not in json.dumps(cluster.manifest(job["media_id"]))


def test_producer_killed_between_job_state_and_message(cluster: Cluster, tmp_path):
    """The producer dies after creating job state and before sending the messages: the watchdog sends them."""
    from pipeline.media.sample import make_sample

    clips = [make_sample(tmp_path / f"stranded{i}.mp3", 6.0, video=False) for i in range(2)]
    script = (
        "import os, sys\n"
        "from workers import tasks\n"
        "tasks.ingest.publish = lambda *a, **k: os._exit(9)  # the crash, right after the states were created\n"
        "from workers.cli import main\n"
        "sys.exit(main(['enqueue', *sys.argv[1:]]))\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, *map(str, clips)], env=cluster.env, capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == 9, killed.stderr
    listing = json.loads(cluster.cli("status", "--json").stdout)
    stranded = [row for row in listing if row["source"].endswith(("stranded0.mp3", "stranded1.mp3"))]
    assert [row["status"] for row in stranded] == ["queued", "queued"]
    again = cluster.cli("enqueue", *map(str, clips))
    assert again.returncode == 0 and "already queued" in again.stdout  # not enqueued twice meanwhile
    jobs = cluster.wait([row["job_id"] for row in stranded], timeout=120)
    assert {job["status"] for job in jobs.values()} == {"done"}
    assert all(cluster.counter(job_id, "recovered") == 1 for job_id in jobs)
