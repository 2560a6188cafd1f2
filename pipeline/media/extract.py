"""Extraction: one ffmpeg decode pass per file writes all frames (at the sampling fps, pixel-capped)
and the whole soundtrack (16 kHz mono WAV); chunks are then cut from those without decoding again.

Command lines are built by pure functions (ffmpeg-python) and run by :func:`run_ffmpeg`.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import ffmpeg
import numpy as np

from pipeline import deadlines, failpoints
from pipeline.errors import ConfigError, PermanentMediaError
from pipeline.media.probe import MediaInfo

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
FRAME_PATTERN = "%06d.jpg"
LOCAL_PROTOCOLS = "file,pipe"
# A decode may run this far past the probed duration (probes estimate, e.g. for VBR MP3 without a header),
# and no further: a file whose decode runs longer states a duration it does not have.
DECODE_MARGIN_SECONDS = 30.0
DECODE_MARGIN_SHARE = 0.25


def ffmpeg_binary() -> str:
    """The ffmpeg that ``imageio-ffmpeg`` ships, so that ``pip install`` alone brings everything."""
    try:
        import imageio_ffmpeg
    except ImportError as error:  # pragma: no cover - a hard dependency
        raise ConfigError("ffmpeg not found: pip install imageio-ffmpeg") from error
    return imageio_ffmpeg.get_ffmpeg_exe()


def frame_scale(width: int, height: int, max_pixels: int) -> float:
    """The factor that brings a frame to at most ``max_pixels`` pixels (never upscales)."""
    if width <= 0 or height <= 0:
        return 1.0
    return min(1.0, math.sqrt(max_pixels / (width * height)))


def decode_bound(duration_s: float, max_duration_seconds: float) -> float:
    """How many seconds of media a decode may write: the probed duration plus a margin, never more than
    ``OMNIQ_MAX_DURATION_SECONDS``."""
    margin = max(DECODE_MARGIN_SECONDS, DECODE_MARGIN_SHARE * duration_s)
    return min(max_duration_seconds, duration_s + margin)


def max_frames(seconds: float, fps: float) -> int:
    """The most frames ``seconds`` of media give at ``fps`` (frame ``k`` is at ``k / fps``)."""
    return math.ceil(seconds * fps) + 1


def build_extract_command(
    source: Path,
    out_dir: Path,
    info: MediaInfo,
    fps: float,
    max_pixels: int,
    ffmpeg_exe: str = "ffmpeg",
    max_seconds: float | None = None,
) -> list[str]:
    """One ffmpeg command that writes ``out_dir/frames/%06d.jpg`` and ``out_dir/audio.wav`` in one decode.

    Frame ``k`` (numbered from 0) is the picture at ``k / fps`` seconds. Only local files are read:
    the protocol whitelist stops a crafted input from making ffmpeg open anything else. ``max_seconds``
    bounds what is written whatever the file's timestamps claim: each output stops at that duration, the
    frames at their count for it and the audio at its size for it.
    """
    video_index, audio_index = info.video_index, info.audio_index
    if video_index is None and audio_index is None:
        raise ValueError("nothing to extract: no video and no audio stream selected")
    stream = ffmpeg.input(f"file:{source.resolve()}", protocol_whitelist=LOCAL_PROTOCOLS)
    bounds: dict[str, object] = {} if max_seconds is None else {"t": f"{max_seconds:.3f}"}
    outputs = []
    if video_index is not None:
        factor = frame_scale(info.width, info.height, max_pixels)
        frames = stream[str(video_index)].filter("fps", fps=fps)
        if factor < 1.0:
            frames = frames.filter("scale", f"trunc(iw*{factor:.6f}/2)*2", f"trunc(ih*{factor:.6f}/2)*2")
        count = {} if max_seconds is None else {"frames:v": max_frames(max_seconds, fps)}
        outputs.append(
            frames.output(
                str(out_dir / "frames" / FRAME_PATTERN),
                **{"q:v": 3, "start_number": 0, "fps_mode": "passthrough", "f": "image2", **bounds, **count},
            )
        )
    if audio_index is not None:
        size = {} if max_seconds is None else {"fs": int(max_seconds * SAMPLE_RATE * 2) + 4096}
        outputs.append(
            stream[str(audio_index)].output(
                str(out_dir / "audio.wav"), ac=1, ar=SAMPLE_RATE, acodec="pcm_s16le", f="wav", **bounds, **size
            )
        )
    command = ffmpeg.merge_outputs(*outputs).global_args("-nostdin", "-hide_banner", "-loglevel", "error")
    return command.overwrite_output().compile(cmd=ffmpeg_exe)


_children: set[subprocess.Popen[bytes]] = set()  # the ffmpeg processes running now (killed if the step is)
_children_lock = threading.Lock()


def kill_children() -> int:
    """Kill every ffmpeg this process runs (a step stopped at its deadline); returns how many."""
    with _children_lock:
        running = list(_children)
    for child in running:
        child.kill()
    return len(running)


def run_ffmpeg(command: list[str], timeout: float, name: str, local: Path | None = None) -> float:
    """Run ``command`` (never through a shell) with a timeout, or less when the step's deadline comes sooner
    (``pipeline.deadlines``); return its wall time in seconds. An ffmpeg past its time is killed.

    Errors name the input as ``name`` (its source), never as ``local``, the file ffmpeg read (a worker's
    temporary copy)."""
    started = time.monotonic()
    allowed = deadlines.timeout_for(timeout)
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        with _children_lock:
            _children.add(child)
        try:
            _, stderr = child.communicate(timeout=allowed)
        except subprocess.TimeoutExpired as error:
            child.kill()
            child.communicate()
            if deadlines.passed():
                deadline = deadlines.current()
                seconds = deadline.seconds if deadline else allowed
                raise deadlines.DeadlineExceeded(
                    f"{name}: ffmpeg was still running at the step's deadline ({seconds:.0f} s) and was stopped"
                ) from error
            raise PermanentMediaError(
                f"{name}: ffmpeg did not finish within {timeout:.0f} s; raise OMNIQ_FFMPEG_TIMEOUT_SECONDS for long "
                "files"
            ) from error
        finally:
            with _children_lock:
                _children.discard(child)
    if child.returncode != 0:
        if deadlines.passed():  # killed by the step's deadline (workers.reliability.deadlines)
            raise deadlines.DeadlineExceeded(f"{name}: ffmpeg was stopped at the step's deadline")
        text = stderr.decode(errors="replace")
        if local is not None:
            for spelled in (f"file:{local.resolve()}", str(local.resolve()), str(local)):
                text = text.replace(spelled, name)
        tail = text.strip().splitlines()[-5:]
        raise PermanentMediaError(f"{name}: ffmpeg could not decode the file: {' | '.join(tail) or 'no message'}")
    return time.monotonic() - started


@dataclass
class ExtractedMedia:
    """The decoded media of one file on local disk: frames at ``fps`` and 16 kHz mono audio."""

    directory: Path
    fps: float
    frame_count: int
    audio_path: Path | None
    audio_samples: int
    seconds: float

    def frame_paths(self, start: float, end: float) -> list[Path]:
        """Frames whose timestamp ``k / fps`` lies in ``[start, end)``."""
        first = math.ceil(start * self.fps - 1e-6)
        last = math.ceil(end * self.fps - 1e-6)  # exclusive
        return [
            self.directory / "frames" / (FRAME_PATTERN % k) for k in range(max(first, 0), min(last, self.frame_count))
        ]

    def audio(self) -> np.ndarray:
        """The whole soundtrack as int16 samples, memory-mapped (long files stay off the heap)."""
        if self.audio_path is None:
            return np.zeros(0, dtype=np.int16)
        return read_wav_int16(self.audio_path)


def extract_media(
    source: Path,
    out_dir: Path,
    info: MediaInfo,
    fps: float,
    max_pixels: int,
    timeout: float,
    name: str,
    max_duration_seconds: float = math.inf,
) -> ExtractedMedia:
    """Decode ``source`` once into frames and audio under ``out_dir``.

    The decode is bounded by the probed duration (``decode_bound``): a file that decodes to longer than it
    states (e.g. one segment repeated in a .ts whose probe reads the first) is stopped there and refused,
    before its frames and audio fill the disk."""
    (out_dir / "frames").mkdir(parents=True, exist_ok=True)
    if failpoints.armed("media.ffmpeg"):  # ffmpeg reads an input that never delivers a byte (a stalled read)
        source = out_dir / "stalled-input.fifo"
        os.mkfifo(source)
        log.warning("failpoint media.ffmpeg=hang fired: ffmpeg reads a stalled input for %s", name)
    bound = decode_bound(info.duration_s, max_duration_seconds)
    command = build_extract_command(source, out_dir, info, fps, max_pixels, ffmpeg_binary(), bound)
    seconds = run_ffmpeg(command, timeout, name, source)
    frame_count = len(list((out_dir / "frames").glob("*.jpg")))
    audio_path = out_dir / "audio.wav" if info.audio_index is not None else None
    samples = len(read_wav_int16(audio_path)) if audio_path else 0
    if frame_count == 0 and samples == 0:
        raise PermanentMediaError(f"{name}: ffmpeg decoded no frames and no audio; the file may be corrupt")
    decoded = max((frame_count - 1) / fps, samples / SAMPLE_RATE)
    if frame_count > max_frames(bound, fps) or decoded > info.duration_s + 0.9 * (bound - info.duration_s) + 1.0:
        raise PermanentMediaError(
            f"{name}: the file states {info.duration_s:.1f} s but decodes to more (stopped at {decoded:.1f} s); its "
            "timestamps are inconsistent: remux or re-encode it (e.g. ffmpeg -i IN -c copy OUT.mp4) and send it again"
        )
    return ExtractedMedia(out_dir, fps, frame_count, audio_path, samples, seconds)


def read_wav_int16(path: Path) -> np.ndarray:
    """Samples of a 16-bit mono WAV written by :func:`build_extract_command`, memory-mapped."""
    with wave.open(str(path), "rb") as handle:
        if handle.getsampwidth() != 2 or handle.getnchannels() != 1:
            raise PermanentMediaError(f"{path}: expected 16-bit mono WAV")
        frames = handle.getnframes()
    data_offset = _wav_data_offset(path)
    if frames == 0:
        return np.zeros(0, dtype=np.int16)
    return np.memmap(path, dtype="<i2", mode="r", offset=data_offset, shape=(frames,))


def _wav_data_offset(path: Path) -> int:
    with path.open("rb") as handle:
        handle.seek(12)
        while True:
            header = handle.read(8)
            if len(header) < 8:
                raise PermanentMediaError(f"{path}: WAV has no data chunk")
            size = int.from_bytes(header[4:], "little")
            if header[:4] == b"data":
                return handle.tell()
            handle.seek(size + (size & 1), 1)


def write_wav(target: Path | BinaryIO, samples: np.ndarray) -> None:
    """Write int16 mono samples at 16 kHz to a path or a binary file object."""
    with wave.open(str(target) if isinstance(target, Path) else target, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())


def wav_bytes_to_float(data: bytes) -> np.ndarray:
    """A WAV file's bytes (as written by :func:`write_wav`) to float32 samples in [-1, 1]."""
    import io

    with wave.open(io.BytesIO(data), "rb") as handle:
        raw = handle.readframes(handle.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def detect_silences(
    samples: np.ndarray, noise_db: float, min_seconds: float, window_seconds: float = 0.02
) -> list[tuple[float, float]]:
    """Spans (start, end) in seconds where the level stays below ``noise_db`` dBFS for ``min_seconds``."""
    window = int(SAMPLE_RATE * window_seconds)
    count = len(samples) // window
    if count == 0:
        return []
    levels = np.empty(count, dtype=np.float64)
    step = 50_000  # windows per block, to bound memory on long files
    for first in range(0, count, step):
        last = min(first + step, count)
        block = np.asarray(samples[first * window : last * window], dtype=np.float32) / 32768.0
        power = np.mean(block.reshape(-1, window) ** 2, axis=1)
        levels[first:last] = 10 * np.log10(power + 1e-12)
    quiet = levels < noise_db
    spans: list[tuple[float, float]] = []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], quiet.astype(np.int8), [0]))))
    for begin, end in zip(edges[::2], edges[1::2], strict=True):
        if (end - begin) * window_seconds >= min_seconds:
            spans.append((float(begin * window_seconds), float(end * window_seconds)))
    return spans
