"""``omniq status``, ``cancel``, ``retry`` and ``recover``: looking after jobs in the queue."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any

from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.sources import display_source


def add_commands(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show jobs: state, chunk progress, age, leases, retries",
        description="Reads OMNIQ_BROKER_URL (the Redis the workers use).",
    )
    status.add_argument("job_id", nargs="?", help="one job in detail (default: the newest jobs)")
    status.add_argument("--limit", type=int, default=50, help="how many of the newest jobs (default 50)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_status)

    cancel = commands.add_parser("cancel", help="cancel queued or running jobs and remove their work files")
    cancel.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    cancel.set_defaults(func=cmd_cancel)

    retry = commands.add_parser(
        "retry",
        help="run failed or cancelled jobs again with their original settings; a partial job runs only its failed rows",
    )
    retry.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    retry.add_argument("--failed", action="store_true", help="every failed and every partial job")
    retry.add_argument("--json", action="store_true")
    retry.set_defaults(func=cmd_retry)

    recover = commands.add_parser(
        "recover", help="rebuild job state from the store after Redis lost its data, and resend lost work"
    )
    recover.set_defaults(func=cmd_recover)

    events = commands.add_parser(
        "events",
        help="print job events (queued, progress, done, failed, ...) from the Redis stream omniq:events",
        description="Reads OMNIQ_BROKER_URL. Prints the newest events, then with --follow every new one as it "
        "comes (Ctrl-C stops). Systems downstream read the same stream with their own consumer group.",
    )
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events as they come")
    events.add_argument("--json", action="store_true", help="one JSON object per line (id, event, job_id, ...)")
    events.add_argument("--limit", type=int, default=50, help="how many of the newest events first (default 50)")
    events.add_argument("--since", metavar="ID", help="every event after this stream id instead (0: all kept)")
    events.add_argument("--job", metavar="JOB_ID", help="only this job's events")
    events.set_defaults(func=cmd_events)


def _state(settings: Settings):  # type: ignore[no-untyped-def]
    from workers.state import JobState

    return JobState.from_url(settings.broker_url)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def job_details(state: Any, settings: Settings, jobs: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Each job's row for ``omniq status``: its state plus, while active, age, last progress, the units
    that workers hold now, a pending retry, and which queue it waits on when no live worker serves it."""
    from workers.app import MEDIA_QUEUE, gpu_queue_for
    from workers.reliability.leases import Leases, holder_name
    from workers.reliability.watchdog import live_queues, load_views
    from workers.state import ACTIVE

    leases = Leases(state, settings.lease_seconds, settings.lease_renew_seconds)
    active = [job["job_id"] for job in jobs if job["status"] in ACTIVE]
    views = {view.job_id: view for view, _ in load_views(state, leases, active)} if active else {}
    served = live_queues(state.redis) if active else {}
    rows = []
    for job in jobs:
        row = {k: job[k] for k in ("job_id", "source", "status", "chunks_total", "chunks_done", "error", "failed_rows")}
        row |= {"age_s": None, "progress_age_s": None, "leases": {}, "retry": None, "waiting_for": None}
        view = views.get(job["job_id"])
        if view is not None:
            row["age_s"] = round(now - job["created_at"], 1)
            row["progress_age_s"] = round(now - job["updated_at"], 1)
            row["leases"] = {u.name: holder_name(u.holder) for u in view.units.values() if u.holder}
            if job["retry_at"]:
                row["retry"] = {"reason": job["retry_reason"], "at": job["retry_at"]}
            gpu = job["status"] in ("running", "summarizing")
            queue = gpu_queue_for(job["model"] or settings.model) if gpu else MEDIA_QUEUE
            if not served.get(queue):
                who = f"a GPU worker started with OMNIQ_MODEL={job['model']}" if gpu else "a media worker"
                row["waiting_for"] = f"no live worker serves queue {queue}: start {who}"
        rows.append(row)
    return rows


def _status_line(row: dict[str, Any]) -> str:
    error = f"  {row['error']}" if row["error"] else ""
    progress = f"{row['chunks_done']}/{row['chunks_total']} chunks"
    if row.get("status") == "partial":
        progress += f", {row['failed_rows']} rows failed (omniq retry {row['job_id']})"
    line = f"{row['job_id']}  {row['status']:<11} {progress}  {display_source(row['source'])}{error}"
    if row["age_s"] is None:
        return line
    notes = [f"age {_ago(row['age_s'])}", f"last progress {_ago(row['progress_age_s'])} ago"]
    held = row["leases"]
    notes.append("held: " + ", ".join(f"{unit} by {who}" for unit, who in held.items()) if held else "no lease held")
    if row["retry"]:
        at = datetime.fromtimestamp(row["retry"]["at"]).strftime("%H:%M:%S")
        notes.append(f"retrying: {row['retry']['reason']} (next attempt {at})")
    if row["waiting_for"]:
        notes.append(row["waiting_for"])
    return line + "\n    " + " · ".join(notes)


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings()
    state = _state(settings)
    if args.job_id:
        job = state.get(args.job_id)
        if job is None:
            from pipeline.config import redacted

            print(f"omniq: no job {args.job_id!r} in {redacted(settings.broker_url)}; check the id", file=sys.stderr)
            return 1
        jobs = [job]
    else:
        jobs = state.recent(args.limit)
    rows = job_details(state, settings, jobs, time.time())
    if args.json:
        print(json.dumps(rows[0] if args.job_id else rows, indent=2))
        return 0
    for row in rows:
        print(_status_line(row))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from pipeline.spec import work_prefix
    from pipeline.storage import open_storage
    from workers.reliability.restore import record_cancelled

    settings = Settings()
    state = _state(settings)
    storage = open_storage(settings.storage_url, settings)
    code = 0
    for job_id in args.job_ids:
        status = state.status(job_id)
        if status is None:
            print(f"omniq: no job {job_id!r}; check the id (omniq status lists jobs)", file=sys.stderr)
            code = 1
        elif not state.finish(job_id, "cancelled", error="cancelled by the user"):
            print(f"omniq: job {job_id} is {status}, not queued or running: nothing to cancel", file=sys.stderr)
            code = 1
        else:
            removed = storage.delete_prefix(work_prefix(job_id))  # a step still running removes what it writes
            record_cancelled(storage, job_id, (state.spec(job_id) or {}).get("run_id"))
            print(f"cancelled {job_id} (was {status}; {removed} work files removed)")
    return code


