"""In-process end-to-end: real ffmpeg, real transformers path on the tiny model, local storage."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import srt
import webvtt

from pipeline.engines.omni import OmniEngine
from pipeline.job import RESULT_FILES, make_spec, run_job
from pipeline.media.sample import make_sample, spoken_track
from pipeline.storage import LocalStorage


@pytest.fixture(scope="module")
def engine(settings):
    return OmniEngine(settings)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    directory = tmp_path_factory.mktemp("job-media")
    return {
        "av": make_sample(directory / "talk.mp4", 23.0),
        "video": make_sample(directory / "silent.mp4", 12.0, audio=False),
        "audio": make_sample(directory / "podcast.mp3", 14.0, video=False),
        "dir": directory,
    }


def assert_subtitle_rules(cues) -> None:
    """Cues as an SRT parser reads them: at most 2 lines of 42 characters, 5/6 s .. 7 s, 2 frames apart."""
    for cue in cues:
        lines = cue.content.split("\n")
        assert 1 <= len(lines) <= 2 and all(0 < len(line) <= 42 for line in lines), cue
        seconds = (cue.end - cue.start).total_seconds()
        assert 5 / 6 - 1e-3 <= seconds <= 7.0, cue
    for before, after in zip(cues, cues[1:]):
        assert (after.start - before.end).total_seconds() >= 0.08 - 1e-6, (before, after)


def _read(storage, media_id, name):
    return (storage.root / "results" / media_id / name).read_text()


def test_video_with_audio_produces_every_output(media, settings, engine, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    outcome = run_job(str(media["av"]), settings, storage, engine)
    assert outcome.status == "done", outcome.error
    results = storage.root / "results" / outcome.media_id
    assert sorted(p.name for p in results.iterdir() if p.is_file()) == sorted(RESULT_FILES)
    assert len(list((results / "thumbnails").glob("*.jpg"))) == 3  # one per chunk, shown by index.html
    page = (results / "index.html").read_text()
    assert page.count('class="segment') >= 1 and "http://" not in page and "https://" not in page
    manifest = json.loads(_read(storage, outcome.media_id, "manifest.json"))
    assert manifest["status"] == "done"
    assert manifest["source"] == media["av"].resolve().as_uri()
    assert manifest["duration_s"] == pytest.approx(23.0, abs=0.1)
    assert manifest["random_weights"] is True and "random" in manifest["notice"]
    assert manifest["model"] == "tiny" and manifest["prompt_version"]
    assert manifest["settings"]["chunk_seconds"] == 10.0 and manifest["settings"]["fps"] == 1.0
    assert set(manifest["timings"]) >= {"ingest_s", "ffmpeg_s", "infer_s", "summarize_s", "finalize_s", "total_s"}
    assert manifest["error"] is None

    captions = json.loads(_read(storage, outcome.media_id, "captions.json"))["chunks"]
    assert len(captions) == manifest["chunks"] == 3
    # boundaries moved from 10 s and 20 s into the generated silences (4-5 s of every 5 s period)
    cuts = [c["end"] for c in captions[:-1]]
    assert all(c % 5.0 > 4.0 for c in cuts), cuts
    assert captions[0]["start"] == 0.0 and captions[-1]["end"] == pytest.approx(23.0, abs=0.1)
    assert all(c["visual"] for c in captions)

    transcript = json.loads(_read(storage, outcome.media_id, "transcript.json"))
    segments = transcript["segments"]
    # one segment per spoken sentence (one every 5 s), timed by the speech itself, not by the chunks
    spoken = spoken_track(23.0).spans
    assert segments and len(segments) <= len(spoken)  # (a random model may write nothing for one)
    for segment in segments:
        near = [s for s in spoken if abs(segment["start"] - s[0]) <= 0.15 and abs(segment["end"] - s[1]) <= 0.15]
        assert near and set(segment) >= {"start", "end", "text"}, (segment, spoken)
    assert transcript["language"] == manifest["language"]  # detected (the tiny model's answer is noise)
    parsed = list(srt.parse(_read(storage, outcome.media_id, "transcript.srt")))
    vtt = webvtt.read(str(results / "transcript.vtt"))
    assert len(vtt.captions) == len(parsed) == manifest["cues"] >= len(segments)
    assert_subtitle_rules(parsed)
    # every character of the transcript is in the cues, in order (a random "word" longer than a line is cut)
    assert "".join(p.content for p in parsed).replace("\n", "").replace(" ", "") == "".join(
        s["text"] for s in segments
    ).replace(" ", "")

    summary = json.loads(_read(storage, outcome.media_id, "summary.json"))
    assert isinstance(summary["summary"], str)
    assert [c["index"] for c in summary["chunks"]] == [0, 1, 2]
    # the tiny model's text says so in every JSON document, and in the WebVTT file as a NOTE players hide
    for document in (transcript, summary, json.loads(_read(storage, outcome.media_id, "captions.json"))):
        assert document["notice"] == manifest["notice"]
    assert (results / "transcript.vtt").read_text().startswith("WEBVTT\n\nNOTE Written by the tiny random-weight")
    assert not (storage.root / "work" / manifest["job_id"]).exists(), "work data is removed after finalize"


def test_video_only_and_audio_only(media, settings, engine, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    video = run_job(str(media["video"]), settings, storage, engine)
    audio = run_job(str(media["audio"]), settings, storage, engine)
    assert video.status == audio.status == "done"
    assert json.loads(_read(storage, video.media_id, "transcript.json"))["segments"] == []
    video_captions = json.loads(_read(storage, video.media_id, "captions.json"))["chunks"]
    assert all(c["visual"] and c["audio"] == "" for c in video_captions)
    audio_captions = json.loads(_read(storage, audio.media_id, "captions.json"))["chunks"]
    assert all(c["visual"] == "" for c in audio_captions)
    assert json.loads(_read(storage, audio.media_id, "transcript.json"))["segments"]


def test_sound_that_is_not_speech_is_not_transcribed_but_still_captioned(settings, engine, tmp_path):
    tones = make_sample(tmp_path / "tones.mp4", 12.0, sound="tone")
    silent = make_sample(tmp_path / "quiet.mp4", 6.0, sound="tone", period=100.0, gap=100.0)  # a silent track
    storage = LocalStorage(tmp_path / "store")
    for path in (tones, silent):
        outcome = run_job(str(path), settings, storage, engine)
        assert outcome.status == "done", outcome.error
        transcript = json.loads(_read(storage, outcome.media_id, "transcript.json"))
        assert {k: v for k, v in transcript.items() if k != "notice"} == {
            "language": None,
            "transcriber": "omni",
            "times": "utterances",
            "segments": [],
        }
        assert _read(storage, outcome.media_id, "transcript.srt") == ""
        captions = json.loads(_read(storage, outcome.media_id, "captions.json"))["chunks"]
        assert captions and all(c["visual"] for c in captions)  # captioned from frames and sound


def test_rerun_is_idempotent(media, settings, engine, tmp_path):
    storage = LocalStorage(tmp_path / "store")
    first = run_job(str(media["audio"]), settings, storage, engine)
    before = {n: _read(storage, first.media_id, n) for n in RESULT_FILES if n not in ("manifest.json", "index.html")}
    skipped = run_job(str(media["audio"]), settings, storage, engine)  # done with these settings: not again
    assert (skipped.status, skipped.result_uri, skipped.media_id) == ("skipped", first.result_uri, first.media_id)
    second = run_job(str(media["audio"]), settings, storage, engine, force=True)
    assert second.media_id == first.media_id and second.status == "done"
    after = {n: _read(storage, second.media_id, n) for n in RESULT_FILES if n not in ("manifest.json", "index.html")}
    assert before == after  # greedy decoding on the same input: same text (the page and manifest carry times)


def test_ids_are_deterministic_and_config_sensitive(media, settings):
    first = make_spec(str(media["av"]), settings)
    again = make_spec(f"file://{media['av'].resolve()}", settings)
    other = make_spec(str(media["av"]), settings.model_copy(update={"fps": 2.0}))
    assert first.job_id == again.job_id and first.media_id == again.media_id
    assert other.media_id == first.media_id and other.job_id != first.job_id


def test_corrupt_file_fails_with_reason_and_others_still_run(media, settings, engine, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 500)
    storage = LocalStorage(tmp_path / "store")
    bad = run_job(str(corrupt), settings, storage, engine)
    assert bad.status == "failed" and "corrupt.mp4" in bad.error
    manifest = json.loads(_read(storage, bad.media_id, "manifest.json"))
    assert manifest["status"] == "failed" and "corrupt.mp4" in manifest["error"]
    missing = run_job(str(tmp_path / "nope.mp4"), settings, storage, engine)
    assert missing.status == "failed" and "nope.mp4" in missing.error


def test_cli_run_json_exit_codes(media, tiny_cache_dir, tmp_path):
    corrupt = tmp_path / "bad.mkv"
    corrupt.write_bytes(b"not media")
    command = [
        sys.executable,
        "-m",
        "workers.cli",
        "run",
        str(media["audio"]),
        str(corrupt),
        "--out",
        str(tmp_path / "out"),
        "--model",
        "tiny",
        "--chunk-seconds",
        "10",
        "--json",
    ]
    env = {
        "OMNIQ_CACHE_DIR": str(tiny_cache_dir),
        "OMNIQ_TRANSCRIPT_MAX_NEW_TOKENS": "8",
        "OMNIQ_CAPTION_MAX_NEW_TOKENS": "8",
        "OMNIQ_SUMMARY_MAX_NEW_TOKENS": "8",
        "PATH": "/usr/bin:/bin",
    }
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 1, completed.stderr
    outcomes = json.loads(completed.stdout)
    assert [o["status"] for o in outcomes] == ["done", "failed"]
    assert all(set(o) == {"source", "media_id", "status", "result_uri", "error", "failed_rows"} for o in outcomes)
    assert "bad.mkv" in outcomes[1]["error"]
    failed_manifest = tmp_path / "out" / "results" / outcomes[1]["media_id"] / "manifest.json"
    assert outcomes[1]["result_uri"] == failed_manifest.parent.as_uri()  # a failed file has results too
    assert json.loads(failed_manifest.read_text())["timings"]["total_s"] >= 0
    assert "random" in completed.stderr  # the console says the tiny model's text is random
    # the finished file went into the search index beside the results
    transcript = json.loads((tmp_path / "out" / "results" / outcomes[0]["media_id"] / "transcript.json").read_text())
    word = max(re.findall(r"[^\W_]+", transcript["segments"][0]["text"]), key=len)
    search = subprocess.run(
        [sys.executable, "-m", "workers.cli", "search", word, "--json"],
        capture_output=True,
        text=True,
        env={**env, "OMNIQ_STORAGE_URL": str(tmp_path / "out")},
        timeout=120,
    )
    assert (tmp_path / "out" / "index.sqlite").is_file()
    assert outcomes[0]["media_id"] in {hit["media_id"] for hit in json.loads(search.stdout)}, search.stderr
    completed = subprocess.run(
        command[:-3] + ["--chunk-seconds", "10"], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 1 and completed.stdout.startswith("skipped")  # done already, the bad one again
    # a directory, as enqueue takes it: its media (a link to the done file: the same media) and a note it ignores
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "talk.mp3").symlink_to(media["audio"].resolve())
    (folder / "notes.txt").write_text("not media")
    again = subprocess.run(
        [*command[:4], str(folder), *command[6:-1], "-v"], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"skipped {media['audio'].resolve()}: already done")
    assert "ignored 1 non-media file" in again.stderr and f"ignored: {folder / 'notes.txt'}" in again.stderr


def test_many_files_share_batches_and_the_next_ingest_overlaps_inference(settings, tmp_path, monkeypatch):
    import threading
    import time

    from pipeline import job

    clips = [make_sample(tmp_path / f"clip{i}.mp4", 4.0 + 0.2 * i, size="160x120") for i in range(6)]
    clips.insert(3, tmp_path / "missing.mp4")  # a bad file among them: reported in its place, the rest go on
    spans: dict[str, list[tuple[str, float, float]]] = {"ingest": [], "infer": []}
    lock = threading.Lock()

    def recorded(name, function):
        def wrapper(job_plan_or_spec, *args, **kwargs):
            started = time.monotonic()
            try:
                return function(job_plan_or_spec, *args, **kwargs)
            finally:
                with lock:
                    spans[name].append(
                        (getattr(job_plan_or_spec, "spec", job_plan_or_spec).job_id, started, time.monotonic())
                    )

        return wrapper

    monkeypatch.setattr(job, "ingest", recorded("ingest", job.ingest))
    monkeypatch.setattr(job, "infer_file", recorded("infer", job.infer_file))
    engine = OmniEngine(settings)
    sizes: list[int] = []
    engine.batch_observers.append(lambda rows, tokens, seconds: sizes.append(rows))
    storage = LocalStorage(tmp_path / "store")
    outcomes = list(
        # the language is given: its detection (one more round trip per file, tested elsewhere) would make the
        # batches depend on when each file's answer comes back
        job.run_jobs(
            [str(c) for c in clips], settings.model_copy(update={"batch_size": 4, "language": "en"}), storage, engine
        )
    )
    assert [o.status for o in outcomes] == ["done"] * 3 + ["failed"] + ["done"] * 3
    assert [o.source for o in outcomes][:3] == [c.resolve().as_uri() for c in clips[:3]]
    assert "missing.mp4" in outcomes[3].error
    # rows of different files share generate calls: 6 files x (transcript, caption, summary), each clip speaking
    # one sentence from its start. A batch holds one kind of row and a file has one row of each kind, so a batch
    # of 2 or more holds rows of as many files. (Files arrive one ingest at a time: 10-11 calls with at most 2-4
    # rows over 12 runs when speech detection was slow; 15 calls of at most 2 rows in every run since it is 6x
    # faster and the tiny model's rows rarely wait for a later file's.)
    assert sum(sizes) == 18 and max(sizes) >= 2 and len(sizes) <= 16, str(sizes)
    # one ingest at a time, and ingests ran while other files were being inferred
    ingests = sorted(spans["ingest"], key=lambda s: s[1])
    assert all(a[2] <= b[1] + 1e-3 for a, b in zip(ingests, ingests[1:])), "ingests overlapped each other"
    inferring = [(start, end) for _, start, end in spans["infer"]]
    assert any(any(s < i_start < e for s, e in inferring) for _, i_start, _ in ingests), (ingests, inferring)
