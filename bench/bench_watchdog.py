"""What one watchdog sweep costs with many active jobs (real redis-server, no workers).

    .venv/bin/python bench/bench_watchdog.py [--jobs 20000]

Creates ``--jobs`` queued jobs as the producer does (state + 'sent' marks), a tenth of them running with a
held lease, and times a full sweep against a baseline: one pipelined HGETALL of every job hash (what a
sweep that read every job would at least cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Settings
from tests.servers import RedisServer
from workers.reliability.leases import Leases
from workers.reliability.watchdog import EPOCH, Watchdog
from workers.state import JobState


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args()
    with RedisServer() as server:
        state = JobState.from_url(server.url)
        leases = Leases(state, 45, 10)
        spec = {"media_id": "m", "source": "s3://b/k", "input_uri": "s3://b/k", "fingerprint": "f", "config": {}}
        ids = [f"job-{i:06d}" for i in range(args.jobs)]
        for first in range(0, len(ids), 1000):
            batch = ids[first : first + 1000]
            state.create_many([{**spec, "job_id": job_id} for job_id in batch])
            state.mark_sent([(job_id, "ingest", None) for job_id in batch])
        for job_id in ids[::10]:  # a tenth are running a batch, with a live lease
            state.advance(job_id, "running", chunks_total=4)
            state.unit_done(job_id, "ingest")
            state.mark_sent([(job_id, "infer-0", [0, 1])])
            leases.acquire(job_id, "infer-0")
        state.redis.set(EPOCH, "1")
        watchdog = Watchdog(state, leases, Settings())

        started = time.perf_counter()
        with state.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(JobState.key(job_id))
            pipe.execute()
        baseline = time.perf_counter() - started

        started = time.perf_counter()
        report = watchdog.sweep(force=True)
        sweep = time.perf_counter() - started
        leases.release_all()
    assert report is not None and not report.get("resent"), report  # nothing was lost: nothing to send
    running = len(ids[::10])
    print(
        f"{args.jobs} jobs ({args.jobs - running} queued, {running} running): sweep {sweep:.2f} s "
        f"({sweep / running * 1e6:.0f} us per running job; queued jobs whose message was sent are not swept)"
    )
    print(f"baseline (one pipelined HGETALL per job): {baseline:.2f} s; sweep / baseline = {sweep / baseline:.1f}x")


if __name__ == "__main__":
    main()