def cmd_retry(args: argparse.Namespace) -> int:
    from pipeline.errors import MalformedMessage
    from pipeline.spec import JobSpec, settings_for
    from pipeline.storage import open_storage
    from workers.producer import enqueue

    settings = Settings()
    state = _state(settings)
    if not args.job_ids and not args.failed:
        raise ConfigError(
            "name the jobs to run again (omniq retry JOB_ID...), or give --failed for every failed and partial job"
        )
    job_ids = list(args.job_ids) or state.failed_ids()
    storage = open_storage(settings.storage_url, settings)
    code, outcomes = 0, []
    for job_id in job_ids:
        status, spec = state.status(job_id), state.spec(job_id)
        if status not in ("failed", "partial", "cancelled") or spec is None:
            why = "unknown" if status is None else status
            print(
                f"omniq: job {job_id} is {why}: only failed, partial or cancelled jobs can be retried", file=sys.stderr
            )
            code = 1
            continue
        # the job's own output-shaping settings (model included), as when it was first enqueued; only those,
        # validated: a job record is input (README "Security")
        try:
            job_settings = settings_for(JobSpec.from_dict(spec), settings)
        except MalformedMessage as error:
            print(f"omniq: job {job_id} cannot be retried: its record in Redis is malformed ({error})", file=sys.stderr)
            code = 1
            continue
        # a partial job keeps its chunk packs and good rows: its new run reruns only the failed rows (not forced,
        # which would start from nothing); a failed or cancelled job starts again
        outcome = enqueue(
            [spec["source"]],
            job_settings,
            storage,
            state,
            force=status != "partial",
            tag=spec.get("tag"),
            priority=spec["priority"],
        )[0]
        outcomes.append(outcome.to_dict())
        if not args.json:
            detail = f" ({outcome.reason})" if outcome.reason else ""
            print(f"{outcome.status:<9} {outcome.job_id or job_id}  {display_source(outcome.source)}{detail}")
        if outcome.status != "enqueued":
            code = 1
    if args.json:
        print(json.dumps(outcomes, indent=2))
    return code


def cmd_recover(args: argparse.Namespace) -> int:
    from pipeline.storage import open_storage
    from workers.reliability.leases import Leases
    from workers.reliability.restore import restore_from_store
    from workers.reliability.watchdog import EPOCH, Watchdog

    settings = Settings()
    state = _state(settings)
    storage = open_storage(settings.storage_url, settings)
    restored = restore_from_store(storage, state, settings)
    state.redis.set(EPOCH, str(time.time()))
    sweep = Watchdog(state, Leases(state, settings.lease_seconds, settings.lease_renew_seconds), settings).sweep(
        force=True
    )
    print("from the store: " + (", ".join(f"{k} {v}" for k, v in sorted(restored.items())) or "nothing to restore"))
    print("stalled work sent again: " + str((sweep or {}).get("resent", 0)))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from workers.job_events import follow, last_events, read_events

    settings = Settings()
    client = _state(settings).redis
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give a positive number of events")
    shown = read_events(client, args.since, count=100_000) if args.since else last_events(client, args.limit)
    after = shown[-1].id if shown else (args.since or _last_id(client))
    try:
        for event in shown:
            _print_event(event, args)
        if args.follow:
            for event in follow(client, after):
                _print_event(event, args)
    except KeyboardInterrupt:
        pass
    return 0


def _last_id(client: Any) -> str:
    from workers.state import EVENTS

    newest = client.xrevrange(EVENTS, count=1)
    return newest[0][0] if newest else "0-0"


def _print_event(event: Any, args: argparse.Namespace) -> None:
    if args.job and event.job_id != args.job:
        return
    if args.json:
        print(json.dumps(event.to_dict()), flush=True)
        return
    when = datetime.fromtimestamp(event.at).strftime("%Y-%m-%d %H:%M:%S")
    detail = ""
    if event.event == "progress":
        detail = f"  chunks {event.chunks_done}/{event.chunks_total}"
    elif event.error:
        detail = f"  {event.error}"
    tag = f"  [{event.tag}]" if event.tag else ""
    print(f"{when}  {event.event:<11} {event.job_id}  {display_source(event.source)}{tag}{detail}", flush=True)
