"""Signed queue messages (OMNIQ_SIGNING_*): a real media worker accepts only messages signed by a trusted key.

Real redis-server, a real ``omniq worker`` process and real ``omniq enqueue`` processes; keys and certificates
are made here with ``cryptography`` (what Celery's ``auth`` serializer uses).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.media.sample import make_sample
from pipeline.storage import LocalStorage
from workers.app import signing_config
from workers.producer import enqueue

pytestmark = pytest.mark.slow


def make_identity(directory: Path, name: str) -> tuple[Path, Path]:
    """An RSA key and a self-signed certificate for it (PEM files in ``directory``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_signing_settings_are_all_or_none(tmp_path):
    with pytest.raises(ValueError, match="OMNIQ_SIGNING_KEY, OMNIQ_SIGNING_CERT and OMNIQ_SIGNING_CERT_STORE"):
        Settings(signing_key=tmp_path / "k")
    with pytest.raises(ConfigError, match="OMNIQ_SIGNING_KEY=.*no such file"):
        signing_config(Settings(signing_key=tmp_path / "k", signing_cert=tmp_path / "c", signing_cert_store=tmp_path))
    key, cert = make_identity(tmp_path / "id", "producer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="OMNIQ_SIGNING_CERT_STORE"):
        signing_config(Settings(signing_key=key, signing_cert=cert, signing_cert_store=tmp_path / "empty"))
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        signing_config(Settings(signing_key=key, signing_cert=cert, signing_cert_store=key.parent))  # the key too
    assert signing_config(Settings()) == {}


def test_a_signing_worker_runs_only_messages_signed_by_a_trusted_key(broker, tmp_path, tiny_cache_dir):
    url, client, state = broker
    fleet_key, fleet_cert = make_identity(tmp_path / "fleet", "omniq-fleet")
    stranger_key, stranger_cert = make_identity(tmp_path / "stranger", "stranger")
    store, stranger_store = tmp_path / "trusted", tmp_path / "stranger-trusts"
    for folder, cert in ((store, fleet_cert), (stranger_store, stranger_cert)):
        folder.mkdir()
        (folder / cert.name).write_bytes(cert.read_bytes())
    storage = LocalStorage(tmp_path / "store")
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OMNIQ_", "AWS_"))},
        "OMNIQ_BROKER_URL": url,
        "OMNIQ_STORAGE_URL": storage.url,
        "OMNIQ_MODEL": "tiny",
        "OMNIQ_CACHE_DIR": str(tiny_cache_dir),
        "OMNIQ_WATCHDOG_INTERVAL_SECONDS": "0",  # the watchdog re-sends job records, signed: see README Security
    }
    fleet = base | {
        "OMNIQ_SIGNING_KEY": str(fleet_key),
        "OMNIQ_SIGNING_CERT": str(fleet_cert),
        "OMNIQ_SIGNING_CERT_STORE": str(store),
    }
    stranger = base | {
        "OMNIQ_SIGNING_KEY": str(stranger_key),
        "OMNIQ_SIGNING_CERT": str(stranger_cert),
        "OMNIQ_SIGNING_CERT_STORE": str(stranger_store),
    }
    clips = [make_sample(tmp_path / f"{name}.mp3", 2.0, video=False) for name in ("unsigned", "stranger", "fleet")]
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "-v", "worker", "--queue", "media", "--concurrency", "1"],
            env=fleet,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # an unsigned message, as anyone who can write to Redis can send (this process has no key)
        settings = Settings(broker_url=url, storage_url=storage.url, model="tiny")
        (unsigned,) = enqueue([str(clips[0])], settings, storage, state)

        def signed_enqueue(env: dict[str, str], clip: Path) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "workers.cli", "enqueue", "--json", str(clip)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)[0]["job_id"]

        by_stranger = signed_enqueue(stranger, clips[1])
        by_fleet = signed_enqueue(fleet, clips[2])
        deadline = time.monotonic() + 120
        while state.status(by_fleet) in ("queued", "ingesting"):  # the media queue is served in order
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        assert state.status(by_fleet) == "running"  # ingested: its infer messages wait for a GPU worker
        assert state.status(unsigned.job_id) == "queued" and state.status(by_stranger) == "queued"
        assert not storage.exists(f"work/{unsigned.job_id}/plan.json")
        assert not storage.exists(f"work/{by_stranger}/plan.json")
        text = log_path.read_text()
        assert "Refusing to deserialize untrusted content of type json" in text, text[-3000:]  # unsigned
        assert "Unknown certificate: b'stranger" in text, text[-3000:]  # signed, by a key the fleet does not trust
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_the_watchdog_reads_which_unit_a_signed_message_carries(tmp_path):
    """A worker that dies holding a signed message leaves it in kombu's unacked hash; the watchdog must still
    see which unit it was (it then sends the unit again from the job's record, signed by itself)."""
    import base64

    from celery.security.certificate import Certificate
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    from workers.reliability.deliveries import SIGNED, parse_delivery

    key, cert = make_identity(tmp_path, "omniq-fleet")
    serializer = SecureSerializer(PrivateKey(key.read_text()), Certificate(cert.read_text()), digest="sha256")
    kwargs = {"job_id": "j1", "source": "s3://b/a.mp4", "chunks": [0, 1], "unit": "infer-0"}
    body = serializer.serialize([[], kwargs, {}])
    stored = [
        {
            "body": base64.b64encode(body.encode()).decode(),
            "content-type": SIGNED,
            "properties": {"body_encoding": "base64"},
            "headers": {"task": "omniq.infer"},
        },
        "",
        "gpu.tiny",
    ]
    delivery = parse_delivery("tag-1", json.dumps(stored))
    assert delivery is not None and (delivery.task, delivery.kwargs) == ("omniq.infer", kwargs)
