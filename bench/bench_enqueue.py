"""Bulk enqueue of an S3 prefix: omniq's producer against the naive loop, same servers, same process.

Starts a throwaway redis-server and SeaweedFS S3 server on 127.0.0.1 (tests/servers.py), fills a bucket
with N small objects, then times:

- ``omniq``: ``workers.producer.enqueue(["s3://bucket/media/"])`` for all N objects (fingerprints from the
  listing, one Redis round trip per 500 jobs, one broker connection);
- ``naive``: per object a HEAD, a job-state lookup and a publish, as a simple script would do it
  (run on the first 1,000 objects and compared per object).

Usage: python bench/bench_enqueue.py [--objects 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import RedisServer, S3Server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--naive-objects", type=int, default=1_000)
    args = parser.parse_args()
    with RedisServer() as redis_server, S3Server() as s3:
        os.environ.update(
            {
                "OMNIQ_BROKER_URL": redis_server.url,
                "OMNIQ_S3_ENDPOINT_URL": s3.endpoint_url,
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "OMNIQ_STORAGE_URL": "s3://results/omniq",
            }
        )
        from pipeline import job
        from pipeline.config import Settings
        from pipeline.storage import open_storage
        from workers.producer import enqueue
        from workers.state import JobState
        from workers.tasks import ingest

        s3.create_bucket("library")
        s3.create_bucket("results")
        client = s3.client()
        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda i: client.put_object(Bucket="library", Key=f"media/{i:06d}.mp4", Body=b"%d" % i),
                    range(args.objects),
                )
            )
        print(f"filled {args.objects} objects in {time.perf_counter() - started:.1f} s")

        settings = Settings()
        storage = open_storage(settings.storage_url, settings)
        state = JobState.from_url(settings.broker_url)

        started = time.perf_counter()
        outcomes = enqueue(["s3://library/media/"], settings, storage, state)
        ours = time.perf_counter() - started
        assert sum(o.status == "enqueued" for o in outcomes) == args.objects

        state.redis.flushdb()
        started = time.perf_counter()
        for i in range(args.naive_objects):
            spec = job.make_spec(f"s3://library/media/{i:06d}.mp4", settings)  # one HEAD per object
            job.finished_manifest(storage, spec.media_id, settings.config_hash())  # one store lookup per object
            state.create(spec.job_id, spec.source, spec.media_id, spec.to_dict())
            ingest.apply_async(kwargs={"job_id": spec.job_id, "source": spec.source, "spec": spec.to_dict()})
        naive = time.perf_counter() - started
        ours_per = ours / args.objects
        naive_per = naive / args.naive_objects
        print(f"omniq enqueue: {args.objects} objects in {ours:6.2f} s  ({ours_per * 1e3:.2f} ms/object)")
        print(f"naive loop:    {args.naive_objects} objects in {naive:6.2f} s  ({naive_per * 1e3:.2f} ms/object)")
        estimate = naive_per * args.objects
        print(f"omniq is {naive_per / ours_per:.1f}x faster per object; naive for {args.objects}: ~{estimate:.0f} s")


if __name__ == "__main__":
    main()
