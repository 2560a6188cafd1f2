"""The GPU worker batches across messages and jobs: 16 one-chunk files, a real `omniq worker --queue gpu`,
the batch sizes read from its Prometheus metrics; and every message is acknowledged only after its results."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.media.sample import make_sample
from tests.faults.cluster import Cluster
from tests.servers import find_free_port
from tests.workers.test_distributed import _scrape, _value

pytestmark = pytest.mark.slow

BATCH = 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("clips")
    return [make_sample(directory / f"clip{i:02d}.mp4", 3.0 + 0.1 * i, size="160x120") for i in range(16)]


def test_sixteen_one_chunk_files_run_in_full_batches(s3_server, tiny_cache_dir, tmp_path, clips):
    # Qwen3-Omni writes the transcripts here (with Whisper, it writes only the captions and summaries)
    env = {"OMNIQ_CACHE_DIR": str(tiny_cache_dir), "OMNIQ_BATCH_SIZE": str(BATCH), "OMNIQ_TRANSCRIBER": "omni"}
    cluster = Cluster(tmp_path, s3_server, env)
    try:
        cluster.add_worker("media", "media", concurrency=2)
        job_ids = cluster.enqueue(clips)
        # a backlog, as a library of short clips makes: every file ingested before the GPU worker starts
        cluster.wait_for(
            "every file ingested",
            lambda: all((cluster.state.get(j) or {}).get("status") == "running" for j in job_ids),
            timeout=180,
        )
        port = find_free_port()
        cluster.add_worker("gpu", "gpu", args=["--metrics-port", str(port)])
        jobs = cluster.wait(job_ids, timeout=240)
        failed = {job_id: job.get("error") for job_id, job in jobs.items() if job["status"] != "done"}
        assert not failed, f"{failed}\n{cluster.logs(20000)}"
        samples = _scrape(port)
        rows = _value(samples, "omniq_batch_size_sum", queue="gpu", model="tiny")
        calls = _value(samples, "omniq_batch_size_count", queue="gpu", model="tiny")
        # 16 language, 16 transcript (each clip speaks one sentence), 16 caption and 16 chunk-summary rows; a
        # one-chunk file needs no second summary call
        assert rows == 64, samples
        batches = [line for line in cluster.workers["gpu"].log_tail(200_000).splitlines() if "generated" in line]
        assert rows / calls >= 0.9 * BATCH, f"mean batch {rows / calls:.2f} from {calls:.0f} calls:\n" + "\n".join(
            batches
        )
        for job in jobs.values():
            manifest = cluster.manifest(job["media_id"])
            assert manifest["status"] == "done" and manifest["timings"]["model_s"] > 0
    finally:
        cluster.close()
