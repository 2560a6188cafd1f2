"""Partial results in-process: a row that fails for good leaves a marked gap while every other row is published,
and a new run of the file runs only what failed (README "Partial results"). Real ffmpeg, the tiny model through
transformers, Whisper tiny.en; failpoints (``pipeline.failpoints``) make a row fail."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import srt

from pipeline import failpoints, prompts
from pipeline.engines.omni import OmniEngine
from pipeline.engines.pipelined import PipelinedEngine
from pipeline.infer import infer_chunks
from pipeline.job import ingest, make_spec, run_job, run_jobs
from pipeline.media.sample import make_sample
from pipeline.search import open_index
from pipeline.spec import pack_key, work_prefix
from pipeline.storage import LocalStorage

RESULTS = ("transcript.json", "transcript.srt", "transcript.vtt", "captions.json", "summary.json")


class CountingEngine(OmniEngine):
    """The tiny model, counting the rows each ``generate`` ran (by kind): what a new run generates again."""

    def __init__(self, settings) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings)
        self.rows: Counter[str] = Counter()

    def run_encoded(self, requests, encoded):  # type: ignore[no-untyped-def]
        results = super().run_encoded(requests, encoded)
        self.rows.update(request.kind for request in requests)
        return results


@pytest.fixture
def armed():
    yield failpoints.install
    failpoints.install("")


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    """20 s of video with a sentence every 5 s: two chunks of 10 s, speech in each."""
    return make_sample(tmp_path_factory.mktemp("partial-media") / "talk.mp4", 20.0, size="160x120")


@pytest.fixture(scope="module")
def engine(settings):
    return OmniEngine(settings)


def _json(storage, media_id, name):
    return json.loads((storage.root / "results" / media_id / name).read_text())


def _boundary(storage, media_id) -> float:
    """Where chunk 1 starts (at a silence near 10 s)."""
    return float(_json(storage, media_id, "captions.json")["chunks"][1]["start"])


def _run(talk, settings, storage, engine):
    (outcome,) = run_jobs([str(talk)], settings, storage, engine)
    return outcome


def test_a_batch_with_one_bad_row_is_run_again_in_halves_and_keeps_the_others(settings, armed):
    """The pipelined engine batches three rows; the one that raises fails alone, the others get the answers
    they get when nothing fails."""
    settings = settings.model_copy(update={"batch_size": 4})
    pipelined = PipelinedEngine(OmniEngine(settings), settings)
    try:

        def rows():
            requests = [
                prompts.chunk_summary_request(10.0 * i, 10.0 * i + 10, f"part {i}", "", "", 8) for i in range(3)
            ]
            for index, request in enumerate(requests):
                request.chunk = index
            return requests

        clean = pipelined.generate_each(rows())
        armed("infer.row=raise:chunk=1:kind=summary")
        outcomes = pipelined.generate_each(rows())
    finally:
        pipelined.close()
    assert isinstance(outcomes[1], failpoints.FailpointError)
    assert [o.text for o in (outcomes[0], outcomes[2])] == [c.text for c in (clean[0], clean[2])]


def test_a_failed_caption_leaves_a_gap_and_a_new_run_generates_only_it_and_what_reads_it(
    talk, whisper_settings, tmp_path, armed
):
    settings = whisper_settings
    storage = LocalStorage(tmp_path / "store")
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite", settings)
    armed("infer.row=raise:chunk=1:kind=caption")
    (outcome,) = run_jobs([str(talk)], settings, storage, CountingEngine(settings), index)
    assert outcome.status == "partial" and outcome.failed_rows == 2, outcome.error
    manifest = outcome.manifest
    assert manifest["status"] == "partial" and manifest["rows"] == {"total": 7, "failed": 2}  # 2 x 3 + the file's
    assert [(r["kind"], r["chunk"]) for r in manifest["failed_rows"]] == [("caption", 1), ("summary", 1)]
    assert manifest["failed_rows"][0]["start"] == manifest["failed_rows"][1]["start"] > 0
    assert "FailpointError" in manifest["failed_rows"][0]["reason"] and "caption" in manifest["error"]
    assert manifest["failed_rows"][1]["reason"] == "not written: this chunk's caption failed"
    captions = _json(storage, outcome.media_id, "captions.json")["chunks"]
    assert captions[0]["visual"] and (captions[1]["visual"], captions[1]["audio"]) == ("", "")
    summary = _json(storage, outcome.media_id, "summary.json")
    assert summary["summary"] and summary["chunks"][0]["summary"] and not summary["chunks"][1]["summary"]
    assert manifest["summary_chunks_missing"] == [1]
    transcript = _json(storage, outcome.media_id, "transcript.json")  # Whisper's rows did not fail
    assert {s["start"] >= _boundary(storage, outcome.media_id) for s in transcript["segments"]} == {True, False}
    page = (storage.root / "results" / outcome.media_id / "index.html").read_text()
    assert 'id="partial"' in page and '<p class="gap"><span class="label">No caption</span>' in page
    assert f"omniq retry {manifest['job_id']}" in page
    word = max(transcript["segments"][0]["text"].split(), key=len).strip(".,!?")
    assert index.search(word, kind="transcript"), "a partial job's good rows are indexed"
    assert (storage.root / work_prefix(manifest["job_id"]) / "plan.json").exists()  # kept for the retry

    armed("")
    counting = CountingEngine(settings)
    (again,) = run_jobs([str(talk)], settings, storage, counting, index)
    assert again.status == "done" and again.failed_rows == 0, again.error
    assert counting.rows == {prompts.CAPTION: 1, prompts.CHUNK_SUMMARY: 1, prompts.FILE_SUMMARY: 1}
    assert not (storage.root / work_prefix(manifest["job_id"])).exists()
    clean = LocalStorage(tmp_path / "clean")
    assert _run(talk, settings, clean, OmniEngine(settings)).status == "done"
    for name in RESULTS:  # the same results as a run where nothing failed
        assert (storage.root / "results" / again.media_id / name).read_bytes() == (
            clean.root / "results" / again.media_id / name
        ).read_bytes(), name


def test_qwen_transcript_rows_that_fail_leave_out_their_utterances_and_cues(talk, settings, engine, tmp_path, armed):
    storage = LocalStorage(tmp_path / "store")
    armed("infer.row=raise:chunk=0:kind=transcript")
    outcome = run_job(str(talk), settings, storage, engine)
    assert outcome.status == "partial", outcome.error
    failed = outcome.manifest["failed_rows"]
    transcripts = [r for r in failed if r["kind"] == "transcript"]
    boundary = _boundary(storage, outcome.media_id)
    assert transcripts and all(r["chunk"] == 0 and r["end"] <= boundary for r in transcripts)
    assert [(r["kind"], r["chunk"]) for r in failed if r["kind"] != "transcript"] == [("summary", 0)]
    segments = _json(storage, outcome.media_id, "transcript.json")["segments"]
    assert segments and all(s["start"] >= boundary for s in segments)  # chunk 1's utterances stand
    cues = list(srt.parse((storage.root / "results" / outcome.media_id / "transcript.srt").read_text()))
    assert cues and all(c.start.total_seconds() >= boundary for c in cues)  # no cue where the speech was not written
    page = (storage.root / "results" / outcome.media_id / "index.html").read_text()
    assert page.count('<li class="gap"') == len(transcripts) and "Not transcribed: FailpointError" in page


def test_a_chunk_whisper_cannot_transcribe_fails_alone(talk, whisper_settings, engine, tmp_path, armed):
    storage = LocalStorage(tmp_path / "store")
    armed("infer.row=raise:chunk=1:kind=transcript")
    outcome = run_job(str(talk), whisper_settings, storage, engine)
    assert outcome.status == "partial", outcome.error
    assert [(r["kind"], r["chunk"]) for r in outcome.manifest["failed_rows"]] == [("transcript", 1), ("summary", 1)]
    segments = _json(storage, outcome.media_id, "transcript.json")["segments"]
    boundary = _boundary(storage, outcome.media_id)
    assert segments and all(s["end"] <= boundary and s["words"] for s in segments)  # chunk 0: Whisper's words


def test_with_partial_results_off_a_failed_row_fails_the_job(talk, settings, engine, tmp_path, armed):
    storage = LocalStorage(tmp_path / "store")
    armed("infer.row=raise:chunk=1:kind=caption")
    outcome = run_job(str(talk), settings.model_copy(update={"partial": False}), storage, engine)
    assert outcome.status == "failed"
    assert "the caption row of chunk 1 failed" in outcome.error and "OMNIQ_PARTIAL is off" in outcome.error


def test_a_job_whose_every_row_failed_is_failed(talk, settings, engine, tmp_path, armed):
    storage = LocalStorage(tmp_path / "store")
    armed("infer.row=raise")
    outcome = run_job(str(talk), settings, storage, engine)
    assert outcome.status == "failed" and outcome.error.startswith("every row failed; first: FailpointError")
    assert outcome.manifest["status"] == "failed"


def test_a_chunk_that_cannot_be_decoded_fails_its_rows_and_the_others_stand(talk, settings, engine, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    spec = make_spec(str(talk), settings)
    plan = ingest(spec, settings, storage)
    storage.put_bytes(pack_key(spec.job_id, 1), b"not a pack", "application/octet-stream")
    results = infer_chunks(plan, [0, 1], engine, storage, settings)
    assert results[0].errors == [] and results[0].summary
    assert {e["kind"] for e in results[1].errors} == {"transcript", "caption", "summary"}
    assert all(e["reason"].startswith("its media cannot be decoded") for e in results[1].errors)


def test_run_exits_5_for_a_partial_file_and_its_json_counts_the_failed_rows(talk, tiny_cache_dir, tmp_path):
    command = [sys.executable, "-m", "workers.cli", "run", str(talk), "--out", str(tmp_path / "out"), "--json"]
    command += ["--model", "tiny", "--chunk-seconds", "10"]
    env = {
        "OMNIQ_CACHE_DIR": str(tiny_cache_dir),
        "OMNIQ_CAPTION_MAX_NEW_TOKENS": "8",
        "OMNIQ_SUMMARY_MAX_NEW_TOKENS": "8",
        "OMNIQ_FAILPOINTS": "infer.row=raise:chunk=0:kind=summary",
        "PATH": "/usr/bin:/bin",
    }
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 5, completed.stderr
    (outcome,) = json.loads(completed.stdout)
    assert outcome["status"] == "partial" and outcome["failed_rows"] == 1
    assert "the summary of chunk 0" in outcome["error"]
