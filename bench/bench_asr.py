"""Transcript quality and cost: Whisper tiny.en (bundled) against the Qwen3-Omni path, on synthesised speech.

Speech is espeak-ng in several voices and speeds (natural sentences, four per 30 s track, at known times; each
word's onset from espeak-ng's own word events), clean and mixed with noise and with music at 10 dB and 0 dB SNR.
Each track goes through what a job does: speech detection at ingest (Silero VAD, utterances), then the
transcriber on the chunk's utterances. Printed per condition: WER (normalised: case, punctuation, numbers;
``pipeline.evaluation``), word onset error (median and p95, ms, over the words both agree on), real-time
factor per core (CPU seconds per second of audio) and peak RSS, each transcriber in a process of its own.

    .venv/bin/python bench/bench_asr.py [--voices 3] [--speeds 140,175,210] [--threads 2]

The Qwen3-Omni row runs the tiny random-weight model (the only one that runs here): its words are random, so
only its cost means anything; it is the cost of one transcript row per utterance on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import evaluation
from pipeline.media.extract import SAMPLE_RATE

SENTENCES = [
    "The harbour crossing is shut for repairs until next week.",
    "Buses will run every ten minutes from the station.",
    "Residents near the river should expect some noise at night.",
    "The council meets again on the fourteenth of March.",
    "Our new library opens its doors to readers on Monday morning.",
    "Heavy rain is expected across the north later this evening.",
    "She bought fresh bread and a bag of apples at the market.",
    "The museum will show paintings from three hundred years ago.",
    "Please keep your ticket until you leave the train.",
    "The football match was delayed because of the storm.",
    "Doctors recommend a short walk after every meal.",
    "The school choir will sing in the town hall on Friday.",
]
VOICES = ["en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en+f3"]  # "+f3" variants vary run to run
STARTS = [1.0, 8.0, 15.0, 22.0]
DURATION = 30.0


def noise(samples: int, seed: int) -> np.ndarray:
    """Pink noise (power falling as 1/f, shaped in the frequency domain), float32."""
    spectrum = np.fft.rfft(np.random.default_rng(seed).normal(0, 1, samples))
    frequencies = np.fft.rfftfreq(samples, 1 / SAMPLE_RATE)
    spectrum /= np.sqrt(np.maximum(frequencies, 20.0))
    return np.fft.irfft(spectrum, samples).astype(np.float32)


def music(samples: int, seed: int) -> np.ndarray:
    """A chord progression with harmonics and a beat: what a background score sounds like to a VAD."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SAMPLE_RATE
    out = np.zeros(samples, dtype=np.float64)
    chords = [(220.0, 277.2, 329.6), (196.0, 246.9, 293.7), (174.6, 220.0, 261.6), (164.8, 207.7, 246.9)]
    bar = 2.0
    for k in range(int(samples / SAMPLE_RATE / bar) + 1):
        first, last = int(k * bar * SAMPLE_RATE), min(samples, int((k + 1) * bar * SAMPLE_RATE))
        for note in chords[k % len(chords)]:
            for harmonic, weight in ((1, 1.0), (2, 0.4), (3, 0.2)):
                out[first:last] += weight * np.sin(2 * np.pi * note * harmonic * t[first:last])
    beat = np.zeros(samples)
    for position in range(0, samples, SAMPLE_RATE // 2):  # a drum every half second
        length = min(1600, samples - position)
        beat[position : position + length] += rng.normal(0, 1, length) * np.exp(-np.arange(length) / 300)
    return (out + 2.0 * beat).astype(np.float32)


def mixed(speech: np.ndarray, background: np.ndarray | None, snr_db: float | None) -> np.ndarray:
    """``speech`` with ``background`` at ``snr_db`` (power over the speech's loud part), as float32 in [-1, 1]."""
    clean = speech.astype(np.float32) / 32768
    if background is None or snr_db is None:
        return clean
    loud = clean[np.abs(clean) > 1e-4]
    speech_power = float(np.mean(loud**2)) if loud.size else 1e-6
    scale = np.sqrt(speech_power / (float(np.mean(background**2)) * 10 ** (snr_db / 10)))
    out = clean + scale * background
    return (out / max(1.0, float(np.abs(out).max()))).astype(np.float32)


def tracks(voices: list[str], speeds: list[int]) -> list[dict]:
    from pipeline.media.voice import speech_track

    out = []
    for v, voice in enumerate(voices):
        for s, speed in enumerate(speeds):
            first = (4 * (v * len(speeds) + s)) % len(SENTENCES)
            texts = [SENTENCES[(first + k) % len(SENTENCES)] for k in range(4)]
            track = speech_track(texts, STARTS, DURATION, voice=voice, longest=6.5, words_per_minute=speed)
            out.append({"voice": voice, "speed": speed, "track": track})
    return out


CONDITIONS = [("clean", None, None), ("noise", "noise", 10.0), ("noise", "noise", 0.0), ("music", "music", 10.0),
              ("music", "music", 0.0)]  # fmt: skip


def child(kind: str, voices: list[str], speeds: list[int], threads: int) -> dict:
    """Run one transcriber over every track and condition in this process; return its figures."""
    from pipeline.config import Settings
    from pipeline.media import speech

    options = speech.SpeechOptions.from_settings(Settings())
    made = tracks(voices, speeds)
    backgrounds = {"noise": noise(int(DURATION * SAMPLE_RATE), 7), "music": music(int(DURATION * SAMPLE_RATE), 11)}
    speech.detect_speech(made[0]["track"].samples, options)  # torch and the VAD in memory: the baseline
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind == "whisper":
        from pipeline.engines import whisper

        asr = whisper.WhisperTranscriber(whisper.BUNDLED, "cpu", "int8", threads)
        asr.load()

        def transcribe(audio: np.ndarray, utterances: list[tuple[float, float]]) -> list[tuple[str, list]]:
            return [
                (h.text, [(w.text, w.start) for w in h.words]) for h in asr.transcribe(audio, 0.0, utterances, None)
            ]
    else:
        import torch

        from pipeline import prompts
        from pipeline.engines.omni import OmniEngine

        torch.set_num_threads(threads)
        settings = Settings(model="tiny", transcript_max_new_tokens=64)
        engine = OmniEngine(settings)
        engine.load()

        def transcribe(audio: np.ndarray, utterances: list[tuple[float, float]]) -> list[tuple[str, list]]:
            requests = []
            for start, end in utterances:
                clip = audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
                tokens = prompts.transcript_tokens(end - start, settings.transcript_max_new_tokens)
                requests.append(prompts.transcript_request(clip, "en", tokens))
            return [(answer.text, []) for answer in engine.generate(requests)] if requests else []

    rows = []
    for name, background, snr in CONDITIONS:
        errors = words = 0
        onsets: list[float] = []
        aligned: list[float] = []  # the reference text aligned by Whisper: how omni transcripts get word times
        cpu = audio_seconds = 0.0
        for item in made:
            track = item["track"]
            audio = mixed(track.samples, backgrounds.get(background or ""), snr)
            samples16 = (audio * 32767).astype(np.int16)
            spans = speech.detect_speech(samples16, options)
            utterances = speech.utterances(spans, samples16, DURATION, options)
            started = time.process_time()
            heard = transcribe(audio, utterances)
            cpu += time.process_time() - started
            audio_seconds += DURATION
            reference = evaluation.normalise(" ".join(track.texts))
            hypothesis = evaluation.normalise(" ".join(text for text, _ in heard))
            alignment = evaluation.align(reference, hypothesis)
            errors += alignment.errors
            words += len(reference)
            truth = [w for sentence in track.words for w in sentence]
            onsets += evaluation.onset_errors(truth, [w for _, timed in heard for w in timed])
            if kind == "whisper":
                segments = [(a - 0.05, b + 0.05, text) for (a, b), text in zip(track.spans, track.texts, strict=True)]
                timed = [(w.text, w.start) for words in asr.align(audio, 0.0, segments, "en") for w in words]
                aligned += evaluation.onset_errors(truth, timed)
        rows.append({
            "condition": name if snr is None else f"{name} {snr:g} dB",
            "wer": errors / max(1, words),
            "onset_median_ms": 1000 * statistics.median(onsets) if onsets else None,
            "onset_p95_ms": 1000 * float(np.percentile(onsets, 95)) if onsets else None,
            "rtf_per_core": cpu / audio_seconds,
            "aligned_ms": [1000 * statistics.median(aligned), 1000 * float(np.percentile(aligned, 95))] if aligned
            else None,
        })  # fmt: skip
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "kind": kind,
        "rows": rows,
        "peak_rss_mib": peak_mib,
        "added_mib": peak_mib - baseline_mib,
        "tracks": len(made),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voices", type=int, default=3, help=f"how many of {', '.join(VOICES)}")
    parser.add_argument("--speeds", default="140,175,210", help="words per minute, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("whisper", "omni"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    voices, speeds = VOICES[: args.voices], [int(s) for s in args.speeds.split(",")]
    if args.child:
        print(json.dumps(child(args.child, voices, speeds, args.threads)))
        return
    results = {}
    for kind in ("whisper", "omni"):  # each in a fresh process: its own peak RSS
        command = [sys.executable, __file__, "--child", kind, "--voices", str(args.voices), "--speeds", args.speeds,
                   "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=True, env=os.environ)
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    count = results["whisper"]["tracks"]
    print(f"{count} tracks of {DURATION:.0f} s ({len(voices)} voices x {len(speeds)} speeds: {', '.join(voices)}; "
          f"{args.speeds} words/min), 4 sentences each; {args.threads} threads")  # fmt: skip
    print("| condition | Whisper tiny.en WER | onset median / p95 (ms) | RTF per core | Qwen3-Omni tiny RTF per core "
          "| forced alignment of the true text: onset median / p95 (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for mine, theirs in zip(results["whisper"]["rows"], results["omni"]["rows"], strict=True):
        onset = (f"{mine['onset_median_ms']:.0f} / {mine['onset_p95_ms']:.0f}"
                 if mine["onset_median_ms"] is not None else "-")  # fmt: skip
        print(f"| {mine['condition']} | {100 * mine['wer']:.1f} % | {onset} | {mine['rtf_per_core']:.3f} | "
              f"{theirs['rtf_per_core']:.3f} ({theirs['rtf_per_core'] / mine['rtf_per_core']:.2f}x; "
              f"WER {100 * theirs['wer']:.0f} %, random weights) | "
              f"{mine['aligned_ms'][0]:.0f} / {mine['aligned_ms'][1]:.0f} |")  # fmt: skip
    mine, theirs = results["whisper"], results["omni"]
    print(
        f"peak RSS: Whisper tiny.en {mine['peak_rss_mib']:.0f} MiB (+{mine['added_mib']:.0f} MiB over torch and "
        f"Silero VAD), Qwen3-Omni tiny {theirs['peak_rss_mib']:.0f} MiB (+{theirs['added_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
