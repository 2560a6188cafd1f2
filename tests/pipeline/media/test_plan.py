from __future__ import annotations

import pytest

from pipeline.media.plan import plan_chunks


def _assert_tiles(chunks, duration):
    assert chunks[0].start == 0.0
    assert chunks[-1].end == pytest.approx(duration)
    for before, after in zip(chunks, chunks[1:]):
        assert before.end == after.start
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_fixed_windows_without_silence():
    chunks = plan_chunks(95.0, 30.0)
    _assert_tiles(chunks, 95.0)
    assert [c.end for c in chunks] == [30.0, 60.0, 90.0, 95.0]


def test_short_file_is_one_chunk():
    chunks = plan_chunks(12.5, 30.0, [(3.0, 4.0)], search_seconds=3.0)
    assert len(chunks) == 1
    assert (chunks[0].start, chunks[0].end) == (0.0, 12.5)


def test_boundaries_move_into_nearby_silence():
    silences = [(27.5, 28.5), (61.0, 61.6), (91.0, 93.0)]
    chunks = plan_chunks(120.0, 30.0, silences, search_seconds=3.0)
    _assert_tiles(chunks, 120.0)
    cuts = [c.end for c in chunks[:-1]]
    assert 27.5 < cuts[0] < 28.5
    assert 61.0 < cuts[1] < 61.6
    assert 91.0 < cuts[2] < 93.0


def test_silence_out_of_reach_is_ignored():
    chunks = plan_chunks(70.0, 30.0, [(20.0, 21.0)], search_seconds=3.0)
    assert chunks[0].end == 30.0


def test_chunks_never_exceed_window_plus_search():
    silences = [(s, s + 0.5) for s in range(0, 600, 7)]
    chunks = plan_chunks(600.0, 30.0, silences, search_seconds=3.0)
    _assert_tiles(chunks, 600.0)
    assert max(c.duration for c in chunks) <= 33.0 + 1e-6


def test_tiny_tail_joins_previous_chunk():
    chunks = plan_chunks(60.4, 30.0)
    assert [c.end for c in chunks] == [30.0, 60.4]


def test_overlap_reaches_back_but_spans_tile():
    chunks = plan_chunks(90.0, 30.0, overlap_seconds=2.0)
    _assert_tiles(chunks, 90.0)
    assert [c.media_start for c in chunks] == [0.0, 28.0, 58.0]


@pytest.mark.parametrize("duration, chunk", [(0.0, 30.0), (10.0, 0.0)])
def test_rejects_nonsense(duration, chunk):
    with pytest.raises(ValueError):
        plan_chunks(duration, chunk)
