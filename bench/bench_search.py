"""Search at library scale: SQLite FTS5 and PostgreSQL side by side on the same synthetic library.

Writes the results of ``--media`` synthetic media (50 entries each: 100 000 entries for the default 2 000) to a
local store, rebuilds both indexes from it (``rebuild_index``, as ``omniq index rebuild`` does), then runs the
same queries against each and prints p50/p95 query latency and the rebuild rate. PostgreSQL is a throwaway
server on 127.0.0.1 (tests/servers.py) unless ``--postgres-url`` names one. Goal: p95 <= 50 ms on PostgreSQL.

    .venv/bin/python bench/bench_search.py [--media 2000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.search import SQLiteIndex, rebuild_index
from pipeline.search.postgres import PostgresIndex
from pipeline.storage import LocalStorage

# A vocabulary like speech's: a few hundred very common words and a long tail (Zipf, s = 1.1), 20 000 words.
COMMON = (
    "rocket launch engine fuel orbit crew mission countdown weather storm river bridge city market music "
    "guitar drums crowd stadium goal referee coach season election vote debate budget school teacher student "
    "garden flower harvest kitchen recipe bread coffee train station airport flight ocean island beach wave "
    "forest mountain snow winter summer camera studio interview history museum painting festival parade"
).split()
SYLLABLES = "ka lo mi ner sa tu vo ri den fal gor hem jun pat quin sel tor ul wen yar zi bri cho dra".split()
GERMAN = "Rakete Start Motor Wetter Brücke Stadt Markt Musik Schule Garten Küche Brot Kaffee Bahnhof Meer".split()


def vocabulary(size: int = 20_000, seed: int = 3) -> tuple[list[str], list[float]]:
    rng = random.Random(seed)
    words = list(COMMON)
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(size)]
    return words, weights


WORDS, WEIGHTS = vocabulary()


def sentence(rng: random.Random, extra: list[str] | None = None) -> str:
    words = rng.choices(WORDS, WEIGHTS, k=rng.randint(6, 14))
    if extra:
        words += rng.sample(extra, 2)
    return " ".join(words)


def write_library(storage: LocalStorage, media: int, seed: int = 7) -> None:
    """``media`` results in the README's format: 40 transcript segments, 8 captions, 1 + 1 summaries each."""
    rng = random.Random(seed)
    for index in range(media):
        media_id = f"{index:020x}"
        language, words = ("de", GERMAN) if index % 10 == 0 else ("en", None)
        prefix = f"results/{media_id}"
        segments = [{"start": 5.0 * i, "end": 5.0 * i + 4.0, "text": sentence(rng, words)} for i in range(40)]
        chunks = [{"index": i, "start": 25.0 * i, "end": 25.0 * (i + 1)} for i in range(8)]
        captions = [c | {"visual": sentence(rng, words), "audio": sentence(rng, words)} for c in chunks]
        documents = {
            "transcript.json": {"language": language, "segments": segments},
            "captions.json": {"chunks": captions},
            "summary.json": {
                "summary": sentence(rng, words),
                "chunks": [chunks[0] | {"summary": sentence(rng, words)}],
            },
            "manifest.json": {
                "status": "done", "media_id": media_id, "job_id": f"{media_id}-0000000000", "language": language,
                "source": f"s3://library/shows/{index:06d}.mp4", "tag": f"season-{index % 5}", "duration_s": 200.0,
            },
        }  # fmt: skip
        for name, document in documents.items():
            storage.put_bytes(f"{prefix}/{name}", json.dumps(document).encode(), if_changed=False)


def queries(count: int, seed: int = 11) -> list[str]:
    """One to three words as people search: content words (ranks 100 to 5 000), not the most frequent ones
    (in speech those are function words, which the language configurations drop as stop words)."""
    rng = random.Random(seed)
    pool = WORDS[100:5000]
    return [" ".join(rng.sample(pool, rng.randint(1, 3))) for _ in range(count)]


def latencies(index: object, texts: list[str]) -> list[float]:
    for text in texts[:10]:  # warm up caches and connections
        index.search(text, 10)  # type: ignore[attr-defined]
    found = []
    for text in texts:
        started = time.perf_counter()
        index.search(text, 10)  # type: ignore[attr-defined]
        found.append((time.perf_counter() - started) * 1000)
    return found


def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(share * 100) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=int, default=2000, help="synthetic media, 50 entries each (default 2000)")
    parser.add_argument("--queries", type=int, default=200, help="queries per backend (default 200)")
    parser.add_argument("--postgres-url", help="an existing database (default: a throwaway server)")
    args = parser.parse_args()
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="omniq-bench-search-")))
        storage = LocalStorage(directory / "store")
        started = time.perf_counter()
        write_library(storage, args.media)
        print(f"wrote {args.media} media ({args.media * 50} entries) in {time.perf_counter() - started:.1f} s")
        url = args.postgres_url
        if url is None:
            from tests.servers import PostgresServer

            url = stack.enter_context(PostgresServer()).url
        backends = {
            "sqlite": stack.enter_context(SQLiteIndex(directory / "index.sqlite")),
            "postgres": stack.enter_context(PostgresIndex(url)),
        }
        texts = queries(args.queries)
        rows = {}
        for name, index in backends.items():
            started = time.perf_counter()
            media, entries = rebuild_index(storage, index)
            seconds = time.perf_counter() - started
            measured = latencies(index, texts)
            rows[name] = (media, entries, seconds, measured)
        print(f"{'backend':<10} {'entries':>8} {'rebuild':>12} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
        for name, (media, entries, seconds, measured) in rows.items():
            rate = f"{media / seconds:.0f} media/s"
            print(
                f"{name:<10} {entries:>8} {rate:>12} {percentile(measured, 0.5):>8.1f} "
                f"{percentile(measured, 0.95):>8.1f} {max(measured):>8.1f}"
            )
        p95 = percentile(rows["postgres"][3], 0.95)
        ratio = p95 / percentile(rows["sqlite"][3], 0.95)
        print(
            f"postgres p95 / sqlite p95: {ratio:.2f}x; "
            f"goal p95 <= 50 ms on PostgreSQL: {'met' if p95 <= 50 else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
