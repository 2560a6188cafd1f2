"""The GPU worker on the vLLM engine, in the fault suite's installation (Redis, SeaweedFS S3, a media worker,
real ``omniq worker`` processes): the whole pipeline (ingest -> the vLLM GPU worker -> finalize) writes results
byte-identical to the transformers worker's, and the GPU worker's fault rows hold for it too: a job cancelled
while its rows run, the worker SIGKILLed while it holds units, a row that always fails (a partial job).

One vLLM worker serves the module, started from the environment ``make vllm`` builds; the transformers GPU
worker is stopped meanwhile so that every unit goes to vLLM, and is started again at the end.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.cluster import Cluster, Worker
from tests.faults.test_partial_results import FAILING_CAPTION, assert_caption_1_failed, retry_generates_only_what_failed
from tests.faults.test_worker_deaths import assert_like_baseline, held_units, killable_units

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_gpu(cluster: Cluster, baseline, vllm_bin: Path) -> Iterator[Worker]:
    cluster.workers["gpu"].terminate()
    worker = cluster.add_worker("gpu-vllm", "gpu", python=str(vllm_bin / "python"), args=["--engine", "vllm"])
    try:
        yield worker
    finally:
        cluster.retire(worker.name)
        cluster.workers["gpu"].start()


def test_the_pipeline_on_vllm_writes_what_transformers_writes(cluster: Cluster, media, baseline, vllm_gpu: Worker):
    job_ids = cluster.enqueue(media, force=True)
    jobs = cluster.wait(job_ids, timeout=240)
    assert_like_baseline(cluster, jobs, baseline)  # byte-identical transcripts, captions, summaries, pages
    log = vllm_gpu.log_tail(1_000_000)
    assert "vLLM serves tiny" in log and "new tokens (vLLM)" in log


def test_a_job_cancelled_while_vllm_runs_its_rows_ends_and_the_next_job_is_done(
    cluster: Cluster, media, baseline, longer, vllm_gpu: Worker
):
    (job_id,) = cluster.enqueue([longer], force=True)
    cluster.wait_for("the vLLM worker to hold a unit", lambda: held_units(cluster, vllm_gpu.pid), 120, 0.02)
    cancelled = cluster.cli("cancel", job_id)
    assert cancelled.returncode == 0 and f"cancelled {job_id}" in cancelled.stdout, cancelled.stderr
    (other,) = cluster.enqueue([media[3]], force=True)
    jobs = cluster.wait([job_id, other], timeout=180)
    assert jobs[job_id]["status"] == "cancelled" and jobs[other]["status"] == "done"
    assert cluster.results(jobs[other]["media_id"]) == baseline[jobs[other]["media_id"]]
    cluster.wait_for(
        "the cancelled job's work files to go", lambda: not list(cluster.storage.list_keys(f"work/{job_id}")), 60
    )
    assert vllm_gpu.alive()


def test_the_vllm_worker_sigkilled_while_it_holds_units(cluster: Cluster, media, baseline, vllm_gpu: Worker):
    job_ids = cluster.enqueue(media, force=True)
    rng = random.Random(11)
    for _ in range(2):
        cluster.wait_for(
            "the vLLM worker to hold a unit", lambda: killable_units(cluster, vllm_gpu.pid, job_ids), 120, 0.02
        )
        time.sleep(rng.uniform(0.0, 0.3))
        vllm_gpu.kill()  # its whole process group: vLLM's engine goes with it
        time.sleep(1.0)
        vllm_gpu.start()
    jobs = cluster.wait(job_ids, timeout=300)
    assert_like_baseline(cluster, jobs, baseline)
    assert sum(cluster.counter(job_id, "recovered") for job_id in job_ids) >= 1


def test_a_row_that_always_fails_on_vllm_ends_partial(cluster: Cluster, media, baseline, vllm_gpu: Worker):
    vllm_gpu.terminate()
    vllm_gpu.env = {**vllm_gpu.env, "OMNIQ_FAILPOINTS": FAILING_CAPTION}
    vllm_gpu.start()
    (job_id,) = cluster.enqueue([media[0]], force=True)
    job = cluster.wait([job_id], timeout=180)[job_id]
    assert_caption_1_failed(cluster, job, baseline[job["media_id"]])
    vllm_gpu.terminate()  # the fault is gone: a retry generates only what failed, and ends as if nothing had
    vllm_gpu.env = {k: v for k, v in vllm_gpu.env.items() if k != "OMNIQ_FAILPOINTS"}
    vllm_gpu.start()
    retry_generates_only_what_failed(cluster, job_id, vllm_gpu, baseline[job["media_id"]])
