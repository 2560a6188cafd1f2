from __future__ import annotations

import json

import srt
import webvtt

from pipeline.assemble import (
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


def _chunks():
    return [
        ChunkResult(0, 0.0, 29.75, transcript="hello there\n\nfriend", visual="a bar chart", audio="a tone"),
        ChunkResult(1, 29.75, 60.0, transcript="", visual="more bars", summary="quiet"),
        ChunkResult(2, 60.0, 75.5, transcript="the end --> really", summary="ending"),
    ]


def test_segments_skip_empty_and_keep_chunk_times():
    segments = transcript_segments(_chunks())
    assert [(s.start, s.end) for s in segments] == [(0.0, 29.75), (60.0, 75.5)]
    assert segments[0].text == "hello there friend"
    assert "-->" not in segments[1].text


def test_long_chunk_is_split_into_short_segments():
    chunk = ChunkResult(0, 0.0, 90.0, transcript=" ".join(f"w{i}" for i in range(30)))
    segments = transcript_segments([chunk], max_seconds=30.0)
    assert len(segments) == 3
    assert all(s.end - s.start <= 30.0 for s in segments)
    assert " ".join(s.text for s in segments).split() == chunk.transcript.split()
    assert segments[-1].end == 90.0


def test_srt_round_trips_through_a_parser():
    segments = transcript_segments(_chunks())
    parsed = list(srt.parse(to_srt(segments)))
    assert [p.content for p in parsed] == [s.text for s in segments]
    assert [p.start.total_seconds() for p in parsed] == [s.start for s in segments]
    assert [p.end.total_seconds() for p in parsed] == [s.end for s in segments]


def test_vtt_round_trips_through_a_parser(tmp_path):
    segments = transcript_segments(_chunks())
    path = tmp_path / "t.vtt"
    path.write_text(to_vtt(segments))
    captions = webvtt.read(str(path))
    assert [c.text for c in captions] == [s.text for s in segments]
    assert [c.start_in_seconds + c.start_time.milliseconds / 1000 for c in captions] == [s.start for s in segments]


def test_hour_long_times_format():
    segments = transcript_segments([ChunkResult(0, 3599.5, 3725.25, transcript="late")])
    assert "00:59:59,500 --> 01:02:05,250" in to_srt(segments)
    assert "00:59:59.500 --> 01:02:05.250" in to_vtt(segments)
    assert to_txt(segments).startswith("[00:59:59.500] late")


def test_documents_follow_the_public_contract():
    chunks = _chunks()
    transcript = transcript_doc(transcript_segments(chunks), "English")
    assert set(transcript) == {"language", "segments"}
    assert all(set(s) == {"start", "end", "text"} for s in transcript["segments"])
    assert all(isinstance(s["start"], float) for s in transcript["segments"])
    captions = captions_doc(chunks)
    assert [set(c) for c in captions["chunks"]] == [{"index", "start", "end", "visual", "audio"}] * 3
    summary = summary_doc("  whole  ", chunks)
    assert summary["summary"] == "whole"
    assert [c["summary"] for c in summary["chunks"]] == ["", "quiet", "ending"]
    json.dumps([transcript, captions, summary])


def test_clean_text_is_one_line():
    assert clean_text(" a\n\n b\t c --> d ") == "a b c -> d"
