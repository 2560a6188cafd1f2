"""Re-measure the reliability table of the README: real Redis, SeaweedFS, `omniq worker` processes, the tiny
model, and one disturbance per scenario, all with omniq's default recovery settings.

    .venv/bin/python bench/bench_faults.py [--files 8] [--scenarios none,gpu-kills,...]

Each scenario gets a fresh installation (Redis with AOF, a bucket, a media worker with 2 processes and a GPU
worker in a PID namespace of its own, so that it looks like another machine to the others). Media settings
are reduced (small frames, few tokens) to keep the run short; leases, the watchdog and retry budgets are the
defaults. Prints a Markdown table: jobs, done, failed, stuck or lost, wall time and, for kills, how long
after each kill the lost unit ran again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.engines.tiny import ensure_tiny_model
from pipeline.media.sample import make_sample
from tests.faults.cluster import Cluster, other_machine_wrapper
from tests.servers import S3Server

MEDIA_ENV = {
    "OMNIQ_FPS": "2",
    "OMNIQ_FRAME_MAX_PIXELS": str(160 * 160),
    "OMNIQ_TRANSCRIPT_MAX_NEW_TOKENS": "160",
    "OMNIQ_CAPTION_MAX_NEW_TOKENS": "160",
    "OMNIQ_SUMMARY_MAX_NEW_TOKENS": "16",
    "OMNIQ_CHUNK_SECONDS": "30",
}
SCENARIOS = (
    "none",
    "gpu-kills",
    "media-child-kill",
    "redis-restart-aof",
    "redis-restart-empty",
    "s3-down-46s",
    "concurrent-enqueue",
    "producer-killed",
    "redis-down-cli",
    "row-fails",
    "gpu-hang",
    "ffmpeg-hang",
)
# deadlines for the hang scenarios: the defaults (600 s floor, 1 s per second of media, 2 s per token) scaled down
HANG_DEADLINES = {
    "OMNIQ_DEADLINE_MIN_SECONDS": "30",
    "OMNIQ_DEADLINE_FACTOR": "0.1",
    "OMNIQ_DEADLINE_TOKEN_SECONDS": "0.05",
}
FAILPOINTS = {
    "row-fails": ("gpu", "infer.row=raise:chunk=1:kind=caption"),
    "gpu-hang": ("gpu", "gpu.generate=hang"),
    "ffmpeg-hang": ("media", "media.ffmpeg=hang"),
}


def _logged_at(log: str, needle: str) -> float | None:
    """The epoch time of the first log line holding ``needle`` (``2026-12-06 22:43:39,730 ...``)."""
    from datetime import datetime

    for line in log.splitlines():
        if needle in line:
            try:
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
    return None


def _timed_out(cluster: Cluster, job_ids: list[str]) -> list[tuple[str, str, float]]:
    """(job, unit, when it was done) of every unit stopped at its deadline."""
    found = []
    for job_id in job_ids:
        units = cluster.state.units(job_id)
        for field in units:
            if field.endswith(":timeouts"):
                unit = field.rpartition(":")[0]
                found.append((job_id, unit, float(units.get(f"{unit}:done") or 0)))
    return found


def _gpu_unit(cluster: Cluster, fresh: bool = False) -> tuple[str, str] | None:
    """A GPU unit held by a live worker now (``fresh``: one that has never lost its worker)."""
    for key in cluster.state.redis.scan_iter("omniq:lease:*"):
        job_id, unit = key.split(":")[2:4]
        if unit.startswith(("infer-", "summarize")):
            if fresh and cluster.state.units(job_id).get(f"{unit}:deaths"):
                continue
            return job_id, unit
    return None


def _watch_recovery(cluster: Cluster, job_id: str, unit: str, starts: int, killed: float, out: list[float]) -> None:
    """Record when the killed unit starts again (its start count goes up), to within 0.2 s."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if int(cluster.state.units(job_id).get(f"{unit}:starts", 0)) > starts:
            out.append(time.time() - killed)
            return
        time.sleep(0.2)


