"""A whole omniq installation for fault tests: Redis (append-only file on), SeaweedFS S3, and real
``omniq worker`` processes that a test can kill, stop and start again.

Processes are killed only by the pid (or process group) this module started, or by the pid a worker wrote
into its own lease; every wait has a time limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import job
from pipeline.config import Settings
from pipeline.storage import S3Storage
from tests.conftest import use_broker
from tests.servers import RedisServer, S3Server
from workers.reliability.leases import lease_key
from workers.state import JobState

# the result files that must come out byte-identical (the manifest and page carry timings and times)
RESULT_FILES = tuple(name for name in job.RESULT_FILES if name not in ("index.html", "manifest.json"))

# Small and fast: short chunks, few frames and tokens. Recovery settings are shortened unless a test
# measures the defaults.
BASE_ENV = {
    "OMNIQ_MODEL": "tiny",
    "OMNIQ_CHUNK_SECONDS": "5",
    "OMNIQ_FPS": "1",
    "OMNIQ_FRAME_MAX_PIXELS": str(64 * 64),
    "OMNIQ_BATCH_SIZE": "2",
    "OMNIQ_TRANSCRIPT_MAX_NEW_TOKENS": "8",
    "OMNIQ_CAPTION_MAX_NEW_TOKENS": "8",
    "OMNIQ_SUMMARY_MAX_NEW_TOKENS": "6",
}
FAST_RECOVERY = {
    "OMNIQ_LEASE_SECONDS": "4",
    "OMNIQ_LEASE_RENEW_SECONDS": "1",
    "OMNIQ_WATCHDOG_INTERVAL_SECONDS": "1",
    "OMNIQ_PUBLISH_GRACE_SECONDS": "3",
    "OMNIQ_RETRY_MIN_SECONDS": "2",
    "OMNIQ_RETRY_MAX_SECONDS": "8",
    "OMNIQ_SOFT_SHUTDOWN_SECONDS": "2",
}


class Worker:
    """One ``omniq worker`` process in its own process group."""

    def __init__(
        self,
        queue: str,
        env: dict[str, str],
        log_dir: Path,
        name: str,
        concurrency: int = 1,
        wrapper: list[str] | None = None,
        args: list[str] | None = None,
        python: str | None = None,
    ) -> None:
        self.queue, self.env, self.name, self.concurrency = queue, env, name, concurrency
        self.python = python or sys.executable  # another environment's, e.g. the vLLM engine's (.venv-vllm)
        self.wrapper = wrapper or []  # e.g. unshare, to run the worker as if on another machine
        self.args = args or []  # more ``omniq worker`` options, e.g. --metrics-port
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Worker:
        command = [*self.wrapper, self.python, "-m", "workers.cli", "-v", "worker", "--queue", self.queue]
        command += ["--concurrency", str(self.concurrency), *self.args]
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} at {time.time():.3f} =====\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (an OOM kill, a spot preemption)."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=20)

    def freeze(self) -> None:
        """SIGSTOP the worker's process group (a machine that hangs); :meth:`thaw` lets it go on."""
        os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def terminate(self, timeout: float = 60.0) -> float:
        """SIGTERM the worker (a deploy) and wait for it to exit; returns how long that took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
            raise AssertionError(f"{self.name} did not stop within {timeout} s of SIGTERM") from None
        return time.monotonic() - started

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class Cluster:
    """Redis + S3 + workers sharing one environment; the test process is the producer."""

    def __init__(self, root: Path, s3: S3Server, extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.s3 = s3
        self.redis = RedisServer(appendonly=True).start()
        self.bucket = s3.create_bucket(f"faults-{os.getpid()}-{int(time.time() * 1000) % 10**8}")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OMNIQ_", "AWS_"))},
            **BASE_ENV,
            **(extra_env or {}),
            "OMNIQ_BROKER_URL": self.redis.url,
            "OMNIQ_STORAGE_URL": f"s3://{self.bucket}/lib",
            "OMNIQ_S3_ENDPOINT_URL": s3.endpoint_url,
            "OMNIQ_INDEX_URL": f"sqlite:///{root}/index.sqlite",
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": s3.region,
        }
        self.workers: dict[str, Worker] = {}
        # the producer in this process signs its S3 requests with the same credentials
        self._saved_env = {k: os.environ.get(k) for k in self.env if k.startswith("AWS_")}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AWS_")})
        self.settings = Settings(**_settings_overrides(self.env))
        self.state = JobState.from_url(self.redis.url, retry_seconds=30)
        self.storage = S3Storage(self.bucket, "lib", self.settings)

    # -- processes --------------------------------------------------------------------------------------

    def add_worker(
        self,
        name: str,
        queue: str,
        concurrency: int = 1,
        env: dict[str, str] | None = None,
        wrapper: list[str] | None = None,
        args: list[str] | None = None,
        python: str | None = None,
    ) -> Worker:
        worker = Worker(queue, {**self.env, **(env or {})}, self.root, name, concurrency, wrapper, args, python)
        self.workers[name] = worker
        return worker.start()

    def retire(self, name: str) -> None:
        """Stop a worker a test added and forget it: later tests act on the installation's usual workers."""
        self.workers.pop(name).terminate()

    def lease_holder_pid(self, job_id: str, unit: str) -> int | None:
        holder = self.state.redis.get(lease_key(job_id, unit))
        return int(holder.split("|")[1]) if holder else None

    def wait_for(self, what: str, predicate: Any, timeout: float, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")

    def close(self) -> None:
        for worker in self.workers.values():
            if worker.alive():
                os.killpg(worker.pid, signal.SIGKILL)
                worker.process.wait(timeout=20)
        self.redis.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {name} ---\n{w.log_tail(chars)}" for name, w in self.workers.items())

    # -- jobs -------------------------------------------------------------------------------------------

    def enqueue(self, paths: list[Path], force: bool = False, **overrides: Any) -> list[str]:
        """Enqueue from this process (the producer), as ``omniq enqueue`` does; returns job ids.
        ``overrides`` change the producer's settings (e.g. ``caption_max_new_tokens`` for longer batches)."""
        from workers.producer import enqueue

        use_broker(self.redis.url)
        settings = self.settings.model_copy(update=overrides)
        outcomes = enqueue([str(p) for p in paths], settings, self.storage, self.state, force=force)
        assert all(o.status == "enqueued" for o in outcomes), [o.to_dict() for o in outcomes]
        return [o.job_id for o in outcomes]

    def wait(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        def finished() -> dict[str, dict[str, Any]] | None:
            jobs = {j: self.state.get(j) for j in job_ids}
            if all(job and job["status"] in ("done", "partial", "failed", "cancelled") for job in jobs.values()):
                return jobs  # type: ignore[return-value]
            return None

        try:
            return self.wait_for(f"jobs {job_ids} to end", finished, timeout, interval=0.3)
        except AssertionError as error:
            states = {}
            for job_id in job_ids:
                job = self.state.get(job_id) or {}
                if job.get("status") not in ("done", "partial", "failed", "cancelled"):
                    leases = {k: self.state.redis.get(k) for k in self.state.redis.scan_iter(f"omniq:lease:{job_id}:*")}
                    states[job_id] = {"job": job, "units": self.state.units(job_id), "leases": leases}
            raise AssertionError(f"{error}\nunfinished: {json.dumps(states, indent=1)}") from None

    def results(self, media_id: str) -> dict[str, bytes]:
        return {name: self.storage.get_bytes(f"results/{media_id}/{name}") for name in RESULT_FILES}

    def manifest(self, media_id: str) -> dict[str, Any]:
        return json.loads(self.storage.get_bytes(f"results/{media_id}/manifest.json"))

    def counter(self, job_id: str, name: str) -> int:
        return int(self.state.redis.hget(JobState.key(job_id), name) or 0)

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
        )


def _settings_overrides(env: dict[str, str]) -> dict[str, Any]:
    """Settings for the producer in this process, from the cluster's environment (not os.environ)."""
    fields = Settings.model_fields
    return {k[6:].lower(): v for k, v in env.items() if k.startswith("OMNIQ_") and k[6:].lower() in fields}


def other_machine_wrapper() -> list[str]:
    """A command prefix that runs a process in its own PID namespace, so that workers outside it cannot see
    it die (as with a worker on another machine); empty where this system does not allow it."""
    wrapper = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    try:
        probe = subprocess.run([*wrapper, "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return wrapper if probe.returncode == 0 else []
