"""A real AWS-like endpoint for tests: ``moto_server`` (moto in server mode) on a free 127.0.0.1 port.

One process serves S3, SQS, SNS and EventBridge over HTTP, and delivers bucket notifications to queues,
topics and rules the way AWS does, so the triggers are tested against real requests and real payloads.
It accepts any credentials. Like ``tests/servers.py`` this module does not import pytest::

    with MotoServer() as moto:
        s3 = moto.client("s3")
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.servers import LOOPBACK, _ServerProcess, script_binary


def moto_server_binary() -> str:
    """Path of the ``moto_server`` script that ``moto[server]`` installs next to this Python."""
    return script_binary("moto_server", "moto[server]")


class MotoServer(_ServerProcess):
    """A throwaway ``moto_server``; ``client(service)`` gives boto3 clients pointed at it."""

    name = "moto"
    region = "us-east-1"
    account_id = "123456789012"  # moto's default account: ARNs of its queues and topics carry it
    access_key = "testing"
    secret_key = "testing"  # moto accepts any credentials

    def __init__(self, binary: str | None = None, startup_timeout: float = 30.0) -> None:
        super().__init__(binary or moto_server_binary(), startup_timeout)
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client(self, service: str, **overrides: Any) -> Any:
        """A boto3 client for ``service`` on this server; ``overrides`` replace any ``boto3.client`` argument."""
        arguments: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"}),
        }
        arguments.update(overrides)
        return boto3.session.Session().client(service, **arguments)

    def _use_ports(self, ports: list[int]) -> None:
        (self.port,) = ports

    def _command(self, directory: Path) -> list[str]:
        return [self.binary, "--host", LOOPBACK, "--port", str(self.port)]

    def _environment(self) -> dict[str, str]:
        # The server must not pick up a developer's real AWS settings (or MOTO_* switches) from the caller.
        return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError) as error:
            self._not_ready_reason = f"GET {self.endpoint_url}/moto-api/ failed: {error}"
            return False
