"""Split stage speed: omniq's ingest (one decode + silence detection + chunk writes) against
baselines run in this same process on the same file:

- ``decode``: one raw ffmpeg command that only decodes the file (``-f null``), the floor;
- ``per-chunk``: the naive split, one ffmpeg command per chunk writing frames and audio.

Usage: python bench/bench_split.py [FILE] [--duration 300]   (a sample is generated when FILE is omitted)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from pipeline.config import Settings
from pipeline.job import ingest, make_spec
from pipeline.media.extract import ffmpeg_binary, frame_scale, run_ffmpeg
from pipeline.media.probe import probe_media
from pipeline.media.sample import make_sample
from pipeline.storage import LocalStorage


def timed(function) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?")
    parser.add_argument("--duration", type=float, default=300.0)
    args = parser.parse_args()
    settings = Settings()
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        source = Path(args.file) if args.file else make_sample(directory / "sample.mp4", args.duration, size="640x360")
        info = probe_media(source)
        exe = ffmpeg_binary()
        decode = timed(
            lambda: run_ffmpeg([exe, "-nostdin", "-v", "error", "-i", str(source), "-f", "null", "-"], 3600, "decode")
        )

        storage = LocalStorage(directory / "store")
        spec = make_spec(str(source), settings)
        ours = timed(lambda: ingest(spec, settings, storage))
        chunks = math.ceil(info.duration_s / settings.chunk_seconds)

        def per_chunk() -> None:
            factor = frame_scale(info.width, info.height, settings.frame_max_pixels)
            for index in range(chunks):
                out = directory / "naive" / str(index)
                out.mkdir(parents=True)
                start = index * settings.chunk_seconds
                command = [
                    exe,
                    "-nostdin",
                    "-v",
                    "error",
                    "-ss",
                    str(start),
                    "-t",
                    str(settings.chunk_seconds),
                    "-i",
                    str(source),
                ]
                if info.has_video:
                    command += [
                        "-map",
                        "0:v:0",
                        "-vf",
                        f"fps={settings.fps},scale=trunc(iw*{factor}/2)*2:-2",
                        str(out / "%06d.jpg"),
                    ]
                if info.has_audio:
                    command += ["-map", "0:a:0", "-ac", "1", "-ar", "16000", str(out / "audio.wav")]
                run_ffmpeg(command, 3600, "naive")

        naive = timed(per_chunk)
    print(
        f"file: {info.duration_s:.0f} s, {info.width}x{info.height}, {chunks} chunks of {settings.chunk_seconds:.0f} s"
    )
    print(f"decode only (baseline):   {decode:7.2f} s   1.00x")
    print(f"omniq ingest:             {ours:7.2f} s   {ours / decode:5.2f}x decode")
    print(f"one ffmpeg per chunk:     {naive:7.2f} s   {naive / decode:5.2f}x decode")
    print(f"omniq vs per-chunk:       {naive / ours:5.2f}x faster")


if __name__ == "__main__":
    main()
