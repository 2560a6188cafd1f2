"""One object per chunk: its frames (JPEG bytes), its audio (16 kHz mono int16) and its metadata.

An object store charges a request per object, and per-frame objects made ingest 4x slower than the ffmpeg
pass on S3. A pack is written with one PUT and read with one GET; its small header comes first, so the first
frame (the viewer's thumbnail) can be read with one ranged GET of the head.

Layout: ``b"OMNIQPK1"``, the header's length (uint32, little-endian), the header (UTF-8 JSON), then the
payload. The header holds the chunk's metadata (``meta``), ``frames``: ``[[offset, length], ...]`` and
``audio``: ``[offset, samples]`` or ``null``; offsets count from the start of the payload.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import PermanentError

if TYPE_CHECKING:
    from pipeline.storage import Storage

MAGIC = b"OMNIQPK1"
CONTENT_TYPE = "application/x-omniq-chunk-pack"
_PREFIX = struct.Struct("<8sI")
HEAD_BYTES = 64 * 1024  # one ranged read of this many bytes holds the header and, usually, the first frame


@dataclass
class ChunkPack:
    """A decoded pack: metadata, the frames as JPEG bytes, and the audio as int16 samples (or ``None``)."""

    meta: dict[str, Any]
    frames: list[bytes]
    audio: np.ndarray | None


def pack_chunk(meta: dict[str, Any], frames: Sequence[bytes], audio: np.ndarray | None) -> bytes:
    """Serialise one chunk; ``audio`` is int16 mono samples at 16 kHz."""
    index: list[list[int]] = []
    offset = 0
    for frame in frames:
        index.append([offset, len(frame)])
        offset += len(frame)
    audio_bytes = b"" if audio is None else np.ascontiguousarray(audio, dtype="<i2").tobytes()
    header = {
        "version": 1,
        "meta": meta,
        "frames": index,
        "audio": None if audio is None else [offset, len(audio_bytes) // 2],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(MAGIC, len(head)), head, *frames, audio_bytes])


def _header(data: bytes, name: str) -> tuple[dict[str, Any], int]:
    """The header and where the payload starts; ``data`` may be just the head of the pack."""
    if len(data) < _PREFIX.size:
        raise PermanentError(f"{name}: not a chunk pack (only {len(data)} bytes)")
    magic, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PermanentError(f"{name}: not a chunk pack (bad magic); re-run the job with --force")
    start = _PREFIX.size + length
    if len(data) < start:
        raise HeadTooShort(start)
    return json.loads(data[_PREFIX.size : start]), start


class HeadTooShort(Exception):
    """The bytes read so far end before the header does (carries how many are needed)."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def unpack_chunk(data: bytes, name: str = "chunk pack") -> ChunkPack:
    """Read a whole pack back."""
    try:
        header, start = _header(data, name)
    except HeadTooShort as error:
        raise PermanentError(f"{name}: truncated chunk pack ({len(data)} of {error.needed}+ bytes)") from error
    payload = memoryview(data)[start:]
    frames = [bytes(payload[offset : offset + length]) for offset, length in header["frames"]]
    audio = None
    if header["audio"] is not None:
        offset, samples = header["audio"]
        audio = np.frombuffer(payload[offset : offset + 2 * samples], dtype="<i2")
        if audio.size != samples:
            raise PermanentError(f"{name}: truncated chunk pack (audio has {audio.size} of {samples} samples)")
    return ChunkPack(header["meta"], frames, audio)


def first_frame(head: bytes, read_range: Callable[[int, int], bytes], name: str = "chunk pack") -> bytes | None:
    """The first frame of a pack from its ``head`` bytes, reading more with ``read_range(start, length)``
    only when the head ends too early. ``None`` when the chunk has no frames."""
    try:
        header, start = _header(head, name)
    except HeadTooShort as error:
        head = head + read_range(len(head), error.needed - len(head))
        header, start = _header(head, name)
    if not header["frames"]:
        return None
    offset, length = header["frames"][0]
    begin, end = start + offset, start + offset + length
    if end <= len(head):
        return head[begin:end]
    return read_range(begin, length)


def read_first_frame(storage: Storage, key: str) -> bytes | None:
    """The first frame of the pack at ``key`` with one ranged read (two when its header is unusually long)."""
    head = storage.get_range(key, 0, HEAD_BYTES)
    return first_frame(head, lambda start, length: storage.get_range(key, start, length), storage.uri(key))
