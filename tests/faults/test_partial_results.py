"""A row that fails every time, on a live installation: the job ends partial with every other row published, and
``omniq retry`` then generates only that row and what reads it (README "Partial results")."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tests.faults.cluster import Cluster, Worker
from workers.job_events import read_events

pytestmark = pytest.mark.slow

GENERATED = re.compile(r"generated (\d+) rows \(([a-z_,]+)\)")  # pipeline.engines.omni's line per generate call


def generated_rows(log: str) -> Counter[str]:
    """The rows the GPU worker generated, by kind, from its log."""
    rows: Counter[str] = Counter()
    for count, kinds in GENERATED.findall(log):
        assert len(kinds.split(",")) == int(count)
        rows.update(kinds.split(","))
    return rows


FAILING_CAPTION = "infer.row=raise:chunk=1:kind=caption"  # the failpoint: chunk 1's caption raises every time


def assert_caption_1_failed(cluster: Cluster, job: dict, expected: dict[str, bytes]) -> None:
    """``job`` ran under :data:`FAILING_CAPTION`: it is partial with that caption and the chunk summary that reads
    it failed, and every other row is published as an undisturbed run (``expected``) wrote it."""
    media_id = job["media_id"]
    assert job["status"] == "partial" and job["failed_rows"] == 2, job
    manifest = cluster.manifest(media_id)
    assert [(r["kind"], r["chunk"]) for r in manifest["failed_rows"]] == [("caption", 1), ("summary", 1)]
    assert "FailpointError" in manifest["failed_rows"][0]["reason"] and manifest["rows"]["failed"] == 2
    results = cluster.results(media_id)
    for name in ("transcript.json", "transcript.srt", "transcript.vtt", "transcript.txt"):
        assert results[name] == expected[name], name
    captions = json.loads(results["captions.json"])["chunks"]
    wanted = json.loads(expected["captions.json"])["chunks"]
    assert [c for c in captions if c["index"] != 1] == [c for c in wanted if c["index"] != 1]
    assert (captions[1]["visual"], captions[1]["audio"]) == ("", "")


def retry_generates_only_what_failed(cluster: Cluster, job_id: str, gpu: Worker, expected: dict[str, bytes]) -> None:
    """``omniq retry`` of a job :func:`assert_caption_1_failed` checked, with the fault gone: the job is done,
    byte-identical to ``expected``, and ``gpu`` generated only the caption, its chunk summary and the file summary."""
    before = gpu.log_path.stat().st_size
    retried = cluster.cli("retry", job_id)
    assert retried.returncode == 0 and retried.stdout.startswith("enqueued"), retried.stderr
    job = cluster.wait([job_id], timeout=180)[job_id]
    assert job["status"] == "done" and job["failed_rows"] == 0, job
    assert cluster.results(job["media_id"]) == expected  # byte-identical to a run where nothing failed
    with gpu.log_path.open("rb") as log:
        log.seek(before)
        generated = generated_rows(log.read().decode(errors="replace"))
    # only the failed caption, the chunk summary that reads it and the file summary: no good row again
    assert generated == {"caption": 1, "chunk_summary": 1, "file_summary": 1}, generated
    assert not list(cluster.storage.list_keys(f"work/{job_id}"))


def test_a_row_that_always_fails_ends_partial_and_a_retry_generates_only_it(cluster: Cluster, media, baseline):
    gpu = cluster.workers["gpu"]
    gpu.terminate()
    faulty = cluster.add_worker("gpu-failpoint", "gpu", env={"OMNIQ_FAILPOINTS": FAILING_CAPTION})
    try:
        (job_id,) = cluster.enqueue([media[0]], force=True)
        job = cluster.wait([job_id], timeout=180)[job_id]
    finally:
        cluster.retire(faulty.name)
        gpu.start()
    assert_caption_1_failed(cluster, job, baseline[job["media_id"]])
    ended = [e for e in read_events(cluster.state.redis, count=100_000) if e.job_id == job_id and e.event == "partial"]
    assert len(ended) == 1 and ended[0].failed_rows == 2 and "caption" in (ended[0].error or "")
    status = cluster.cli("status", job_id, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["failed_rows"] == 2, status.stderr
    retry_generates_only_what_failed(cluster, job_id, gpu, baseline[job["media_id"]])
