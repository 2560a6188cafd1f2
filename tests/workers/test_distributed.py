"""Distributed runs: real redis-server, real `omniq worker` processes (media + gpu), real S3 over HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import evaluation, job
from pipeline.config import Settings
from pipeline.media.sample import make_sample
from pipeline.media.voice import SENTENCES
from pipeline.storage import S3Storage
from tests.browser import chromium_page
from tests.conftest import EMBEDDING_MODEL, use_broker
from tests.servers import NotificationReceiver, find_free_port
from workers.producer import enqueue
from workers.state import JobState

pytestmark = pytest.mark.slow

NOTIFY_SECRET = "notify-secret-for-the-cluster"
WORKER_ENV = {
    "OMNIQ_MODEL": "tiny",
    "OMNIQ_CHUNK_SECONDS": "10",
    "OMNIQ_FPS": "1",
    "OMNIQ_FRAME_MAX_PIXELS": str(96 * 96),
    "OMNIQ_BATCH_SIZE": "2",
    "OMNIQ_TRANSCRIPT_MAX_NEW_TOKENS": "12",
    "OMNIQ_CAPTION_MAX_NEW_TOKENS": "12",
    "OMNIQ_SUMMARY_MAX_NEW_TOKENS": "8",
    "OMNIQ_RETRY_BUDGET_SECONDS": "20",
    "OMNIQ_RETRY_MIN_SECONDS": "1",
    "OMNIQ_EMBEDDING_MODEL": EMBEDDING_MODEL,  # the default: the media worker embeds what it indexes
}


@pytest.fixture(scope="module")
def cluster(redis_url, s3_server, tiny_cache_dir, tmp_path_factory):
    """A bucket, the environment every omniq process shares, and one media and one gpu worker."""
    bucket = "omniq-dist"
    s3_server.create_bucket(bucket)
    logs = tmp_path_factory.mktemp("worker-logs")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OMNIQ_", "AWS_"))},
        **WORKER_ENV,
        "OMNIQ_BROKER_URL": redis_url,
        "OMNIQ_STORAGE_URL": f"s3://{bucket}/lib",
        "OMNIQ_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "OMNIQ_CACHE_DIR": str(tiny_cache_dir),
        "OMNIQ_INDEX_URL": f"sqlite:///{logs}/index.sqlite",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    receiver = NotificationReceiver(NOTIFY_SECRET)  # the workers notify it of every ended job
    env |= {"OMNIQ_NOTIFY_URL": receiver.url, "OMNIQ_NOTIFY_SECRET": NOTIFY_SECRET}
    workers = []
    metrics_ports = {"media": find_free_port(), "gpu": find_free_port()}
    for queue in ("media", "gpu"):
        log = (logs / f"{queue}.log").open("w")
        command = [sys.executable, "-m", "workers.cli", "-v", "worker", "--queue", queue, "--concurrency", "1"]
        command += ["--metrics-port", str(metrics_ports[queue])]
        workers.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the producer in this process uses the same settings

    use_broker(redis_url)
    try:
        settings = Settings()
        yield {
            "env": env,
            "settings": settings,
            "storage": S3Storage(bucket, "lib", settings),
            "state": JobState.from_url(redis_url),
            "logs": logs,
            "s3": s3_server,
            "bucket": bucket,
            "metrics_ports": metrics_ports,
            "receiver": receiver,
        }
    finally:
        receiver.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for process, log in workers:
            process.terminate()
        for process, log in workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


def _wait(cluster, job_ids, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [cluster["state"].get(j) for j in job_ids]
        if all(j and j["status"] in ("done", "failed") for j in jobs):
            return {j["job_id"]: j for j in jobs}
        time.sleep(0.5)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in cluster["logs"].glob("*.log"))
    raise AssertionError(f"jobs not finished in {timeout}s: {[cluster['state'].get(j) for j in job_ids]}\n{logs}")


def _scrape(port):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _value(samples, name, **labels):
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _cli(cluster, *args):
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=cluster["env"], timeout=120
    )


def _manifest(cluster, media_id):
    """The manifest (a failed job's follows its status by a moment: wait for it, within limits)."""
    key = f"results/{media_id}/manifest.json"
    deadline = time.monotonic() + 30
    while not cluster["storage"].exists(key) and time.monotonic() < deadline:
        time.sleep(0.2)
    return json.loads(cluster["storage"].get_bytes(key))


def test_several_files_with_s3_storage(cluster, tmp_path):
    audio = make_sample(tmp_path / "podcast.mp3", 14.0, video=False)
    cluster["s3"].client().upload_file(str(audio), cluster["bucket"], "incoming/podcast.mp3")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 1000)
    sources = [
        str(make_sample(tmp_path / "talk.mp4", 23.0)),
        str(corrupt),
        str(make_sample(tmp_path / "silent.mp4", 12.0, audio=False)),
        f"s3://{cluster['bucket']}/incoming/podcast.mp3",
    ]
    outcomes = enqueue(sources, cluster["settings"], cluster["storage"], cluster["state"], tag="batch-1", priority=7)
    assert [o.status for o in outcomes] == ["enqueued"] * 4
    jobs = _wait(cluster, [o.job_id for o in outcomes])
    talk, bad, silent, podcast = (jobs[o.job_id] for o in outcomes)

    assert bad["status"] == "failed" and "corrupt.mp4" in bad["error"]
    bad_manifest = _manifest(cluster, bad["media_id"])
    assert bad_manifest["status"] == "failed" and "corrupt.mp4" in bad_manifest["error"]
    assert "omniq-ingest" not in bad["error"] and "Errno" not in bad["error"]  # the source, not the worker's copy
    assert bad_manifest["timings"]["total_s"] > 0  # a failed manifest keeps its timings
    media_log = (cluster["logs"] / "media.log").read_text()
    errors = [line for line in media_log.splitlines() if bad["job_id"] in line and " ERROR " in line]
    assert len(errors) == 1 and "raised unexpected" not in media_log, errors  # one line, no traceback

    for good in (talk, silent, podcast):  # the worker kept serving after the corrupt file
        assert good["status"] == "done", good
        assert good["chunks_done"] == good["chunks_total"] > 0
        keys = set(cluster["storage"].list_keys(f"results/{good['media_id']}"))
        assert {k.rsplit("/", 1)[1] for k in keys if "/thumbnails/" not in k} == set(job.RESULT_FILES)
        manifest = _manifest(cluster, good["media_id"])
        assert manifest["status"] == "done" and manifest["random_weights"] is True
        assert manifest["tag"] == "batch-1"
        assert manifest["outputs"]["transcript.srt"].startswith(f"s3://{cluster['bucket']}/lib/results/")
        assert list(cluster["storage"].list_keys(f"work/{good['job_id']}")) == []
    podcast_manifest = _manifest(cluster, podcast["media_id"])
    assert podcast_manifest["source"] == sources[3]
    assert podcast_manifest["input_uri"] == sources[3]  # read in place by the media worker, not copied
    talk_manifest = _manifest(cluster, talk["media_id"])
    assert talk_manifest["input_uri"].startswith(f"s3://{cluster['bucket']}/lib/work/")  # a local file is uploaded
    assert json.loads(cluster["storage"].get_bytes(f"results/{silent['media_id']}/transcript.json"))["segments"] == []
    assert json.loads(cluster["storage"].get_bytes(f"results/{talk['media_id']}/captions.json"))["chunks"][2][
        "end"
    ] == pytest.approx(23.0, abs=0.1)

    # Whisper tiny.en wrote the transcripts (the default with the tiny model): the sentences said, timed by word
    transcript = json.loads(cluster["storage"].get_bytes(f"results/{podcast['media_id']}/transcript.json"))
    assert (transcript["transcriber"], transcript["times"], podcast_manifest["transcriber"]) == (
        "whisper",
        "words",
        "whisper",
    )
    said = " ".join(s["text"] for s in transcript["segments"])
    # (tiny.en on espeak-ng's voice: "Every utterance gets its own subtitle" is beyond it; quality bounds are in
    # tests/pipeline/test_whisper.py, on plainer sentences)
    assert {"welcome", "demonstration", "sample", "spoken"} <= set(evaluation.normalise(said)), said
    assert evaluation.word_error_rate(" ".join(SENTENCES[:3]), said) < 0.8, said  # random text is ~1
    assert all(s["words"] and s["start"] <= s["words"][0]["start"] for s in transcript["segments"])
    # finished jobs are searchable: a word that was said finds its segment and time span
    segment = next(s for s in transcript["segments"] if "demonstration" in s["text"].lower())
    word = max(re.findall(r"[^\W_]+", segment["text"]), key=len)
    found = _cli(cluster, "search", word, "--json", "--limit", "50")
    hits = [h for h in json.loads(found.stdout) if h["media_id"] == podcast["media_id"] and h["kind"] == "transcript"]
    assert any(h["start"] == segment["start"] and h["end"] == segment["end"] for h in hits), found.stdout
    assert not any(h["media_id"] == bad["media_id"] for h in json.loads(found.stdout))
    # and by meaning: the media worker embedded every entry when it indexed the job
    meant = _cli(cluster, "search", "welcoming you to the show", "--mode", "meaning", "--json",
                 "--media", podcast["media_id"], "--kind", "transcript", "--limit", "1")  # fmt: skip
    assert json.loads(meant.stdout)[0]["start"] == segment["start"], meant.stdout + str(transcript["segments"])
    rebuilt = _cli(cluster, "index", "rebuild")
    assert rebuilt.returncode == 0 and "3" in rebuilt.stdout + rebuilt.stderr  # the three done files

    # the same files again: nothing to do, unless forced
    again = enqueue(sources[:1], cluster["settings"], cluster["storage"], cluster["state"])
    assert again[0].status == "skipped" and again[0].job_id == outcomes[0].job_id
    forced = enqueue(sources[:1], cluster["settings"], cluster["storage"], cluster["state"], force=True)
    assert forced[0].status == "enqueued"
    assert _wait(cluster, [forced[0].job_id])[forced[0].job_id]["status"] == "done"

    # both workers expose Prometheus metrics labelled by queue and model
    media = _scrape(cluster["metrics_ports"]["media"])
    gpu = _scrape(cluster["metrics_ports"]["gpu"])
    assert _value(media, "omniq_jobs_total", queue="media", model="tiny", status="done") >= 3
    assert _value(media, "omniq_jobs_total", queue="media", model="tiny", status="failed") >= 1
    assert _value(media, "omniq_media_seconds_total", queue="media", model="tiny") >= 23.0 + 12.0 + 14.0 - 1
    assert _value(media, "omniq_ffmpeg_seconds_count", queue="media", model="tiny") >= 3
    assert _value(gpu, "omniq_chunks_total", queue="gpu", model="tiny") >= 3 + 2 + 2
    assert _value(gpu, "omniq_generated_tokens_total", queue="gpu", model="tiny") > 0
    assert _value(gpu, "omniq_batch_size_count", queue="gpu", model="tiny") > 0
    assert _value(gpu, "omniq_generated_tokens_per_second_count", queue="gpu", model="tiny") > 0
    assert _value(gpu, "omniq_model_seconds_total", queue="gpu", model="tiny") > 0
    assert _value(gpu, "omniq_asr_seconds_total", queue="gpu", model="tiny") > 0  # Whisper, in the GPU worker
    assert _value(gpu, "omniq_asr_audio_seconds_total", queue="gpu", model="tiny") >= 10
    assert _value(gpu, "omniq_queue_wait_seconds_count", queue="gpu", model="tiny", task="omniq.infer") > 0
    assert _value(media, "omniq_task_seconds_count", queue="media", model="tiny", task="omniq.ingest") >= 4

    # omniq status shows every job with its chunk progress
    listing = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", "--json"],
        capture_output=True,
        text=True,
        env=cluster["env"],
        timeout=60,
    )
    rows = {row["job_id"]: row for row in json.loads(listing.stdout)}
    assert rows[talk["job_id"]]["status"] == "done" and rows[talk["job_id"]]["chunks_done"] == 3
    assert {"job_id", "source", "status", "chunks_total", "chunks_done", "error"} <= set(rows[bad["job_id"]])
    one = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", bad["job_id"], "--json"],
        capture_output=True,
        text=True,
        env=cluster["env"],
        timeout=60,
    )
    assert json.loads(one.stdout)["status"] == "failed"


