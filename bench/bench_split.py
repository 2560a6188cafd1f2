"""Split stage speed: omniq's ingest (probe + one decode + speech detection + one pack per chunk, uploaded in
parallel) on a file store and on S3 (a SeaweedFS started here), against baselines run in this same process on
the same file (the sample speaks a sentence every 5 s). Speech detection (Silero VAD) is work the ffmpeg pass does
not do, so its share is printed apart, from the plans' ``vad_s``:

- ``ffmpeg pass``: one raw ffmpeg command writing the same frames and audio to local disk (the floor);
- ``per-chunk``: the naive split, one ffmpeg command per chunk writing frames and audio.

Usage: python bench/bench_split.py [FILE] [--duration 120] [--no-s3]   (a 640x360 sample is made without FILE)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Settings
from pipeline.job import ingest, make_spec
from pipeline.media.extract import build_extract_command, ffmpeg_binary, frame_scale, run_ffmpeg
from pipeline.media.probe import probe_media
from pipeline.media.sample import make_sample
from pipeline.storage import LocalStorage, Storage, open_storage


def best_of(runs: int, function: Callable[[int], object]) -> float:
    """The median wall time of ``runs`` calls (each gets its run number, to write somewhere new)."""
    times = []
    for run in range(runs):
        started = time.perf_counter()
        function(run)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 run (no SeaweedFS)")
    args = parser.parse_args()
    settings = Settings()
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        source = Path(args.file) if args.file else make_sample(directory / "sample.mp4", args.duration, size="640x360")
        info = probe_media(source)
        exe = ffmpeg_binary()

        def raw_pass(run: int) -> None:
            out = directory / "raw" / str(run)
            (out / "frames").mkdir(parents=True)
            command = build_extract_command(source, out, info, settings.fps, settings.frame_max_pixels, exe)
            run_ffmpeg(command, 3600, "raw")

        vad: list[float] = []

        def ours(storage: Storage) -> Callable[[int], object]:
            def run(number: int) -> object:
                fresh = settings.model_copy(update={"chunk_overlap_seconds": 0.0, "silence_noise_db": -35.0 - number})
                plan = ingest(make_spec(str(source), fresh), fresh, storage)  # a new job id per run
                vad.append(plan.timings["vad_s"])
                return plan

            return run

        def interleaved(*runs: Callable[[int], object]) -> list[float]:
            """Median wall time of each, the runs taking turns (so drifts in machine speed hit all alike)."""
            times: list[list[float]] = [[] for _ in runs]
            for number in range(args.runs):
                for slot, function in enumerate(runs):
                    started = time.perf_counter()
                    function(number)
                    times[slot].append(time.perf_counter() - started)
            return [statistics.median(t) for t in times]

        s3_line = ""
        if args.no_s3:
            raw, local = interleaved(raw_pass, ours(LocalStorage(directory / "store")))
        else:
            from tests.servers import S3Server

            with S3Server() as s3:
                bucket = s3.create_bucket("bench")
                os.environ.update(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key)
                s3_settings = settings.model_copy(update={"s3_endpoint_url": s3.endpoint_url, "s3_region": s3.region})
                storage = open_storage(f"s3://{bucket}/omniq", s3_settings)
                ours(storage)(-1)  # warm-up: the S3 client and its connections
                raw, local, on_s3 = interleaved(raw_pass, ours(LocalStorage(directory / "store")), ours(storage))
                s3_line = f"omniq ingest, S3 (SeaweedFS): {on_s3:7.2f} s   {on_s3 / raw:5.2f}x the ffmpeg pass"
                speech = statistics.median(vad)
                s3_line += f"; without speech detection {(on_s3 - speech) / raw:5.2f}x"
        chunks = math.ceil(info.duration_s / settings.chunk_seconds)

        def per_chunk(run: int) -> None:
            factor = frame_scale(info.width, info.height, settings.frame_max_pixels)
            for index in range(chunks):
                out = directory / "naive" / f"{run}-{index}"
                out.mkdir(parents=True)
                start = index * settings.chunk_seconds
                command = [exe, "-nostdin", "-v", "error", "-ss", str(start), "-t", str(settings.chunk_seconds)]
                command += ["-i", str(source)]
                if info.has_video:
                    command += ["-map", "0:v:0", "-vf", f"fps={settings.fps},scale=trunc(iw*{factor}/2)*2:-2"]
                    command += [str(out / "%06d.jpg")]
                if info.has_audio:
                    command += ["-map", "0:a:0", "-ac", "1", "-ar", "16000", str(out / "audio.wav")]
                run_ffmpeg(command, 3600, "naive")

        naive = best_of(1, per_chunk)
    print(
        f"file: {info.duration_s:.0f} s, {info.width}x{info.height}, {chunks} chunks of {settings.chunk_seconds:.0f} s "
        f"at {settings.fps:g} fps; median of {args.runs} runs"
    )
    print(f"one raw ffmpeg pass (floor):   {raw:7.2f} s   1.00x")
    speech = statistics.median(vad)
    print(
        f"omniq ingest, file store:      {local:7.2f} s   {local / raw:5.2f}x the ffmpeg pass; "
        f"without speech detection {(local - speech) / raw:5.2f}x"
    )
    if s3_line:
        print(s3_line)
    print(f"one ffmpeg per chunk (naive):  {naive:7.2f} s   {naive / raw:5.2f}x the ffmpeg pass")
    print(f"speech detection (Silero VAD): {speech:7.2f} s   {info.duration_s / speech:5.0f}x real time")


if __name__ == "__main__":
    main()
