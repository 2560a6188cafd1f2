"""``omniq delete``: take media back out — its results, its work files, its search entries and its job records.

A media is named by its media id or by its source (as ``omniq view`` finds it), or all media of a ``--tag``.
While a job for it is queued or running the media is refused (cancel the job first): a finishing job would
write its results again. With Redis unreachable (a machine that only runs ``omniq run``) there is no queue to
ask, which is said, and the store and index are still cleaned.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.config import Settings
from pipeline.errors import ConfigError, OmniqError, SourceNotFound
from pipeline.sources import display_source
from pipeline.spec import get_json, results_prefix, work_prefix
from pipeline.storage import Storage, open_storage


def add_commands(commands: Any) -> None:
    delete = commands.add_parser(
        "delete",
        help="remove media: results, work files, search entries and job records (by media id, source or --tag)",
        description="Reads OMNIQ_STORAGE_URL (or --out) and OMNIQ_BROKER_URL. Refuses media whose job is still "
        "queued or running (omniq cancel it first). Asks before deleting unless --yes.",
    )
    delete.add_argument("targets", nargs="*", metavar="MEDIA_ID_OR_SOURCE", help="media ids, files or s3:// URIs")
    delete.add_argument("--tag", help="every media whose results carry this tag (from enqueue/run --tag)")
    delete.add_argument("--out", help="the store the results are in (default: OMNIQ_STORAGE_URL)")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask (needed when not on a terminal)")
    delete.set_defaults(func=cmd_delete)


@dataclass
class Doomed:
    """A media to remove: where its results are and which jobs made it."""

    media_id: str
    source: str
    job_ids: set[str] = field(default_factory=set)


def cmd_delete(args: argparse.Namespace) -> int:
    from workers.cli.view import find_media_id

    if not args.targets and not args.tag:
        raise ConfigError("name what to delete: media ids, files or s3:// URIs, or --tag TAG")
    settings = Settings()
    if args.out:
        settings = settings.model_copy(update={"storage_url": args.out})
    storage = open_storage(settings.storage_url, settings)
    code = 0
    found: dict[str, Doomed] = {}
    for target in args.targets:
        try:
            media_id = find_media_id(target, storage, settings)
        except SourceNotFound as error:
            print(f"omniq: {error}", file=sys.stderr)
            code = 1
            continue
        found.setdefault(media_id, _doomed(storage, media_id))
    if args.tag:
        tagged = tagged_media(storage, args.tag)
        if not tagged:
            print(f"omniq: no results with the tag {args.tag!r} in {storage.url}", file=sys.stderr)
            code = 1
        for media_id in tagged:
            found.setdefault(media_id, _doomed(storage, media_id))
    if not found:
        return code or 1
    state = _reachable_state(settings)
    if state is not None:
        code |= _refuse_running(state, found)
    if not found:
        return code
    if not args.yes and not _confirm(found, storage):
        return code or 1
    index = _index_or_none(settings)
    for doomed in found.values():
        files = remove_media(storage, doomed, index)
        if state is not None:
            state.forget(sorted(doomed.job_ids), doomed.media_id, doomed.source)
        print(f"deleted {doomed.media_id}  {display_source(doomed.source)}  ({files} files)")
    return code


def _doomed(storage: Storage, media_id: str) -> Doomed:
    try:
        manifest = get_json(storage, f"{results_prefix(media_id)}/manifest.json")
    except (OmniqError, ValueError):
        manifest = {}
    doomed = Doomed(media_id, str(manifest.get("source") or ""))
    if manifest.get("job_id"):
        doomed.job_ids.add(str(manifest["job_id"]))
    return doomed


def tagged_media(storage: Storage, tag: str) -> list[str]:
    """Media ids whose manifest carries ``tag`` (one listing, one read per manifest)."""
    found = []
    for key in storage.list_keys("results"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json":
            try:
                if get_json(storage, key).get("tag") == tag:
                    found.append(parts[1])
            except (OmniqError, ValueError):
                continue
    return found


def _reachable_state(settings: Settings) -> Any:
    from pipeline.config import redacted
    from workers.state import JobState

    state = JobState.from_url(settings.broker_url, retry_seconds=0)
    try:
        state.redis.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        print(
            f"omniq: note: no Redis at {redacted(settings.broker_url)} ({error}); not checking for running jobs, "
            "and no job records to remove",
            file=sys.stderr,
        )
        return None
    return state


def _refuse_running(state: Any, found: dict[str, Doomed]) -> int:
    """Drop (and name) media whose job is queued or running; add the job ids Redis knows to the rest."""
    from workers.state import ACTIVE

    code = 0
    for media_id in list(found):
        jobs = state.jobs_of_media(media_id)
        found[media_id].job_ids.update(jobs)
        running = [job_id for job_id, status in jobs.items() if status in ACTIVE]
        if running:
            print(
                f"omniq: {media_id} ({display_source(found[media_id].source)}): job {running[0]} is "
                f"{jobs[running[0]]}; cancel it first (omniq cancel {running[0]}) or wait for it to end",
                file=sys.stderr,
            )
            del found[media_id]
            code = 1
    return code


def _confirm(found: dict[str, Doomed], storage: Storage) -> bool:
    if not sys.stdin.isatty():
        print("omniq: not deleting without --yes (not on a terminal to ask)", file=sys.stderr)
        return False
    for doomed in found.values():
        print(f"  {doomed.media_id}  {display_source(doomed.source)}")
    answer = input(f"Delete the results of these {len(found)} media from {storage.url}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _index_or_none(settings: Settings) -> Any:
    from pipeline.search import open_index

    try:
        return open_index(settings.index_url, settings, create=False)
    except OmniqError as error:  # no index yet (or unreadable): nothing to remove from it
        print(f"omniq: note: search index not updated ({error})", file=sys.stderr)
        return None


def remove_media(storage: Storage, doomed: Doomed, index: Any) -> int:
    """Remove a media's search entries, results and work files; returns how many files were removed.

    The index goes first and the manifest last, so an interrupted delete is found and finished by running
    it again (the media is still named by its manifest)."""
    if index is not None:
        index.remove_media(doomed.media_id)
    files = sum(storage.delete_prefix(work_prefix(job_id)) for job_id in sorted(doomed.job_ids))
    prefix = results_prefix(doomed.media_id)
    manifest = f"{prefix}/manifest.json"
    for key in list(storage.list_keys(prefix)):
        if key != manifest:
            storage.delete(key)
            files += 1
    if storage.exists(manifest):
        storage.delete(manifest)
        files += 1
    storage.delete_prefix(prefix)  # empty folders of a local store
    return files
