"""Generated sample media: a test pattern (ffmpeg lavfi) with speech, or with tone bursts, between silences.

Used by ``make demo`` and the tests, so no media file has to be shipped. The timing is known: within every
``period`` seconds the sound (a spoken sentence, or a 440 Hz tone) plays for at most ``period - gap`` seconds
from the period's start, then it is silent until the next period. Speech is synthesised offline by espeak-ng
(:mod:`pipeline.media.voice`), so a speech-detecting pipeline has something to transcribe; tones hold no speech.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.media.extract import ffmpeg_binary, run_ffmpeg, write_wav

if TYPE_CHECKING:
    from pipeline.media.voice import SpeechTrack

SOUNDS = ("speech", "tone")


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
    audio_file: Path | None = None,
) -> list[str]:
    """An ffmpeg command writing a sample file; the container follows ``path``'s extension. The sound is
    ``audio_file`` when given (e.g. generated speech), else tone bursts."""
    if not (video or audio):
        raise ValueError("a sample needs video, audio or both")
    command = [ffmpeg_exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        command += ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={duration}"]
    if audio and audio_file is not None:
        command += ["-i", str(audio_file)]
    elif audio:
        tone = f"0.5*sin(2*PI*440*t)*lt(mod(t\\,{period})\\,{period - gap})"
        command += ["-f", "lavfi", "-i", f"aevalsrc={tone}:s=44100:d={duration}"]
    if video:
        command += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if audio:
        command += ["-c:a", "aac" if path.suffix in {".mp4", ".m4a", ".mov", ".mkv"} else "libmp3lame"]
        if path.suffix in {".wav"}:
            command[-1] = "pcm_s16le"
        else:  # a podcast's bitrate: lame's default for 16 kHz speech (24 kb/s) garbles words for Whisper tiny.en
            command += ["-b:a", "128k"]
    command += ["-t", str(duration), str(path)]
    return command


def make_sample(
    path: Path,
    duration: float = 20.0,
    video: bool = True,
    audio: bool = True,
    sound: str = "speech",
    track: SpeechTrack | None = None,
    **options: object,
) -> Path:
    """Write a sample file to ``path`` and return it. ``sound`` is ``speech`` (a sentence per period) or
    ``tone``; ``track`` (a :class:`~pipeline.media.voice.SpeechTrack`) gives the soundtrack exactly."""
    if sound not in SOUNDS:
        raise ValueError(f"sound {sound!r}: use one of {', '.join(SOUNDS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="omniq-sample-") as temp:
        audio_file = None
        if audio and (track is not None or sound == "speech"):
            if track is None:
                track = spoken_track(duration, float(options.get("period", 5.0)), float(options.get("gap", 1.0)))
            audio_file = Path(temp) / "speech.wav"
            write_wav(audio_file, track.samples)
        command = build_sample_command(
            path,
            duration,
            video,
            audio,
            ffmpeg_exe=ffmpeg_binary(),
            audio_file=audio_file,
            **options,  # type: ignore[arg-type]
        )
        run_ffmpeg(command, timeout=120, name=str(path))
    return path


def spoken_track(duration: float, period: float = 5.0, gap: float = 1.0) -> SpeechTrack:
    """One of :data:`~pipeline.media.voice.SENTENCES` at the start of every period, at most ``period - gap``
    seconds long (spoken faster, or cut, to fit)."""
    from pipeline.media.voice import SENTENCES, speech_track

    starts = [k * period for k in range(int(duration // period) + 1) if k * period < duration - 0.3]
    texts = [SENTENCES[k % len(SENTENCES)] for k in range(len(starts))]
    return speech_track(texts, starts, duration, longest=max(0.3, period - gap))
