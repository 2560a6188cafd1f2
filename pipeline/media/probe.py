"""Probe an input with PyAV and check it against the configured limits before any work is done."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import av

from pipeline.config import Settings
from pipeline.errors import LimitExceeded, PermanentMediaError, SourceNotFound
from pipeline.sources import check_size

log = logging.getLogger(__name__)

# Demuxers that make ffmpeg open *other* files or URLs named inside the input: never for user files.
REFERENCING_FORMATS = frozenset({"hls", "concat", "ffconcat", "dash", "image2", "tee", "sdp", "rtsp", "mpjpeg"})
REFERENCING_MAGIC = (b"#EXTM3U", b"ffconcat", b"<?xml", b"<MPD", b"v=0")


@dataclass(frozen=True)
class MediaInfo:
    """What omniq needs to know about an input to plan and extract it."""

    size_bytes: int
    duration_s: float
    format_name: str
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    rotation: int = 0
    video_codec: str | None = None
    audio_codec: str | None = None
    frame_rate: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    video_index: int | None = None  # absolute stream index of the video stream used
    audio_index: int | None = None  # absolute stream index of the audio stream used

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> MediaInfo:
        return cls(**data)  # type: ignore[arg-type]


def _rotation(stream: av.video.stream.VideoStream) -> int:
    for side_data in getattr(stream, "side_data", {}) or {}:
        if "rotation" in str(side_data).lower():
            return int(stream.side_data[side_data]) % 360
    try:
        return int(stream.metadata.get("rotate", 0)) % 360
    except (TypeError, ValueError):
        return 0


def av_reason(error: Exception) -> str:
    """FFmpeg's own words for a PyAV error ("Invalid data found when processing input"), without the errno
    ("[Errno 1094995529]") or the local file name (a worker's temporary copy says nothing to the user)."""
    reason = getattr(error, "strerror", None)
    return str(reason) if reason else type(error).__name__


def probe_media(path: Path, name: str | None = None) -> MediaInfo:
    """Read streams and duration of ``path``; raise :class:`PermanentMediaError` for anything unusable.

    ``name`` is how the input is called in error messages (its source URI).
    """
    label = name or str(path)
    if not path.is_file():
        raise SourceNotFound(f"{label}: no such file; check the path or URI")
    size = path.stat().st_size
    if size == 0:
        again = "upload it again" if label.startswith("s3://") else "check that it was written completely"
        raise PermanentMediaError(f"{label}: the file is empty (0 bytes); {again}")
    with path.open("rb") as handle:
        head = handle.read(64).lstrip()
    if head.startswith(REFERENCING_MAGIC):
        raise PermanentMediaError(
            f"{label}: looks like a playlist or manifest (HLS/DASH/concat/SDP), which omniq does not follow; "
            "pass the media file itself"
        )
    try:
        container = av.open(str(path), options={"protocol_whitelist": "file"})
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise PermanentMediaError(
            f"{label}: not a decodable audio or video file ({av_reason(error)}); check that it is media and not "
            "truncated"
        ) from error
    with container:
        format_name = container.format.name
        if set(format_name.split(",")) & REFERENCING_FORMATS:
            raise PermanentMediaError(f"{label}: format '{format_name}' refers to other files; pass the media file")
        videos = [
            s
            for s in container.streams.video
            if not (s.disposition & av.stream.Disposition.attached_pic) and s.codec_context is not None
        ]
        audios = [s for s in container.streams.audio if s.codec_context is not None]
        if not videos and not audios:
            raise PermanentMediaError(f"{label}: has no audio or video stream; omniq needs at least one")
        duration = _duration(container, videos + audios)
        video = videos[0] if videos else None
        audio = audios[0] if audios else None
        return MediaInfo(
            size_bytes=size,
            duration_s=duration,
            format_name=format_name,
            has_video=video is not None,
            has_audio=audio is not None,
            width=int(video.codec_context.width or 0) if video else 0,
            height=int(video.codec_context.height or 0) if video else 0,
            rotation=_rotation(video) if video else 0,
            video_codec=video.codec_context.name if video else None,
            audio_codec=audio.codec_context.name if audio else None,
            frame_rate=float(video.average_rate) if video and video.average_rate else None,
            sample_rate=int(audio.codec_context.sample_rate or 0) or None if audio else None,
            channels=int(audio.codec_context.channels or 0) or None if audio else None,
            video_index=video.index if video else None,
            audio_index=audio.index if audio else None,
        )


def _duration(container: av.container.InputContainer, streams: list[av.stream.Stream]) -> float:
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    durations = [float(s.duration * s.time_base) for s in streams if s.duration and s.time_base]
    return max(durations, default=0.0)


def check_limits(info: MediaInfo, settings: Settings, name: str) -> None:
    """Raise :class:`LimitExceeded` (or :class:`PermanentMediaError`) naming the limit and the setting."""
    if info.duration_s <= 0:
        raise PermanentMediaError(f"{name}: duration is zero or unknown; the file may be truncated or empty")
    check_size(info.size_bytes, settings, name)
    if info.duration_s > settings.max_duration_seconds:
        raise LimitExceeded(
            f"{name}: {info.duration_s:.0f} s is longer than the limit of {settings.max_duration_seconds:.0f} s; "
            "raise OMNIQ_MAX_DURATION_SECONDS or split the file"
        )
    if max(info.width, info.height) > settings.max_dimension:
        raise LimitExceeded(
            f"{name}: {info.width}x{info.height} is larger than {settings.max_dimension} px on a side; "
            "raise OMNIQ_MAX_DIMENSION to accept it"
        )
