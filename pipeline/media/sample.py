"""Generated sample media (ffmpeg lavfi): a test pattern with tone bursts and silences.

Used by ``make demo`` and the tests, so no media file has to be shipped. The tone pattern is
known, so chunk boundaries can be checked against it: within every ``period`` seconds the tone
plays for ``period - gap`` seconds, then ``gap`` seconds are silent.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.media.extract import ffmpeg_binary, run_ffmpeg


def build_sample_command(
    path: Path,
    duration: float,
    video: bool = True,
    audio: bool = True,
    size: str = "320x240",
    rate: int = 10,
    period: float = 5.0,
    gap: float = 1.0,
    ffmpeg_exe: str = "ffmpeg",
) -> list[str]:
    """An ffmpeg command writing a sample file; the container follows ``path``'s extension."""
    if not (video or audio):
        raise ValueError("a sample needs video, audio or both")
    command = [ffmpeg_exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        command += ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={duration}"]
    if audio:
        tone = f"0.5*sin(2*PI*440*t)*lt(mod(t\\,{period})\\,{period - gap})"
        command += ["-f", "lavfi", "-i", f"aevalsrc={tone}:s=44100:d={duration}"]
    if video:
        command += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if audio:
        command += ["-c:a", "aac" if path.suffix in {".mp4", ".m4a", ".mov", ".mkv"} else "libmp3lame"]
        if path.suffix in {".wav"}:
            command[-1] = "pcm_s16le"
    command += ["-t", str(duration), str(path)]
    return command


def make_sample(path: Path, duration: float = 20.0, video: bool = True, audio: bool = True, **options: object) -> Path:
    """Write a sample file to ``path`` and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = build_sample_command(path, duration, video, audio, ffmpeg_exe=ffmpeg_binary(), **options)  # type: ignore[arg-type]
    run_ffmpeg(command, timeout=120, name=str(path))
    return path