def test_duplicate_chunk_delivery_finalizes_once(cluster, tmp_path):
    from workers.tasks import infer, summarize

    path = make_sample(tmp_path / "dup.mp4", 23.0)
    settings, storage, state = cluster["settings"], cluster["storage"], cluster["state"]
    spec = job.make_spec(str(path), settings)
    state.create(spec.job_id, spec.source, spec.media_id, spec.to_dict())
    plan = job.ingest(spec, settings, storage)  # the media step, run here so the chunk messages can be doubled
    state.advance(spec.job_id, "running", chunks_total=len(plan.chunks))
    groups = [[0, 1], [2]]
    assert len(plan.chunks) == 3
    for group in groups + groups:  # every chunk message delivered twice, same task id as a redelivery has
        infer.publish(
            5, f"{spec.job_id}-infer-{group[0]}", model="tiny", job_id=spec.job_id, source=spec.source, chunks=group
        )
    final = _wait(cluster, [spec.job_id])[spec.job_id]
    assert final["status"] == "done"
    counters = state.redis.hgetall(JobState.key(spec.job_id))
    assert counters["summarize_sent"] == "1"  # only the delivery that completed the last chunk sent it
    assert counters["summarize_runs"] == "1" and counters["finalize_runs"] == "1"
    transcript = json.loads(storage.get_bytes(f"results/{spec.media_id}/transcript.json"))
    starts = [s["start"] for s in transcript["segments"]]
    assert starts == sorted(set(starts))  # no segment written twice
    summary = json.loads(storage.get_bytes(f"results/{spec.media_id}/summary.json"))
    assert [c["index"] for c in summary["chunks"]] == [0, 1, 2]

    # late duplicates after the job finished change nothing
    before = storage.get_bytes(f"results/{spec.media_id}/manifest.json")
    infer.publish(5, model="tiny", job_id=spec.job_id, source=spec.source, chunks=[0, 1])
    summarize.publish(5, model="tiny", job_id=spec.job_id, source=spec.source)
    after = make_sample(tmp_path / "after.mp3", 4.0, video=False)
    later = enqueue([str(after)], settings, storage, state)[0]  # the gpu worker takes messages in order
    assert _wait(cluster, [later.job_id])[later.job_id]["status"] == "done"
    assert storage.get_bytes(f"results/{spec.media_id}/manifest.json") == before
    assert state.get(spec.job_id)["status"] == "done"
    assert state.redis.hget(JobState.key(spec.job_id), "summarize_runs") == "1"
    # the job's events: one per change, the doubled and late deliveries added none
    from workers.job_events import read_events

    events = [e for e in read_events(state.redis, count=100_000) if e.job_id == spec.job_id]
    assert [e.event for e in events] == [
        "queued",
        "running",
        "progress",
        "progress",
        "summarizing",
        "finalizing",
        "done",
    ]
    assert [e.chunks_done for e in events if e.event == "progress"] in ([2, 3], [1, 3])


