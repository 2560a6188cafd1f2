from __future__ import annotations

import pytest

from pipeline.config import Settings
from pipeline.errors import LimitExceeded, PermanentMediaError, SourceNotFound
from pipeline.media.extract import (
    SAMPLE_RATE,
    build_extract_command,
    detect_silences,
    extract_media,
    frame_scale,
)
from pipeline.media.probe import MediaInfo, check_limits, probe_media
from pipeline.media.sample import build_sample_command, make_sample


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    directory = tmp_path_factory.mktemp("media")
    return {
        "av": make_sample(directory / "av.mp4", 12.0),
        "video": make_sample(directory / "video.mp4", 12.0, audio=False),
        "audio": make_sample(directory / "audio.mp3", 12.0, video=False, sound="tone"),
        "dir": directory,
    }


def test_probe_video_with_audio(media):
    info = probe_media(media["av"])
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (320, 240)
    assert info.duration_s == pytest.approx(12.0, abs=0.1)
    assert info.video_index is not None and info.audio_index is not None


def test_probe_video_only_and_audio_only(media):
    video = probe_media(media["video"])
    assert video.has_video and not video.has_audio and video.audio_index is None
    audio = probe_media(media["audio"])
    assert audio.has_audio and not audio.has_video and audio.width == 0


def test_probe_rejects_non_media_with_the_name(media):
    bogus = media["dir"] / "notes.mp4"
    bogus.write_bytes(b"this is not a video at all\n" * 100)
    with pytest.raises(PermanentMediaError, match="notes.mp4.*not a decodable"):
        probe_media(bogus)
    # a worker reads a temporary copy: the error names the source, in FFmpeg's words, without an errno
    with pytest.raises(PermanentMediaError) as refused:
        probe_media(bogus, "s3://media/talk.mp4")
    message = str(refused.value)
    assert message.startswith("s3://media/talk.mp4: not a decodable audio or video file (Invalid data found")
    assert "Errno" not in message and str(bogus) not in message
    empty = media["dir"] / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(PermanentMediaError, match="empty .0 bytes.; check that it was written completely"):
        probe_media(empty)
    with pytest.raises(PermanentMediaError, match="empty .0 bytes.; upload it again"):
        probe_media(empty, "s3://media/empty.mp4")


def test_probe_rejects_truncated_file(media):
    data = media["av"].read_bytes()
    cut = media["dir"] / "cut.mp4"
    cut.write_bytes(data[:2000])
    with pytest.raises(PermanentMediaError):
        probe_media(cut)


