"""Whisper writes the transcript (``OMNIQ_TRANSCRIBER=whisper``): real words on real synthesised speech, word
times against espeak-ng's own word events, and the bad inputs a user can give."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from pipeline import evaluation
from pipeline.config import Settings
from pipeline.engines import whisper
from pipeline.engines.omni import OmniEngine
from pipeline.errors import ConfigError
from pipeline.job import run_job
from pipeline.media.sample import make_sample
from pipeline.media.voice import speech_track
from pipeline.results.cues import GAP_SECONDS, LINGER_SECONDS, build_cues
from pipeline.storage import LocalStorage

TEXTS = [
    "The harbour crossing is shut for repairs until next week.",
    "Buses will run every ten minutes from the station.",
    "Residents near the river should expect some noise at night.",
    "The council meets again on the fourteenth of March.",
]
STARTS = [1.0, 8.0, 15.0, 22.0]


@pytest.fixture(scope="module")
def track():
    return speech_track(TEXTS, STARTS, 28.0)


@pytest.fixture(scope="module")
def asr():
    return whisper.transcriber(whisper.BUNDLED)


def _utterances(track):
    return [(round(a - 0.05, 3), round(b + 0.05, 3)) for a, b in track.spans]


def test_the_bundled_model_writes_what_was_said_with_word_times(asr, track):
    audio = track.samples.astype(np.float32) / 32768
    heard = asr.transcribe(audio, 0.0, _utterances(track), None)
    assert len(heard) == len(TEXTS)
    wer = evaluation.word_error_rate(" ".join(TEXTS), " ".join(h.text for h in heard))
    assert wer <= 0.3, [h.text for h in heard]  # measured 0.10-0.17 on these sentences; random text is ~1.0
    onsets = []
    for item, truth in zip(heard, track.words, strict=True):
        assert item.words, item
        starts = [w.start for w in item.words]
        assert starts == sorted(starts)
        assert all(item.start <= w.start <= w.end <= item.end for w in item.words)
        assert all(a.end <= b.start for a, b in zip(item.words, item.words[1:], strict=False))
        assert all(0.0 <= w.probability <= 1.0 for w in item.words)
        onsets += evaluation.onset_errors(truth, [(w.text, w.start) for w in item.words])
    assert len(onsets) >= 0.6 * sum(len(t) for t in track.words)
    assert statistics.median(onsets) <= 0.2  # measured 0.08-0.09 s
    assert np.percentile(onsets, 95) <= 0.5  # measured 0.18-0.24 s


def test_the_same_audio_gives_the_same_words(asr, track):
    audio = track.samples.astype(np.float32) / 32768
    utterances = _utterances(track)[:2]
    first = asr.transcribe(audio, 0.0, utterances, "en")
    assert asr.transcribe(audio, 0.0, utterances, "en") == first  # temperature 0: no sampled fallbacks


def test_audio_that_holds_no_speech_gets_no_words(asr, track):
    noise = np.random.default_rng(1).normal(0, 0.01, 16000 * 6).astype(np.float32)
    assert asr.transcribe(noise, 0.0, [], None) == []
    # an utterance of silence: nothing to hear, nothing written
    (item,) = asr.transcribe(np.zeros(16000 * 6, dtype=np.float32), 0.0, [(2.0, 3.0)], None)
    assert item.words == [] or all(2.0 <= w.start <= w.end <= 3.0 for w in item.words)


def test_text_someone_else_wrote_is_aligned_to_the_speech(asr, track):
    # how an omni transcript gets word times: Qwen3-Omni's text, aligned by Whisper (here the true text)
    audio = track.samples.astype(np.float32) / 32768
    segments = [(a, b, text) for (a, b), text in zip(_utterances(track), TEXTS, strict=True)]
    aligned = asr.align(audio, 0.0, segments, "en")
    onsets = []
    for (start, end, text), words, truth in zip(segments, aligned, track.words, strict=True):
        assert " ".join(w.text for w in words) == text  # every word of the text, as written
        assert all(start <= w.start <= w.end <= end for w in words)
        assert all(a.end <= b.start for a, b in zip(words, words[1:], strict=False))
        onsets += evaluation.onset_errors(truth, [(w.text, w.start) for w in words])
    assert len(onsets) >= 0.9 * sum(len(t) for t in track.words)
    assert statistics.median(onsets) <= 0.2 and np.percentile(onsets, 95) <= 0.5  # measured 0.09 / 0.17 s
    assert asr.align(audio, 0.0, [(1.0, 2.0, "")], "en") == [[]]


def test_an_omni_transcript_gets_word_times_where_the_aligner_knows_its_language(settings, tmp_path):
    track = speech_track(TEXTS[:2], [0.5, 6.0], 11.0)
    path = make_sample(tmp_path / "talk.mp4", 11.0, track=track, size="160x120")
    storage = LocalStorage(tmp_path / "store")
    english = settings.model_copy(update={"language": "en"})
    for config, times in ((english, "words"), (english.model_copy(update={"align_words": False}), "utterances")):
        outcome = run_job(str(path), config, storage, OmniEngine(config))
        assert outcome.status == "done", outcome.error
        result = tmp_path / "store" / "results" / outcome.media_id
        transcript = json.loads((result / "transcript.json").read_text())
        manifest = json.loads((result / "manifest.json").read_text())
        assert transcript["transcriber"] == "omni" and transcript["times"] == manifest["times"] == times
        if times == "words":  # the random model's text, each word timed inside its segment
            assert manifest["word_times"] == "aligned by whisper tiny.en" and manifest["timings"]["asr_s"] > 0
            for segment in transcript["segments"]:
                assert all(segment["start"] <= w["start"] <= w["end"] <= segment["end"] for w in segment["words"])
        else:
            assert manifest["word_times"].startswith("none: utterance times only (OMNIQ_ALIGN_WORDS is off")
    german = settings.model_copy(update={"language": "de"})  # tiny.en cannot align German: it says so
    outcome = run_job(str(path), german, storage, OmniEngine(german))
    manifest = json.loads((tmp_path / "store" / "results" / outcome.media_id / "manifest.json").read_text())
    assert manifest["times"] == "utterances" and "cannot align de" in manifest["word_times"]


def test_words_go_to_the_utterance_they_were_said_in():
    w = whisper.TimedWord
    words = [
        w(" The", 0.7, 1.3, 0.9),  # starts before its utterance: kept inside it
        w(" week.", 2.6, 4.9, 0.8),  # stretched over the silence after: still the first utterance's
        w(" Buses", 6.1, 6.4, 0.9),
        w(" run", 6.4, 6.5, 0.9),
        w(" Thank", 7.1, 7.3, 0.4),  # after the speech, over silence: Whisper's hallucination, dropped
        w(" you", 9.5, 9.8, 0.2),
    ]
    first, second = whisper.assign_words(words, [(1.0, 3.0), (6.0, 7.0)])
    assert first.text == "The week." and [x.text for x in first.words] == ["The", "week."]
    assert (first.words[0].start, first.words[1].end) == (1.0, 3.0)
    assert second.text == "Buses run" and [(x.start, x.end) for x in second.words] == [(6.1, 6.4), (6.4, 6.5)]


def test_cues_start_at_their_first_word_and_end_by_the_linger_rule(asr, track, tmp_path):
    audio = track.samples.astype(np.float32) / 32768
    from pipeline.results.assemble import ChunkResult, transcript_segments

    heard = asr.transcribe(audio, 0.0, _utterances(track), None)
    result = ChunkResult(0, 0.0, 28.0)
    result.segments = [
        {"start": h.start, "end": h.end, "text": h.text, "words": [x.to_dict() for x in h.words]} for h in heard
    ]
    segments = transcript_segments([result])
    cues = build_cues(segments)
    for segment in segments:
        mine = [c for c in cues if segment.start - 1 <= c.start < segment.end]
        assert mine[0].start == pytest.approx(segment.words[0].start, abs=0.001)
        assert mine[-1].end <= segment.words[-1].end + LINGER_SECONDS + 7.0
    assert all(a.end + GAP_SECONDS <= b.start + 1e-6 for a, b in zip(cues, cues[1:], strict=False))


def test_a_whisper_run_publishes_real_words_and_says_whose_text_is_random(whisper_settings, tmp_path):
    track = speech_track(TEXTS[:2], [0.5, 6.0], 11.0)
    path = make_sample(tmp_path / "talk.mp4", 11.0, track=track, size="160x120")
    storage = LocalStorage(tmp_path / "store")
    outcome = run_job(str(path), whisper_settings, storage, OmniEngine(whisper_settings))
    assert outcome.status == "done", outcome.error
    result = tmp_path / "store" / "results" / outcome.media_id
    transcript = json.loads((result / "transcript.json").read_text())
    assert "notice" not in transcript  # the transcript is Whisper's, not the random model's
    assert (transcript["transcriber"], transcript["times"], transcript["language"]) == ("whisper", "words", "en")
    said = " ".join(s["text"] for s in transcript["segments"])
    assert evaluation.word_error_rate(" ".join(TEXTS[:2]), said) <= 0.35, said
    for segment in transcript["segments"]:
        assert segment["words"] and all(
            segment["start"] <= w["start"] <= w["end"] <= segment["end"] for w in segment["words"]
        )
    manifest = json.loads((result / "manifest.json").read_text())
    assert manifest["transcriber"] == "whisper" and manifest["whisper_model"] == "tiny.en"
    assert manifest["times"] == "words" and manifest["language_by"] == "tiny.en (English only)"
    assert "captions and summaries" in manifest["notice"] and manifest["timings"]["asr_s"] > 0
    assert "notice" in json.loads((result / "captions.json").read_text())
    assert "NOTE" not in (result / "transcript.vtt").read_text()
    assert "harbo" in (result / "transcript.txt").read_text().lower()
    printed = subprocess.run(
        [sys.executable, "-m", "workers.cli", "transcript", str(path), "--out", str(tmp_path / "store"), "--lines", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    head, first, more = printed.stdout.splitlines()
    assert head.startswith("# ") and "written by Whisper, with word times" in head
    assert first.startswith("[00:00:00.") and "harbo" in first.lower() and more.startswith("# ... ")


def test_a_file_done_by_one_transcriber_is_not_skipped_for_the_other(settings, whisper_settings, tmp_path):
    path = make_sample(tmp_path / "quiet.mp4", 3.0, sound="tone", size="160x120")
    storage = LocalStorage(tmp_path / "store")
    engine = OmniEngine(settings)
    assert run_job(str(path), settings, storage, engine).status == "done"
    assert run_job(str(path), settings, storage, engine).status == "skipped"
    again = run_job(str(path), whisper_settings, storage, engine)
    assert again.status == "done"
    assert settings.config_hash() != whisper_settings.config_hash()
    tones = json.loads((tmp_path / "store" / "results" / again.media_id / "transcript.json").read_text())
    assert tones["segments"] == [] and tones["transcriber"] == "whisper"  # no speech: no words


def test_auto_is_whisper_for_the_tiny_model_and_omni_for_a_real_one():
    assert Settings(model="tiny").transcriber_name == "whisper"
    assert Settings(model="Qwen/Qwen3-Omni-30B-A3B-Instruct").transcriber_name == "omni"
    assert Settings(model="tiny", transcriber="omni").transcriber_name == "omni"
    assert Settings(model="tiny").effective_config()["transcriber"] == "whisper"
    assert Settings(model="tiny", transcriber="whisper").config_hash() == Settings(model="tiny").config_hash()
    with pytest.raises(ValueError, match="transcriber 'nemo'"):
        Settings(transcriber="nemo")


def test_whisper_models_are_found_or_refused_with_a_reason(tmp_path):
    assert (whisper.model_location("tiny.en") + "/model.bin").endswith("model.bin")
    assert whisper.model_location("large-v3") == "large-v3"  # downloaded by faster-whisper, for users online
    with pytest.raises(ConfigError, match="no such folder"):
        whisper.model_location(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a CTranslate2 Whisper model"):
        whisper.model_location(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not a Whisper model name"):
        whisper.model_location("whisper-giant")
    with pytest.raises(ConfigError, match="English only"):
        whisper.check_language("tiny.en", "de")
    whisper.check_language("large-v3", "de")
    assert whisper.english_only(whisper.model_location("tiny.en"))  # a folder: told by its vocabulary


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--whisper-model", "/nonexistent/whisper"], "--whisper-model /nonexistent/whisper: no such folder"),
        (["--language", "de"], "--whisper-model tiny.en transcribes English only, but --language is 'de'"),
    ],
)
def test_the_command_refuses_a_bad_whisper_setting_before_any_job(arguments, message, tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"not even read")
    command = [sys.executable, "-m", "workers.cli", "run", str(path), "--model", "tiny", "--out", str(tmp_path / "o")]
    done = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"omniq: {message}" or done.stderr.strip().startswith(f"omniq: {message}")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # no job started


def test_a_worker_runs_only_the_whisper_model_it_was_started_with():
    from pipeline.sources import SourceRef, job_id_for
    from pipeline.spec import JobSpec, settings_for

    job = Settings(model="tiny", whisper_model="large-v3")
    ref = SourceRef("file:///m/a.mp4", "f1", 1)
    spec = JobSpec(
        job_id_for(ref.media_id, job.config_hash()), ref.media_id, ref.uri, ref.uri, "f1", job.effective_config()
    )
    with pytest.raises(ConfigError, match="OMNIQ_WHISPER_MODEL=large-v3"):
        settings_for(spec, Settings(model="tiny"), runs_model=True)
    assert settings_for(spec, Settings(model="tiny")).whisper_model == "large-v3"  # a media worker loads none


@pytest.mark.gpu
def test_the_bundled_model_on_cuda_writes_the_same_words_in_float16(asr, track):
    """What a GPU worker runs (``device_and_compute``: cuda + float16; CTranslate2 needs CUDA 12 cuBLAS and
    cuDNN 9): the words are as good as on the CPU and their times agree with the CPU's within 0.1 s."""
    gpu = whisper.WhisperTranscriber(whisper.BUNDLED, device="auto")
    assert (gpu.device, gpu.compute_type) == ("cuda", "float16")
    audio = track.samples.astype(np.float32) / 32768
    heard = gpu.transcribe(audio, 0.0, _utterances(track), None)
    assert evaluation.word_error_rate(" ".join(TEXTS), " ".join(h.text for h in heard)) <= 0.3
    on_cpu = asr.transcribe(audio, 0.0, _utterances(track), None)
    for item, reference in zip(heard, on_cpu, strict=True):
        if [w.text for w in item.words] == [w.text for w in reference.words]:
            assert all(abs(a.start - b.start) <= 0.1 for a, b in zip(item.words, reference.words, strict=True))
    aligned = gpu.align(audio, 0.0, [(a, b, t) for (a, b), t in zip(_utterances(track), TEXTS, strict=True)], "en")
    assert all(words for words in aligned)
