"""The test servers themselves: real Redis and an S3 endpoint that really checks signatures."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import botocore
import pytest
import redis
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.servers import LOOPBACK, WEED_PORT_FLAGS, RedisServer, S3Server, weed_mini_command

_TCP_LISTEN = "0A"


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that process ``pid`` listens on, read from /proc (Linux)."""
    socket_inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            socket_inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != _TCP_LISTEN or inode not in socket_inodes:
                continue
            address_hex, port_hex = local.split(":")
            # /proc prints the address as 32-bit words in host (little-endian) byte order.
            raw = b"".join(bytes.fromhex(address_hex[i : i + 8])[::-1] for i in range(0, len(address_hex), 8))
            found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except ConnectionRefusedError:
        return False


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


# -- Redis ----------------------------------------------------------------------------------------------


def test_redis_answers_ping_and_set_get(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        client.set("omniq-test:servers", b"hello", ex=60)
        assert client.get("omniq-test:servers") == b"hello"
        client.delete("omniq-test:servers")
    finally:
        client.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc")
def test_redis_server_listens_only_on_loopback():
    with RedisServer() as server:
        assert listening_addresses(server.pid) == {(LOOPBACK, server.port)}
        assert server.url == f"redis://127.0.0.1:{server.port}/0"


def test_stopping_redis_releases_its_port():
    with RedisServer() as server:
        port = server.port
        process_id = server.pid
        assert accepts_connections(port)
    assert not accepts_connections(port)
    assert not Path(f"/proc/{process_id}").exists()
    assert server.directory is None


# -- S3 -------------------------------------------------------------------------------------------------


def test_s3_signed_object_round_trip(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="media/a.txt", Body=b"first")
    client.put_object(Bucket=s3_bucket, Key="media/b.txt", Body=b"second")

    assert client.get_object(Bucket=s3_bucket, Key="media/a.txt")["Body"].read() == b"first"
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="media/")
    assert [item["Key"] for item in listed["Contents"]] == ["media/a.txt", "media/b.txt"]

    client.delete_object(Bucket=s3_bucket, Key="media/a.txt")
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="media/")
    assert [item["Key"] for item in listed["Contents"]] == ["media/b.txt"]
    assert s3_bucket in [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]


def test_s3_bucket_fixture_gives_fresh_empty_buckets(s3_server, s3_bucket):
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    assert s3_server.create_bucket(s3_bucket) == s3_bucket  # creating it again is harmless


@pytest.mark.parametrize(
    ("credentials", "expected_code"),
    [
        ({"aws_secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"aws_access_key_id": "AKIANOBODY", "aws_secret_access_key": "not-the-secret"}, "InvalidAccessKeyId"),
    ],
    ids=["wrong-secret", "unknown-access-key"],
)
def test_s3_rejects_bad_signatures(s3_server, s3_bucket, credentials, expected_code):
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept.txt", Body=b"kept")
    impostor = s3_server.client(**credentials)

    with pytest.raises(ClientError) as excinfo:
        impostor.get_object(Bucket=s3_bucket, Key="kept.txt")
    assert error_code(excinfo) == expected_code
    with pytest.raises(ClientError) as excinfo:
        impostor.put_object(Bucket=s3_bucket, Key="planted.txt", Body=b"nope")
    assert error_code(excinfo) == expected_code
    with pytest.raises(ClientError) as excinfo:
        impostor.list_buckets()
    assert error_code(excinfo) == expected_code

    keys = [item["Key"] for item in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["kept.txt"]


def test_s3_rejects_unsigned_requests(s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept.txt", Body=b"kept")
    anonymous = s3_server.client(config=Config(signature_version=botocore.UNSIGNED, retries={"max_attempts": 1}))

    for request in (
        lambda: anonymous.get_object(Bucket=s3_bucket, Key="kept.txt"),
        lambda: anonymous.put_object(Bucket=s3_bucket, Key="planted.txt", Body=b"nope"),
        lambda: anonymous.list_objects_v2(Bucket=s3_bucket),
        lambda: anonymous.list_buckets(),
    ):
        with pytest.raises(ClientError) as excinfo:
            request()
        assert error_code(excinfo) == "AccessDenied"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc")
def test_s3_server_listens_only_on_loopback(s3_server):
    listening = listening_addresses(s3_server.pid)
    assert {address for address, _ in listening} == {LOOPBACK}
    # Every port it opened is one we chose, so none can clash with a fixed default such as 8333.
    assert {port for _, port in listening} == set(s3_server.ports.values())


def test_stopping_s3_releases_its_ports():
    with S3Server() as server:
        ports = dict(server.ports)
        process_id = server.pid
        directory = server.directory
        assert accepts_connections(server.port)
    assert not [flag for flag, port in ports.items() if accepts_connections(port)]
    assert not Path(f"/proc/{process_id}").exists()
    assert directory is not None and not directory.exists()
    grpc_sockets = [
        Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")
        for flag, port in ports.items()
        if flag.endswith(".grpc")
    ]
    assert not [path for path in grpc_sockets if path.exists()]


def test_weed_command_binds_every_port_to_loopback():
    ports = {flag: 20000 + index for index, flag in enumerate(WEED_PORT_FLAGS)}
    command = weed_mini_command("weed", ports, Path("/srv/s3"), Path("/srv/s3/s3.json"))
    assert command[:2] == ["weed", "mini"]
    assert "-ip.bind=127.0.0.1" in command
    assert "-s3.config=/srv/s3/s3.json" in command
    assert all(f"-{flag}={port}" in command for flag, port in ports.items())
    with pytest.raises(ValueError, match=r"s3\.port"):
        weed_mini_command("weed", {}, Path("/srv/s3"), Path("/srv/s3/s3.json"))