def test_flower_lists_omniq_tasks(cluster, tmp_path):
    """Flower for omniq's app shows every task with a readable name, job id and source (checked in Chromium)."""
    port = find_free_port()
    env = {**cluster["env"], "OMNIQ_FLOWER_BASIC_AUTH": "admin:flower-test-pw"}
    log = (cluster["logs"] / "flower.log").open("w")
    flower = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "flower", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthcheck", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, (cluster["logs"] / "flower.log").read_text()[-2000:]
                time.sleep(0.5)
        time.sleep(2)  # Flower subscribes to task events after it starts serving
        clip = make_sample(tmp_path / "flower-clip.mp3", 6.0, video=False)
        outcome = enqueue([str(clip)], cluster["settings"], cluster["storage"], cluster["state"])[0]
        assert _wait(cluster, [outcome.job_id])[outcome.job_id]["status"] == "done"

        with pytest.raises(urllib.error.HTTPError) as refused:  # basic auth is enforced
            urllib.request.urlopen(f"{base}/tasks", timeout=5)
        assert refused.value.code == 401

        with chromium_page(http_credentials={"username": "admin", "password": "flower-test-pw"}) as page:
            page.goto(f"{base}/tasks")
            for name in ("omniq.ingest", "omniq.infer", "omniq.summarize", "omniq.finalize"):
                page.wait_for_selector(f"text={name}", timeout=30_000)
            listing = page.inner_text("body")
            assert listing.count(outcome.job_id) >= 4  # task ids name the job: ingest, infer, summarize, finalize
            artifacts = Path(__file__).resolve().parents[2] / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "flower-tasks.png"), full_page=True)
            page.goto(f"{base}/task/{outcome.job_id}-infer-0")  # one task's page: readable arguments
            page.wait_for_selector("text=omniq.infer", timeout=30_000)
            detail = page.inner_text("body")
            assert "flower-clip.mp3" in detail and "chunks=[0" in detail and outcome.job_id in detail
            compact = re.sub(r"\s+", "", listing)
            assert "media-" in compact and "gpu-" in compact  # the worker names say which queue they serve
            page.screenshot(path=str(artifacts / "flower-task-detail.png"), full_page=True)
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=15)
        except subprocess.TimeoutExpired:
            flower.kill()
        log.close()