def run(name: str, s3: S3Server, cache: Path, media: list[Path], root: Path) -> dict[str, object]:
    cluster = Cluster(root / name, s3, {**MEDIA_ENV, "OMNIQ_CACHE_DIR": str(cache)})
    (root / name).mkdir(exist_ok=True)
    notes: list[str] = []
    queue_env: dict[str, dict[str, str]] = {"media": {}, "gpu": {}}
    if name in FAILPOINTS:
        queue, failpoint = FAILPOINTS[name]
        queue_env[queue] = {**HANG_DEADLINES, "OMNIQ_FAILPOINTS": failpoint}
    try:
        cluster.add_worker("media", "media", concurrency=2, env=queue_env["media"])
        gpu = cluster.add_worker("gpu", "gpu", wrapper=other_machine_wrapper(), env=queue_env["gpu"])
        started = time.monotonic()
        if name == "concurrent-enqueue":
            command = [sys.executable, "-m", "workers.cli", "enqueue", *map(str, media)]
            producers = [subprocess.Popen(command, env=cluster.env, stdout=subprocess.DEVNULL) for _ in range(4)]
            for producer in producers:
                producer.wait(timeout=300)
            job_ids = [row["job_id"] for row in json.loads(cluster.cli("status", "--json", "--limit", "1000").stdout)]
        elif name == "producer-killed":
            script = (
                "import os, sys\nfrom workers import tasks\n"
                "tasks.ingest.publish = lambda *a, **k: os._exit(9)\n"
                "from workers.cli import main\nsys.exit(main(['enqueue', *sys.argv[1:]]))\n"
            )
            subprocess.run([sys.executable, "-c", script, *map(str, media)], env=cluster.env, timeout=300)
            job_ids = [row["job_id"] for row in json.loads(cluster.cli("status", "--json", "--limit", "1000").stdout)]
            notes.append(f"{len(job_ids)} jobs left queued without a message")
        else:
            job_ids = cluster.enqueue(media)
        if name == "gpu-kills":
            rng = random.Random(5)
            recoveries: list[float] = []
            watchers = []
            for _ in range(5):
                try:  # a unit that no kill has hit yet (killing one unit 3 times would make it poison)
                    job_id, unit = cluster.wait_for("a GPU unit", lambda: _gpu_unit(cluster, fresh=True), 120, 0.05)
                except AssertionError:
                    break  # all GPU work is done
                time.sleep(rng.uniform(0.0, 1.0))  # a random point of the unit
                units = cluster.state.units(job_id)
                if not units.get(f"{unit}:started"):
                    continue  # it finished first
                gpu.kill()
                killed = time.time()
                starts = int(units.get(f"{unit}:starts", 0))
                watcher = threading.Thread(
                    target=_watch_recovery, args=(cluster, job_id, unit, starts, killed, recoveries), daemon=True
                )
                watcher.start()
                watchers.append(watcher)
                time.sleep(10)  # the machine comes back 10 s later
                gpu.start()
            for watcher in watchers:
                watcher.join(timeout=600)
            times = ", ".join(f"{r:.0f}" for r in sorted(recoveries))
            notes.append(f"{len(watchers)} kills; lost units ran again after {times} s")
        elif name == "media-child-kill":
            media_pid = cluster.workers["media"].pid

            def child() -> tuple[str, int] | None:
                for job_id in job_ids:
                    pid = cluster.lease_holder_pid(job_id, "ingest")
                    if pid and pid != media_pid:
                        return job_id, pid
                return None

            job_id, pid = cluster.wait_for("an ingest", child, 120, 0.005)
            os.kill(pid, 9)
        elif name in ("redis-restart-aof", "redis-restart-empty"):
            cluster.wait_for("progress", lambda: any(cluster.state.get(j)["chunks_done"] for j in job_ids), 600, 0.1)
            cluster.redis.pause()
            if name == "redis-restart-aof":
                time.sleep(8)
            else:
                for path in cluster.redis.directory.iterdir():
                    if path.name != cluster.redis.log_path.name:
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
            cluster.redis.resume()
        elif name == "s3-down-46s":
            cluster.wait_for("progress", lambda: any(cluster.state.get(j)["chunks_done"] for j in job_ids), 600, 0.1)
            s3.pause()
            time.sleep(46)
            s3.resume()
        elif name == "redis-down-cli":
            cluster.redis.pause()
            for args in (("status",), ("enqueue", str(media[0]))):
                result = cluster.cli(*args)
                notes.append(f"`{args[0]}`: exit {result.returncode}, {len(result.stderr.splitlines())} line")
            cluster.redis.resume()
        try:
            cluster.wait(job_ids, timeout=1800)
        except AssertionError:
            pass
        jobs = [cluster.state.get(j) for j in job_ids]
        statuses = [job["status"] if job else "lost" for job in jobs]
        if name == "row-fails":
            rows = sum(job["failed_rows"] for job in jobs if job)
            notes.append(f"{statuses.count('partial')} partial with {rows} failed rows, all else published")
            gpu.kill()  # every job has ended; a worker in its own PID namespace is stopped by its group's kill
            gpu = cluster.add_worker("gpu-again", "gpu", wrapper=other_machine_wrapper())
            before = gpu.log_path.stat().st_size
            retried = time.monotonic()
            result = cluster.cli("retry", "--failed")
            notes.append(f"`retry --failed`: exit {result.returncode}")
            cluster.wait(job_ids, timeout=1800)
            statuses = [(cluster.state.get(j) or {}).get("status", "lost") for j in job_ids]
            with gpu.log_path.open("rb") as handle:
                handle.seek(before)
                tail = handle.read().decode(errors="replace")
            from tests.faults.test_partial_results import generated_rows

            generated = ", ".join(f"{n} {kind}" for kind, n in sorted(generated_rows(tail).items()))
            notes.append(f"then done {time.monotonic() - retried:.0f} s later, generating only {generated}")
        elif name in ("gpu-hang", "ffmpeg-hang"):
            worker = gpu if name == "gpu-hang" else cluster.workers["media"]
            log = worker.log_tail(10_000_000)
            fired = _logged_at(log, "blocks for ever" if name == "gpu-hang" else "reads a stalled input")
            stopped = _logged_at(log, "passed its deadline" if name == "gpu-hang" else "stopped at its deadline")
            units = _timed_out(cluster, job_ids)
            if fired and stopped and units:
                deadline = stopped - fired
                back = ", ".join(f"{done - fired:.0f}" for _, _, done in units if done)
                notes.append(
                    f"stopped {deadline:.0f} s after it hung (deadline 30 s + 0.1 s per s of media + 0.05 s per "
                    f"token); {len(units)} unit(s) counted a death and done {back} s after the hang"
                )
            if name == "gpu-hang":
                notes.append(f"worker restarted in place: {'starting it again' in log}")
        if name == "concurrent-enqueue":
            notes.append(f"finalized once per job: {all(cluster.counter(j, 'finalized') == 1 for j in job_ids)}")
        return {
            "scenario": name,
            "jobs": len(job_ids),
            "done": statuses.count("done"),
            "failed": statuses.count("failed"),
            "partial": statuses.count("partial"),
            "stuck_or_lost": sum(1 for s in statuses if s not in ("done", "failed", "partial")),
            "wall_s": round(time.monotonic() - started, 1),
            "notes": ", ".join(notes),
        }
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="omniq-bench-faults-"))
    cache = root / "cache"
    ensure_tiny_model(cache)
    media = [
        make_sample(root / f"clip{i}.mp4", 60.0 + 30.0 * i / max(1, args.files - 1), size="320x240")
        for i in range(args.files)
    ]
    rows = []
    with S3Server() as s3:
        for name in args.scenarios.split(","):
            try:
                row = run(name, s3, cache, media, root)
            except AssertionError as error:  # a scenario that could not be driven: say so, go on
                row = {"scenario": name, "jobs": 0, "done": 0, "failed": 0, "stuck_or_lost": "?", "wall_s": 0}
                row["notes"] = f"not measured: {str(error).splitlines()[0]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| disturbance | jobs | done | failed | partial | stuck / lost | wall | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['scenario']} | {row['jobs']} | {row['done']} | {row['failed']} | {row.get('partial', 0)} "
            f"| {row['stuck_or_lost']} | {row['wall_s']} s | {row['notes']} |"
        )


if __name__ == "__main__":
    main()
