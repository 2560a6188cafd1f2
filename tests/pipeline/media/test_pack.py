"""Chunk packs: one object per chunk, round trip, the first frame from the head, damaged packs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PermanentError
from pipeline.media import pack
from pipeline.storage import LocalStorage


def test_round_trip_keeps_frames_audio_and_meta():
    frames = [b"\xff\xd8one", b"", b"\xff\xd8three" * 100]
    audio = np.arange(-5, 5, dtype=np.int16)
    data = pack.pack_chunk({"index": 3, "start": 1.5}, frames, audio)
    contents = pack.unpack_chunk(data)
    assert contents.meta == {"index": 3, "start": 1.5}
    assert contents.frames == frames
    assert contents.audio is not None and contents.audio.tolist() == audio.tolist()
    assert pack.unpack_chunk(pack.pack_chunk({}, [], None)).audio is None


def test_first_frame_reads_only_the_head(tmp_path):
    storage = LocalStorage(tmp_path)
    frames = [b"A" * 1000, b"B" * 500_000]
    storage.put_bytes("p", pack.pack_chunk({"index": 0}, frames, np.zeros(16_000, dtype=np.int16)))
    reads: list[tuple[int, int]] = []
    original = storage.get_range

    def counted(key, start, length):
        reads.append((start, length))
        return original(key, start, length)

    storage.get_range = counted  # type: ignore[method-assign]
    assert pack.read_first_frame(storage, "p") == b"A" * 1000
    assert reads == [(0, pack.HEAD_BYTES)]  # one ranged read, not the 532 kB pack


def test_first_frame_past_the_head_and_long_headers():
    big_first = b"C" * (pack.HEAD_BYTES + 10)
    data = pack.pack_chunk({"note": "x" * (pack.HEAD_BYTES + 5)}, [big_first], None)  # header longer than the head

    def read_range(start, length):
        return data[start : start + length]

    assert pack.first_frame(data[: pack.HEAD_BYTES], read_range) == big_first
    assert pack.first_frame(pack.pack_chunk({}, [], np.zeros(4, dtype=np.int16)), read_range) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"OMNI", "not a chunk pack"),
        (b"NOTAPACK" + b"\0" * 8, "bad magic"),
        (pack.pack_chunk({}, [b"x"], np.zeros(100, dtype=np.int16))[:-10], "truncated"),
        (pack.pack_chunk({}, [b"x"], None)[:14], "truncated"),
    ],
)
def test_damaged_packs_are_clear_permanent_errors(data, message):
    with pytest.raises(PermanentError, match=message):
        pack.unpack_chunk(data, "s3://b/work/j/chunks/00000/media.pack")