def test_crafted_messages_change_no_worker_setting_and_read_no_local_file(cluster, tmp_path):
    """What a review sent straight to the media queue (anyone holding the Redis password can): a spec that sets
    the worker's S3 endpoint and limits, one that reads /etc/passwd as its input, one whose source is
    /etc/passwd, and one for a job Redis does not know. None reaches the endpoint or opens the file."""
    import socket
    import threading

    from pipeline.config import config_hash_of
    from pipeline.sources import SourceRef, job_id_for, resolve_source
    from workers.tasks import ingest

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    connections, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                connections.append(listener.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    attacker = f"http://127.0.0.1:{listener.getsockname()[1]}"
    settings, storage, state = cluster["settings"], cluster["storage"], cluster["state"]
    clip = make_sample(tmp_path / "crafted.mp3", 3.0, video=False)
    cluster["s3"].client().upload_file(str(clip), cluster["bucket"], "incoming/crafted.mp3")
    real = resolve_source(f"s3://{cluster['bucket']}/incoming/crafted.mp3", settings)
    passwd = Path("/etc/passwd").stat()

    def forged(source, fingerprint, input_uri=None, **config):
        full = settings.effective_config() | config
        media_id = SourceRef(source, fingerprint, 0).media_id
        job_id = job_id_for(media_id, config_hash_of(full))
        spec = {"job_id": job_id, "media_id": media_id, "source": source, "input_uri": input_uri or source,
                "fingerprint": fingerprint, "config": full, "tag": None, "priority": 5, "run_id": None}  # fmt: skip
        return spec

    cases = {
        "only output-shaping settings": forged(
            real.uri, real.fingerprint, s3_endpoint_url=attacker, max_file_bytes=10**15
        ),
        "neither its source nor its copy": forged(real.uri, real.fingerprint, input_uri="file:///etc/passwd"),
        "OMNIQ_LOCAL_SOURCE_ROOTS": forged(
            "file:///etc/passwd", f"size={passwd.st_size};mtime_ns={passwd.st_mtime_ns}"
        ),
    }
    before = _value(_scrape(cluster["metrics_ports"]["media"]), "omniq_malformed_messages_total", task="omniq.ingest")
    for spec in cases.values():
        state.create(spec["job_id"], spec["source"], spec["media_id"], spec)
        ingest.publish(5, f"{spec['job_id']}-ingest", job_id=spec["job_id"], source=spec["source"], spec=spec)
    unknown = forged(real.uri, real.fingerprint, input_uri="file:///etc/shadow", fps=1.5)
    ingest.publish(5, job_id=unknown["job_id"], source=unknown["source"], spec=unknown)  # no job record: dropped
    try:
        ended = _wait(cluster, [spec["job_id"] for spec in cases.values()], timeout=120)
        for reason, spec in cases.items():
            assert ended[spec["job_id"]]["status"] == "failed" and reason in ended[spec["job_id"]]["error"]
            assert not storage.exists(f"work/{spec['job_id']}/plan.json")  # never probed, never decoded
            assert not storage.exists(f"results/{spec['media_id']}/transcript.json")
        assert state.get(unknown["job_id"]) is None
        deadline = time.monotonic() + 30
        while "dropping a malformed omniq.ingest" not in (cluster["logs"] / "media.log").read_text():
            assert time.monotonic() < deadline, "the message for an unknown job was not dropped"
            time.sleep(0.2)
        refused = _value(
            _scrape(cluster["metrics_ports"]["media"]), "omniq_malformed_messages_total", task="omniq.ingest"
        )
        assert refused - before == 3  # the endpoint and input forgeries and the unknown job; a root is a job failure
        assert connections == []  # the worker's S3 credentials went nowhere else

        # a pickle that would touch a file when loaded: workers take JSON only
        from workers.app import app

        marker = tmp_path / "unpickled"
        app.send_task("omniq.ingest", kwargs={"job_id": _Touch(marker)}, queue="media", serializer="pickle")
        legit = enqueue([str(make_sample(tmp_path / "after-crafted.mp3", 3.0, video=False))], settings, storage, state)
        final = _wait(cluster, [legit[0].job_id])[legit[0].job_id]
        assert final["status"] == "done" and not marker.exists()
        logs = {name: (cluster["logs"] / f"{name}.log").read_text() for name in ("media", "gpu")}
        assert "Refusing to deserialize untrusted content of type pickle" in logs["media"]
        # and no secret in logs, manifests or status output
        secrets = (cluster["env"]["AWS_SECRET_ACCESS_KEY"], NOTIFY_SECRET)
        manifest = storage.get_bytes(f"results/{final['media_id']}/manifest.json").decode()
        status = _cli(cluster, "status", "--json")
        assert status.returncode == 0
        for text in (*logs.values(), manifest, status.stdout, status.stderr):
            assert not any(secret in text for secret in secrets)
    finally:
        stop.set()
        listener.close()


class _Touch:
    """Pickled, it says: create this file when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_ended_jobs_are_notified_once_signed(cluster, tmp_path):
    """Both workers run a notifier in one consumer group: each ended job is POSTed once, signed."""
    settings, storage, state = cluster["settings"], cluster["storage"], cluster["state"]
    clip = make_sample(tmp_path / "notified.mp3", 4.0, video=False)
    (outcome,) = enqueue([str(clip)], settings, storage, state)
    final = _wait(cluster, [outcome.job_id])[outcome.job_id]
    assert final["status"] == "done"
    receiver = cluster["receiver"]
    mine = lambda: [r for r in receiver.requests if r["body"]["job_id"] == outcome.job_id]  # noqa: E731
    deadline = time.monotonic() + 30
    while not mine():
        assert time.monotonic() < deadline, "no notification for the job"
        time.sleep(0.2)
    time.sleep(2)  # a second delivery would come now
    (delivery,) = mine()
    assert delivery["signed"] and delivery["status"] == 200
    body = delivery["body"]
    assert (body["event"], body["status"], body["media_id"]) == ("done", "done", final["media_id"])
    assert body["result_uri"] == storage.uri(f"results/{final['media_id']}/manifest.json")
    assert body["manifest"]["status"] == "done" and body["manifest"]["duration_s"] > 3
    timings = json.loads(storage.get_bytes(f"results/{final['media_id']}/manifest.json"))["timings"]
    assert {"ingest_s", "infer_s", "summarize_s", "total_s"} <= set(timings)  # as a local run records them
