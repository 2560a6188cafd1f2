"""Poison work, jobs for a model nobody serves, cancel, retry and a forced restart, on a live installation."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.faults.cluster import Cluster

pytestmark = pytest.mark.slow


def test_a_file_that_kills_its_worker_every_time_fails_and_the_queue_moves_on(cluster: Cluster, longer, media):
    """Every process that starts the poison job's ingest is SIGKILLed (as a decoder crash or an OOM kill
    would): after OMNIQ_MAX_WORKER_DEATHS (3) the job fails with the reason, and other jobs finish."""
    (poison,) = cluster.enqueue([longer], force=True)
    media_pid = cluster.workers["media"].pid
    kills: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        import os
        import signal

        seen: dict[int, float] = {}
        while not stop.is_set():
            if int(cluster.state.units(poison).get("ingest:deaths", 0)) >= 3:
                time.sleep(0.05)  # the next delivery fails the job before it decodes anything
                continue
            pid = cluster.lease_holder_pid(poison, "ingest")
            # killed 0.05 s into the work (decoding; the whole ingest of this file takes ~0.4 s), as a crash
            # in the decoder would
            if (
                pid
                and pid != media_pid
                and pid not in kills
                and time.monotonic() - seen.setdefault(pid, time.monotonic()) > 0.05
            ):
                try:
                    os.kill(pid, signal.SIGKILL)  # a prefork child of the media worker we started
                    kills.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        (other,) = cluster.enqueue([media[3]], force=True)
        jobs = cluster.wait([poison, other], timeout=180)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert jobs[other]["status"] == "done"
    assert jobs[poison]["status"] == "failed" and len(kills) == 3
    assert cluster.state.units(poison)["ingest:deaths"] == "3"
    reason = "worker died 3 times while ingesting"
    assert jobs[poison]["error"].startswith(reason)
    key = f"results/{jobs[poison]['media_id']}/manifest.json"
    cluster.wait_for("the failed manifest", lambda: cluster.storage.exists(key), timeout=30)  # follows the status
    manifest = cluster.manifest(jobs[poison]["media_id"])
    assert manifest["status"] == "failed" and manifest["error"].startswith(reason)
    assert cluster.workers["media"].alive()  # the worker itself survived each of its children


def _status(cluster: Cluster, job_id: str) -> dict:
    result = cluster.cli("status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_jobs_wait_for_their_model_and_can_be_cancelled_retried_and_forced(cluster: Cluster, media):
    clip = media[3]
    (job_id,) = cluster.enqueue([clip], model="other-model")
    cluster.wait_for("the ingest", lambda: cluster.state.status(job_id) == "running", timeout=60)
    time.sleep(float(cluster.env["OMNIQ_LEASE_SECONDS"]) + 1)  # the tiny GPU worker had time to take it if it would
    row = _status(cluster, job_id)
    assert row["status"] == "running" and row["chunks_done"] == 0
    assert "gpu.other-model" in row["waiting_for"] and "OMNIQ_MODEL=other-model" in row["waiting_for"]
    assert "infer-0:starts" not in cluster.state.units(job_id)
    assert cluster.state.redis.llen("gpu.other-model") + cluster.state.redis.llen("gpu.other-model:4") >= 1
    text = cluster.cli("status").stdout
    assert f"{job_id}  running" in text and "no live worker serves queue gpu.other-model" in text

    forced = cluster.cli("enqueue", "--force", "--model", "other-model", str(clip))
    assert forced.returncode == 0 and f"enqueued  {job_id}" in forced.stdout  # no worker holds it: stale

    cancelled = cluster.cli("cancel", job_id)
    assert cancelled.returncode == 0 and f"cancelled {job_id}" in cancelled.stdout
    assert cluster.state.status(job_id) == "cancelled"
    cluster.wait_for("the work files to go", lambda: not list(cluster.storage.list_keys(f"work/{job_id}")), 30)
    again = cluster.cli("cancel", job_id)
    assert again.returncode == 1 and "is cancelled, not queued or running" in again.stderr

    retried = cluster.cli("retry", job_id)
    assert retried.returncode == 0 and f"enqueued  {job_id}" in retried.stdout  # the same model, the same id
    assert json.loads(cluster.state.redis.hget(f"omniq:job:{job_id}", "spec"))["config"]["model"] == "other-model"
    assert cluster.cli("cancel", job_id).returncode == 0
    nothing = cluster.cli("retry")
    assert nothing.returncode == 2 and "--failed" in nothing.stderr


def test_force_never_restarts_a_job_that_really_runs(cluster: Cluster, tmp_path):
    from pipeline.media.sample import make_sample

    clip = make_sample(tmp_path / "busy.mp4", 6.0, size="160x120")
    overrides = {"caption_max_new_tokens": 4000, "transcript_max_new_tokens": 4000}
    (job_id,) = cluster.enqueue([clip], **overrides)
    gpu = cluster.workers["gpu"]
    cluster.wait_for("the batch", lambda: cluster.lease_holder_pid(job_id, "infer-0") == gpu.pid, timeout=120)
    from workers.producer import enqueue

    outcome = enqueue(
        [str(clip)], cluster.settings.model_copy(update=overrides), cluster.storage, cluster.state, force=True
    )
    assert (outcome[0].status, outcome[0].reason) == ("skipped", "already running")
    assert cluster.wait([job_id], timeout=180)[job_id]["status"] == "done"
