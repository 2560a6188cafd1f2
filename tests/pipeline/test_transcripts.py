"""Transcripts from real (synthesised) speech: segments timed by the speech, subtitle cues within the rules, and
the file's language detected once and used in the prompts."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import srt

from pipeline import prompts
from pipeline.config import Settings
from pipeline.engines.base import GenerationRequest, GenerationResult
from pipeline.engines.omni import OmniEngine
from pipeline.job import run_job
from pipeline.media.sample import make_sample
from pipeline.media.voice import speech_track
from pipeline.storage import LocalStorage
from tests.pipeline.test_job import assert_subtitle_rules

TEXTS = (
    "Good morning, and welcome to the quarterly review.",
    "Sales grew in every region.",
    "The new factory opens in March.",
    "Any questions?",
    "Then let us begin with the numbers from the north, which were the best we have ever had.",
)
STARTS = (0.8, 4.6, 7.1, 12.0, 13.5)  # pauses of about 0.6 s .. 3 s between the sentences


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    track = speech_track(TEXTS, STARTS, 22.0)
    path = make_sample(tmp_path_factory.mktemp("talk") / "talk.mp4", 22.0, track=track, size="160x120")
    return path, track


class Recording:
    """Wraps an engine: records every request it gets, and may answer some kinds from a script."""

    def __init__(self, engine, answers: dict[str, str] | None = None) -> None:
        self.engine, self.answers, self.requests = engine, answers or {}, []
        self.model_id, self.random_weights = engine.model_id, engine.random_weights

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.requests += requests
        scripted = [r for r in requests if r.kind in self.answers]
        real = iter(
            self.engine.generate([r for r in requests if r.kind not in self.answers])
            if len(scripted) < len(requests)
            else []
        )
        return [GenerationResult(self.answers[r.kind]) if r.kind in self.answers else next(real) for r in requests]

    def of(self, kind: str) -> list[GenerationRequest]:
        return [r for r in self.requests if r.kind == kind]


def on_speech(segment: dict, spans: list[tuple[float, float]], within: float = 0.15) -> bool:
    """Whether a segment's edges are within ``within`` seconds of one known sentence's speech edges."""
    return any(abs(segment["start"] - a) <= within and abs(segment["end"] - b) <= within for a, b in spans)


def _instruction(request: GenerationRequest) -> str:
    return next(item["text"] for item in request.messages[0]["content"] if item["type"] == "text")


def test_segments_follow_the_speech_and_cues_follow_the_rules(talk, settings, tmp_path):
    path, track = talk
    settings = settings.model_copy(update={"transcript_max_new_tokens": 256})  # the default ceiling
    engine = Recording(OmniEngine(settings))
    storage = LocalStorage(tmp_path / "store")
    outcome = run_job(str(path), settings, storage, engine)
    assert outcome.status == "done", outcome.error
    results = storage.root / "results" / outcome.media_id
    transcript = json.loads((results / "transcript.json").read_text())
    segments = transcript["segments"]
    # one segment per utterance with text (a random model may write none for one): each on its sentence's speech
    assert segments and all(on_speech(segment, track.spans) for segment in segments), (segments, track.spans)
    # one transcript row per utterance, with max_new_tokens that follows its length
    rows = engine.of(prompts.TRANSCRIPT)
    assert len(rows) == len(track.spans)
    for row, (start, end) in zip(rows, track.spans, strict=True):
        seconds = len(row.audio) / 16000  # the utterance: the speech, as detected, padded by 50 ms
        assert seconds == pytest.approx(end - start, abs=0.3)
        assert row.max_new_tokens == prompts.transcript_tokens(seconds, settings.transcript_max_new_tokens)
    assert max(r.max_new_tokens for r in rows) < settings.transcript_max_new_tokens
    cues = list(srt.parse((results / "transcript.srt").read_text()))
    assert_subtitle_rules(cues)
    for cue in cues:  # no cue spans a pause of 2 s or more
        inside = [(a, b) for a, b in zip(track.spans, track.spans[1:], strict=False) if b[0] - a[1] >= 2.0]
        assert not any(cue.start < timedelta(seconds=a[1]) and timedelta(seconds=b[0]) < cue.end for a, b in inside)
    # the language was asked once, from the first speech, and is in the transcript and the manifest
    assert len(engine.of(prompts.LANGUAGE)) == 1
    assert len(engine.of(prompts.LANGUAGE)[0].audio) / 16000 <= 10.0 + 1e-6
    manifest = json.loads((results / "manifest.json").read_text())
    assert transcript["language"] == manifest["language"] and manifest["cues"] == len(cues)
    assert manifest["segments"] == len(segments) and manifest["speech_s"] > 5
    txt = (results / "transcript.txt").read_text().splitlines()
    assert len(txt) == len(cues) and txt[0].startswith("[00:00:00.")


def test_the_detected_language_is_read_from_the_answer_and_used_in_the_prompts(talk, settings, tmp_path):
    path, _ = talk
    engine = Recording(OmniEngine(settings), {prompts.LANGUAGE: "The language is German."})
    storage = LocalStorage(tmp_path / "store")
    outcome = run_job(str(path), settings, storage, engine)
    assert outcome.status == "done", outcome.error
    rows = engine.of(prompts.TRANSCRIPT)
    assert rows and all(_instruction(r) == "Transcribe the German audio into text." for r in rows)
    transcript = json.loads((storage.root / "results" / outcome.media_id / "transcript.json").read_text())
    assert transcript["language"] == "de" == outcome.manifest["language"]


def test_an_answer_that_names_no_language_leaves_it_unknown(talk, settings, tmp_path):
    path, _ = talk
    engine = Recording(OmniEngine(settings), {prompts.LANGUAGE: "I cannot tell."})
    outcome = run_job(str(path), settings, LocalStorage(tmp_path / "store"), engine)
    assert outcome.manifest["language"] is None
    assert all(_instruction(r) == "Transcribe the audio into text." for r in engine.of(prompts.TRANSCRIPT))


def test_a_configured_language_is_not_detected(talk, settings, tmp_path):
    path, _ = talk
    engine = Recording(OmniEngine(settings))
    outcome = run_job(str(path), settings.model_copy(update={"language": "fr"}), LocalStorage(tmp_path / "s"), engine)
    assert engine.of(prompts.LANGUAGE) == []
    assert all(_instruction(r) == "Transcribe the French audio into text." for r in engine.of(prompts.TRANSCRIPT))
    assert outcome.manifest["language"] == "fr"


@pytest.mark.parametrize(
    ("given", "code"), [("English", "en"), ("en", "en"), ("DE", "de"), ("pt-BR", "pt"), ("", None)]
)
def test_language_settings_take_codes_and_names(given, code):
    assert Settings(language=given).language == code


def test_an_unknown_language_is_refused_with_what_to_give():
    with pytest.raises(ValueError, match=r"'Klingon' is not one omniq knows: give an ISO 639-1 code"):
        Settings(language="Klingon")


def test_the_language_is_asked_of_speech_a_chunk_boundary_did_not_cut_to_a_sliver(settings, tmp_path):
    # the first sentence starts at the 5 s boundary: its utterance (padded 50 ms) begins in chunk 0 with a
    # sliver that cannot be heard; the question goes to its part in chunk 1
    track = speech_track([TEXTS[2]], [5.0], 9.0)
    path = make_sample(tmp_path / "cut.mp4", 9.0, track=track, size="160x120")
    engine = Recording(OmniEngine(settings), {prompts.LANGUAGE: "en"})
    cut = settings.model_copy(update={"chunk_seconds": 5.0, "silence_search_seconds": 0.0})
    outcome = run_job(str(path), cut, LocalStorage(tmp_path / "store"), engine)
    assert outcome.status == "done", outcome.error
    (asked,) = engine.of(prompts.LANGUAGE)
    assert len(asked.audio) / 16000 >= 0.2
    assert outcome.manifest["language"] == "en"