def test_probe_rejects_empty_missing_and_playlists(media):
    empty = media["dir"] / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(PermanentMediaError, match="empty"):
        probe_media(empty)
    with pytest.raises(SourceNotFound):
        probe_media(media["dir"] / "missing.mp4")
    playlist = media["dir"] / "evil.mp4"
    playlist.write_text("#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    with pytest.raises(PermanentMediaError, match="playlist"):
        probe_media(playlist)


def test_limits_name_the_setting():
    info = MediaInfo(
        size_bytes=10, duration_s=100.0, format_name="mp4", has_video=True, has_audio=False, width=640, height=480
    )
    check_limits(info, Settings(), "x.mp4")
    with pytest.raises(LimitExceeded, match="OMNIQ_MAX_DURATION_SECONDS"):
        check_limits(info, Settings(max_duration_seconds=50), "x.mp4")
    with pytest.raises(LimitExceeded, match="OMNIQ_MAX_FILE_BYTES"):
        check_limits(info, Settings(max_file_bytes=5), "x.mp4")
    with pytest.raises(LimitExceeded, match="OMNIQ_MAX_DIMENSION"):
        check_limits(info, Settings(max_dimension=600), "x.mp4")
    zero = MediaInfo(size_bytes=10, duration_s=0.0, format_name="mp4", has_video=True, has_audio=False)
    with pytest.raises(PermanentMediaError, match="duration"):
        check_limits(zero, Settings(), "x.mp4")


def test_extract_command_is_a_safe_single_pass(tmp_path):
    info = MediaInfo(1, 10.0, "mp4", True, True, 1920, 1080, video_index=0, audio_index=1)
    command = build_extract_command(tmp_path / "in.mp4", tmp_path / "out", info, 2.0, 448 * 448)
    assert command.count("-i") == 1  # one decode for frames and audio
    assert command[command.index("-protocol_whitelist") + 1] == "file,pipe"
    assert command[command.index("-i") + 1].startswith("file:")
    graph = command[command.index("-filter_complex") + 1]
    assert "fps=fps=2" in graph and "scale=" in graph
    assert "0:1" in command and "16000" in command and "1" == command[command.index("-ac") + 1]
    assert "-nostdin" in command
    audio_only = MediaInfo(1, 10.0, "mp3", False, True, audio_index=0)
    command = build_extract_command(tmp_path / "a.mp3", tmp_path / "out", audio_only, 2.0, 448 * 448)
    assert "-filter_complex" not in command and not any(part.endswith(".jpg") for part in command)


def test_frame_scale_caps_pixels_and_never_upscales():
    factor = frame_scale(1920, 1080, 448 * 448)
    assert 1920 * factor * 1080 * factor <= 448 * 448 + 1
    assert frame_scale(320, 240, 448 * 448) == 1.0


def test_sample_command_has_no_shell_metacharacters_problem(tmp_path):
    command = build_sample_command(tmp_path / "s.mp4", 5.0)
    assert command[0] == "ffmpeg" and isinstance(command, list)


def test_extract_frames_and_audio(media, tmp_path):
    info = probe_media(media["av"])
    out = extract_media(media["av"], tmp_path / "d", info, fps=2.0, max_pixels=100 * 100, timeout=60, name="av")
    assert out.frame_count == pytest.approx(24, abs=1)
    assert out.audio_samples == pytest.approx(12 * SAMPLE_RATE, rel=0.01)
    from PIL import Image

    with Image.open(out.frame_paths(0, 1)[0]) as frame:
        assert frame.width * frame.height <= 100 * 100
    assert len(out.frame_paths(2.0, 4.0)) == 4  # frames at 2.0, 2.5, 3.0, 3.5


def test_silences_match_the_generated_tone_pattern(media, tmp_path):
    info = probe_media(media["audio"])
    out = extract_media(media["audio"], tmp_path / "a", info, 2.0, 10_000, 60, "audio")
    assert out.frame_count == 0
    silences = detect_silences(out.audio(), noise_db=-35, min_seconds=0.3)
    # the sample plays a tone for 4 s then is silent for 1 s, every 5 s
    assert len(silences) >= 2
    for begin, end in silences[:2]:
        assert begin % 5.0 == pytest.approx(4.0, abs=0.1)
        assert end - begin == pytest.approx(1.0, abs=0.15)


def test_corrupt_stream_fails_extraction_clearly(media, tmp_path):
    data = bytearray(media["av"].read_bytes())
    # keep the header intact, destroy the payload
    for offset in range(len(data) // 3, len(data), 7):
        data[offset] = 0
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    with pytest.raises(PermanentMediaError, match="s3://media/talk.mp4") as refused:
        info = probe_media(broken, "s3://media/talk.mp4")
        extract_media(broken, tmp_path / "b", info, 2.0, 10_000, 60, "s3://media/talk.mp4")
    assert str(broken) not in str(refused.value) and "Errno" not in str(refused.value)  # the source, not the copy


def test_a_file_that_decodes_longer_than_it_states_is_stopped_and_refused(tmp_path):
    """180 copies of one 10 s segment in a .ts probe as 10 s; the decode used to write 1843 s of frames and
    audio. Now each output stops at the probed duration plus the margin, and the file is refused."""
    import subprocess

    from pipeline.media.extract import decode_bound, ffmpeg_binary, max_frames

    segment = tmp_path / "seg.ts"
    subprocess.run(
        [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-i", str(make_sample(tmp_path / "s.mp4", 10.0, size="64x48")),
         "-c", "copy", "-f", "mpegts", str(segment)],
        check=True, timeout=60,
    )  # fmt: skip
    crafted = tmp_path / "looped.ts"
    crafted.write_bytes(segment.read_bytes() * 12)  # decodes to ~120 s
    info = probe_media(crafted)
    assert info.duration_s < 15  # the probe reads the first segment
    bound = decode_bound(info.duration_s, Settings().max_duration_seconds)
    out = tmp_path / "d"
    with pytest.raises(PermanentMediaError, match=r"looped.ts: the file states .* but decodes to more .* remux"):
        extract_media(crafted, out, info, 2.0, 64 * 48, timeout=60, name="looped.ts")
    assert len(list((out / "frames").glob("*.jpg"))) <= max_frames(bound, 2.0)
    assert (out / "audio.wav").stat().st_size <= bound * SAMPLE_RATE * 2 + 65536  # ffmpeg stops within a packet


def test_the_decode_bound_follows_the_probe_and_the_limit(tmp_path):
    from pipeline.media.extract import decode_bound

    assert decode_bound(10.0, 6 * 3600) == 40.0  # 30 s at least
    assert decode_bound(3600.0, 6 * 3600) == 4500.0  # a quarter for long files
    assert decode_bound(3600.0, 3700.0) == 3700.0  # never past OMNIQ_MAX_DURATION_SECONDS
    info = MediaInfo(1, 10.0, "mp4", True, True, 64, 48, video_index=0, audio_index=1)
    command = build_extract_command(tmp_path / "in.mp4", tmp_path / "out", info, 2.0, 448 * 448, max_seconds=40.0)
    assert command.count("-t") == 2 and "-frames:v" in command and "-fs" in command
    assert command[command.index("-frames:v") + 1] == "81"
