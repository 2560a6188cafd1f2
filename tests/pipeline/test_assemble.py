from __future__ import annotations

import json

import srt
import webvtt

from pipeline.results.assemble import (
    ChunkResult,
    captions_doc,
    clean_text,
    summary_doc,
    to_srt,
    to_txt,
    to_vtt,
    transcript_doc,
    transcript_segments,
)
from pipeline.results.cues import Cue, build_cues


def _chunks():
    return [
        ChunkResult(
            0,
            0.0,
            29.75,
            transcript="hello there friend",
            segments=[
                {"start": 1.2, "end": 2.5, "text": "hello there\n\n"},
                {"start": 3.0, "end": 4.1, "text": " friend"},
            ],
            visual="a bar chart",
            audio="a tone",
        ),
        ChunkResult(1, 29.75, 60.0, transcript="", segments=[], visual="more bars", summary="quiet"),
        ChunkResult(
            2, 60.0, 75.5, segments=[{"start": 61.0, "end": 63.0, "text": "the end --> really"}], summary="ending"
        ),
    ]


def test_segments_are_the_utterances_with_text_in_time_order():
    segments = transcript_segments(_chunks())
    assert [(s.start, s.end) for s in segments] == [(1.2, 2.5), (3.0, 4.1), (61.0, 63.0)]
    assert segments[0].text == "hello there" and segments[1].text == "friend"
    assert "-->" not in segments[2].text


def test_a_result_written_before_speech_detection_gives_one_segment_per_chunk():
    old = ChunkResult.from_dict({"index": 0, "start": 0.0, "end": 30.0, "transcript": "all of it"})
    assert [(s.start, s.end, s.text) for s in transcript_segments([old])] == [(0.0, 30.0, "all of it")]


def test_srt_round_trips_through_a_parser():
    cues = build_cues(transcript_segments(_chunks()))
    parsed = list(srt.parse(to_srt(cues)))
    assert [p.content for p in parsed] == [c.text for c in cues]
    assert [p.start.total_seconds() for p in parsed] == [c.start for c in cues]
    assert [p.end.total_seconds() for p in parsed] == [c.end for c in cues]


def test_vtt_round_trips_through_a_parser(tmp_path):
    cues = build_cues(transcript_segments(_chunks()))
    path = tmp_path / "t.vtt"
    path.write_text(to_vtt(cues))
    captions = webvtt.read(str(path))
    assert [c.text for c in captions] == [c.text for c in cues]
    assert [c.start_in_seconds + c.start_time.milliseconds / 1000 for c in captions] == [c.start for c in cues]


def test_hour_long_times_format():
    cues = [Cue(3599.5, 3605.25, ("late", "night"))]
    assert "00:59:59,500 --> 01:00:05,250\nlate\nnight" in to_srt(cues)
    assert "00:59:59.500 --> 01:00:05.250\nlate\nnight" in to_vtt(cues)
    assert to_txt(cues) == "[00:59:59.500] late night\n"


def test_documents_follow_the_public_contract():
    chunks = _chunks()
    transcript = transcript_doc(transcript_segments(chunks), "English", "omni")
    assert set(transcript) == {"language", "transcriber", "times", "segments"}
    assert transcript["times"] == "utterances"  # Qwen3-Omni's segments carry no word times
    assert all(set(s) == {"start", "end", "text", "words"} and s["words"] == [] for s in transcript["segments"])
    assert all(isinstance(s["start"], float) for s in transcript["segments"])
    captions = captions_doc(chunks)
    assert [set(c) for c in captions["chunks"]] == [{"index", "start", "end", "visual", "audio"}] * 3
    summary = summary_doc("  whole  ", chunks)
    assert summary["summary"] == "whole"
    assert [c["summary"] for c in summary["chunks"]] == ["", "quiet", "ending"]
    json.dumps([transcript, captions, summary])


def test_clean_text_is_one_line():
    assert clean_text(" a\n\n b\t c --> d ") == "a b c -> d"
