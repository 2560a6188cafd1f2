"""The ``omniq`` command: run files in-process, or enqueue them for Celery workers and watch them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import failpoints
from pipeline.config import Settings, redacted
from pipeline.errors import ConfigError, OmniqError
from pipeline.sources import display_source

log = logging.getLogger("omniq")

# Exit statuses of every command (README, "Exit statuses"); 5: ``run`` finished some files only partially
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_REDIS, EXIT_NO_STORAGE, EXIT_PARTIAL = 0, 1, 2, 3, 4, 5


def _settings(args: argparse.Namespace) -> Settings:
    """The environment's settings with the command line's on top (validated as the environment's are)."""
    overrides: dict[str, object] = {}
    for name in ("model", "engine", "chunk_seconds", "fps", "batch_size", "language", "transcriber", "whisper_model"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides) if overrides else Settings()  # type: ignore[arg-type]


def check_transcriber(settings: Settings, *, load: bool = True) -> None:
    """Refuse a Whisper model that is not there (it transcribes, or aligns Qwen3-Omni's words), or an English-only
    one asked to transcribe another language, before any job starts. ``load``: the model must be found on this
    machine (not so for a producer: its workers load it).
    """
    from pipeline.engines import whisper

    uses_whisper = settings.transcriber_name == "whisper"
    if load and (uses_whisper or settings.align_words):  # it also times the words of Qwen3-Omni's transcripts
        whisper.model_location(settings.whisper_model)
    if uses_whisper:
        whisper.check_language(settings.whisper_model, settings.language)


def check_embedding(settings: Settings) -> None:
    """Refuse an ``OMNIQ_EMBEDDING_MODEL`` that is not a sentence-transformers model, before any work (the
    model itself loads when the first finished job is indexed)."""
    from pipeline.search import embedder_for

    embedder_for(settings.embedding_model)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.engines import check_engine, concurrent_engine
    from pipeline.job import JobOutcome, run_jobs
    from pipeline.search import open_index
    from pipeline.storage import open_storage

    settings = _settings(args).model_copy(update={"storage_url": args.out})
    failpoints.install(settings.failpoints)
    check_transcriber(settings)
    check_embedding(settings)
    check_engine(settings)
    storage = open_storage(args.out, settings)
    sources, rejected, ignored = _discover_for_run(args, settings)
    outcomes = [JobOutcome(d.uri, None, "failed", None, d.rejected) for d in rejected]
    for outcome in outcomes:
        if not args.json:
            print(_outcome_line(outcome), flush=True)
    engine = concurrent_engine(settings) if sources else None  # no model load for nothing to run
    if engine is not None:
        index = open_index(settings.index_url, settings)
        try:
            for outcome in run_jobs(sources, settings, storage, engine, index, force=args.force):
                outcomes.append(outcome)
                if not args.json:
                    print(_outcome_line(outcome), flush=True)
        finally:
            engine.close()
    if not args.json and ignored:
        print(_ignored_note(ignored).removeprefix(", "), file=sys.stderr)
    _list_ignored(ignored, args.verbose)
    if engine is not None and engine.random_weights and any(o.status in ("done", "partial") for o in outcomes):
        random = "the transcripts, captions and summaries are random text"
        if settings.transcriber_name == "whisper":
            random = (
                f"the captions and summaries are random text (Whisper {settings.whisper_model} wrote the transcripts)"
            )
        print(
            f"NOTE: --model tiny has random weights: {random}, useful only to check the pipeline. "
            "Use --model Qwen/Qwen3-Omni-30B-A3B-Instruct or a local path.",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([o.to_dict() for o in outcomes], indent=2))
    if not outcomes:
        raise ConfigError("nothing to run: the directories and prefixes given hold no media files")
    if any(o.status not in ("done", "skipped", "partial") for o in outcomes):
        return EXIT_FAILED
    return EXIT_PARTIAL if any(o.status == "partial" for o in outcomes) else EXIT_OK


def _discover_for_run(args: argparse.Namespace, settings: Settings) -> tuple[list[Any], list[Any], list[str]]:
    """What ``run`` takes, as ``enqueue`` does: files, directories, globs, S3 URIs and prefixes, --from-file."""
    from pipeline.discover import Filters, discover, read_list_file

    inputs = list(args.sources)
    for list_file in args.from_file or []:
        inputs.extend(read_list_file(Path(list_file)))
    if not inputs:
        raise ConfigError("nothing to run: give files, directories, s3:// URIs or --from-file LIST")
    filters = Filters(settings.media_extension_set(), tuple(args.include or ()), tuple(args.exclude or ()))
    ignored: list[str] = []
    found = list(discover(inputs, settings, filters, ignored))
    return [d.ref for d in found if d.ref is not None], [d for d in found if d.ref is None], ignored


def _outcome_line(outcome) -> str:  # type: ignore[no-untyped-def]
    source = display_source(outcome.source)
    manifest = outcome.manifest or {}
    if outcome.status == "done":
        return (
            f"done    {source} -> {outcome.result_uri} "
            f"({manifest.get('chunks')} chunks, {manifest.get('duration_s', 0):.1f} s of media, "
            f"{manifest.get('timings', {}).get('total_s', 0):.1f} s)\n"
            f"        view: {manifest.get('outputs', {}).get('index.html', outcome.result_uri + '/index.html')}"
        )
    if outcome.status == "partial":
        rows = manifest.get("rows") or {}
        return (
            f"partial {source} -> {outcome.result_uri} ({rows.get('failed')} of {rows.get('total')} rows failed, "
            "the rest is published; running it again reruns only those)\n"
            f"        {outcome.error}\n"
            f"        view: {manifest.get('outputs', {}).get('index.html', outcome.result_uri + '/index.html')}"
        )
    if outcome.status == "skipped":
        return f"skipped {source}: already done with these settings (--force runs it again) -> {outcome.result_uri}"
    return f"{outcome.status:<7} {source}: {outcome.error}"


def run_celery(app: Any, argv: list[str]) -> int:
    """Run Celery's command line and return its exit status: what ``app.worker_main`` does, but that drops the
    status, the only sign that Celery gave up (e.g. "Unrecoverable error" while Redis restarts)."""
    from celery.bin.celery import celery as command

    command.params[0].default = app
    try:
        return int(command.main(args=argv, standalone_mode=False) or 0)
    finally:
        command.params[0].default = None


def cmd_worker(args: argparse.Namespace) -> int:
    queues = ("media", "gpu")
    if args.queue not in queues:
        raise ConfigError(f"--queue {args.queue!r}: use 'media' (ffmpeg, CPU) or 'gpu' (the model)")
    if args.model:  # the worker's processes and threads read their settings from the environment
        os.environ["OMNIQ_MODEL"] = args.model
    if args.engine:
        os.environ["OMNIQ_ENGINE"] = args.engine
    # SIGTERM (docker stop, a deploy) runs Celery's cold shutdown, which waits OMNIQ_SOFT_SHUTDOWN_SECONDS for
    # running tasks and then hands their messages back at once; billiard reads this when celery is imported
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    if args.metrics_port is not None:
        # before anything imports prometheus_client: every pool process writes its values here
        directory = tempfile.mkdtemp(prefix="omniq-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from pipeline.engines import check_engine
    from workers.app import GPU_QUEUE, app, gpu_queue_for
    from workers.notify import check_target

    settings = Settings()
    failpoints.install(settings.failpoints)  # read once, here: the pool's processes inherit them
    check_target(settings)  # a half-set notification target stops the worker here, not silently later
    if args.queue == GPU_QUEUE:
        check_transcriber(settings)  # a Whisper model that is not there stops the worker here
        check_engine(settings)  # --engine vllm without vLLM, or a checkpoint it cannot serve, stops it here
    else:
        check_embedding(settings)  # the media worker indexes finished jobs: a bad embedding model stops it here
    if args.metrics_port is not None:
        from workers.metrics import merged_registry, serve_metrics

        auth = settings.metrics_basic_auth
        server = serve_metrics(
            args.metrics_host, args.metrics_port, merged_registry(), auth.get_secret_value() if auth else None
        )
        print(f"metrics: http://{args.metrics_host}:{server.server_address[1]}/metrics", file=sys.stderr, flush=True)
    queue = gpu_queue_for(settings.model) if args.queue == GPU_QUEUE else args.queue
    argv = ["worker", "--queues", queue, "--hostname", f"{args.queue}-{os.getpid()}@%h", "--task-events"]
    argv += ["--loglevel", "INFO" if args.verbose else "WARNING"]
    if args.queue == GPU_QUEUE:
        # One model per process, run in a thread of the pool: the main thread keeps sending heartbeats and
        # answering 'celery inspect' during a long batch (Flower shows the worker online), and nothing forks
        # after CUDA is initialised.
        app.conf.worker_pool = "workers.threads:HandBackThreadPool"  # the banner names the module: "(threads)"
        # several messages at once, each in its own thread: their rows share batches (the model itself runs in
        # one thread of the pipelined engine); each message is acknowledged after its results are stored
        from workers.tasks import gpu_slots

        argv += ["--concurrency", str(gpu_slots(settings))]
    else:
        argv += ["--pool", "prefork", "--concurrency", str(args.concurrency or os.cpu_count() or 1)]
    code = 0
    try:
        code = run_celery(app, argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:  # Celery gave up (e.g. kombu failing while Redis restarts): start again below
        logging.getLogger(__name__).exception("the worker stopped with an error")
        code = 1
    from workers.reliability.lifecycle import restart_requested, shutdown_requested, start_again

    if (
        restart_requested()
    ):  # a model call passed its deadline (workers.reliability.deadlines): a fresh process takes over
        start_again(code, "a model call passed its deadline")
    if code != 0 and not shutdown_requested():
        start_again(code, f"the worker stopped unexpectedly (exit status {code})")
    if args.queue == GPU_QUEUE:
        # a model call still running in the pool thread was handed back: do not wait for it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_flower(args: argparse.Namespace) -> int:
    settings = Settings()
    env = dict(os.environ)
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()  # not on the command line
    elif args.address not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            f"--address {args.address} exposes Flower beyond this machine: set OMNIQ_FLOWER_BASIC_AUTH=user:password"
        )
    command = [sys.executable, "-m", "celery", "--app", "workers.app:app", "flower"]
    command += [f"--address={args.address}", f"--port={args.port}", "--persistent=False"]
    if args.url_prefix:
        command.append(f"--url_prefix={args.url_prefix}")
    os.execve(sys.executable, command, env)  # noqa: S606 - replaces this process; no shell involved
    return 0  # not reached


def cmd_enqueue(args: argparse.Namespace) -> int:
    from collections import Counter

    from pipeline.discover import Filters, read_list_file
    from pipeline.storage import open_storage
    from workers.producer import enqueue
    from workers.state import JobState

    settings = _settings(args)
    check_transcriber(settings, load=False)  # the workers load the model; a bad combination stops here
    sources = list(args.sources)
    for list_file in args.from_file or []:
        sources.extend(read_list_file(Path(list_file)))
    if not sources:
        raise ConfigError("nothing to enqueue: give files, directories, s3:// URIs or --from-file LIST")
    filters = Filters(settings.media_extension_set(), tuple(args.include or ()), tuple(args.exclude or ()))
    bar = _progress_bar(enabled=not args.json and sys.stderr.isatty())
    ignored: list[str] = []
    outcomes = enqueue(
        sources,
        settings,
        open_storage(settings.storage_url, settings),
        JobState.from_url(settings.broker_url),
        force=args.force,
        tag=args.tag,
        priority=args.priority,
        filters=filters,
        progress=(lambda outcome: bar.update(1)) if bar else None,
        ignored=ignored,
    )
    if bar:
        bar.close()
    if args.json:
        print(json.dumps([o.to_dict() for o in outcomes], indent=2))
    else:
        for outcome in outcomes:
            detail = f" ({outcome.reason})" if outcome.reason else ""
            print(f"{outcome.status:<9} {outcome.job_id or '-'}  {display_source(outcome.source)}{detail}")
    counts = Counter(o.status for o in outcomes)
    reasons = Counter(o.reason for o in outcomes if o.status == "skipped")
    skipped = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    print(
        f"enqueued {counts['enqueued']}, skipped {counts['skipped']}{f' ({skipped})' if skipped else ''}, "
        f"rejected {counts['rejected']}{_ignored_note(ignored)}",
        file=sys.stderr,
    )
    for outcome in [o for o in outcomes if o.status == "rejected"][:20]:
        print(f"  rejected: {outcome.reason}", file=sys.stderr)
    _list_ignored(ignored, args.verbose)
    return 1 if counts["rejected"] else 0


def _ignored_note(ignored: list[str]) -> str:
    """``, ignored 2 non-media files (-v lists them)``: what the extension filter left out of directories."""
    if not ignored:
        return ""
    return f", ignored {len(ignored)} non-media file{'s' if len(ignored) != 1 else ''} (-v lists them)"


def _list_ignored(ignored: list[str], verbose: bool) -> None:
    if verbose:
        for path in ignored:
            print(f"  ignored: {display_source(path)}", file=sys.stderr)


def _progress_bar(enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc="listing and enqueueing", unit=" files", file=sys.stderr)


def cmd_sample(args: argparse.Namespace) -> int:
    from pipeline.media.sample import make_sample

    path = make_sample(
        Path(args.path), args.duration, video=not args.audio_only, audio=not args.video_only, sound=args.sound
    )
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(
        prog="omniq",
        description="Video and audio understanding with Qwen3-Omni. Settings come from OMNIQ_* variables "
        "(pipeline/config.py); the commands that use the queue read OMNIQ_BROKER_URL and OMNIQ_STORAGE_URL.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (also after the command)")
    parser.add_argument("--version", action="version", version=f"omniq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="process files in this process (no Redis needed)")
    _source_options(run)
    run.add_argument(
        "--out", default="./omniq-data", help="results directory or s3://bucket/prefix (default ./omniq-data)"
    )
    _model_options(run)
    _engine_option(run)
    run.add_argument("--json", action="store_true", help="print a JSON list of outcomes")
    run.set_defaults(func=cmd_run)

    worker = commands.add_parser(
        "worker",
        help="start a Celery worker for one queue",
        description="Reads OMNIQ_BROKER_URL (Redis), OMNIQ_STORAGE_URL (and OMNIQ_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY for S3) and OMNIQ_MODEL; every other OMNIQ_* setting is in pipeline/config.py.",
    )
    worker.add_argument("--queue", required=True, help="media (ffmpeg, CPU) or gpu (the model)")
    worker.add_argument("--model", help="hub id, local checkpoint path, or 'tiny' (default: OMNIQ_MODEL)")
    _engine_option(worker)
    worker.add_argument("--concurrency", type=int, help="processes for the media queue (default: CPU count)")
    worker.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free port)")
    worker.add_argument("--metrics-host", default="127.0.0.1", help="address for metrics (default 127.0.0.1)")
    worker.set_defaults(func=cmd_worker)

    flower = commands.add_parser("flower", help="start Flower for omniq's Celery app")
    flower.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    flower.add_argument("--port", type=int, default=5555, help="port (default 5555)")
    flower.add_argument("--url-prefix", dest="url_prefix", help="when served behind a reverse proxy path")
    flower.set_defaults(func=cmd_flower)

    enqueue = commands.add_parser(
        "enqueue",
        help="enqueue files, directories or S3 prefixes; prints job ids",
        description="Reads OMNIQ_BROKER_URL (Redis) and OMNIQ_STORAGE_URL (and OMNIQ_S3_ENDPOINT_URL, AWS_* for "
        "S3); the workers must use the same. Files already done with the same content and settings are skipped.",
    )
    _source_options(enqueue)
    enqueue.add_argument("--tag", help="a label for this run, kept in manifests and the search index")
    enqueue.add_argument("--priority", type=int, default=5, choices=range(10), metavar="0-9", help="9 = most urgent")
    enqueue.add_argument("--json", action="store_true", help="print a JSON list of {source, job_id, status, reason}")
    _model_options(enqueue)
    enqueue.set_defaults(func=cmd_enqueue)

    from workers.cli.delete import add_commands as add_delete_commands
    from workers.cli.jobs import add_commands as add_job_commands

    add_job_commands(commands)
    add_delete_commands(commands)

    from workers.cli.search import add_commands as add_search_commands
    from workers.cli.triggers import add_commands as add_trigger_commands
    from workers.cli.view import add_commands as add_view_commands

    add_search_commands(commands)
    add_trigger_commands(commands)
    add_view_commands(commands)

    sample = commands.add_parser("sample", help="write a generated sample file (test pattern, speech, silences)")
    sample.add_argument("path")
    sample.add_argument("--duration", type=float, default=20.0, help="seconds (default 20)")
    sample.add_argument(
        "--sound",
        choices=("speech", "tone"),
        default="speech",
        help="a spoken sentence (espeak-ng) or a 440 Hz tone every 5 s, then silence (default speech)",
    )
    only = sample.add_mutually_exclusive_group()
    only.add_argument("--audio-only", action="store_true")
    only.add_argument("--video-only", action="store_true")
    sample.set_defaults(func=cmd_sample)
    _verbose_everywhere(parser)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-v`` also after the command (``omniq run x.mp4 -v``), for every command and action."""
    for action in parser._actions:  # argparse keeps subcommands in a private action type
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more")
                _verbose_everywhere(command)


def _source_options(parser: argparse.ArgumentParser) -> None:
    """What ``run`` and ``enqueue`` both take: the same sources, the same filters, the same --force."""
    parser.add_argument("sources", nargs="*", metavar="FILE_DIR_OR_URI", help="files, directories, globs, s3:// URIs")
    parser.add_argument("--from-file", action="append", metavar="LIST", help="one URI per line, or JSONL with 'uri'")
    parser.add_argument("--include", action="append", metavar="GLOB", help="only these names in dirs/prefixes")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="skip these names in dirs/prefixes")
    parser.add_argument("--force", action="store_true", help="run again even if already done with these settings")


def _engine_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        help="what runs Qwen3-Omni: transformers (default) or vllm, from the environment 'make vllm' builds "
        '(OMNIQ_ENGINE; README "Engines")',
    )


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, local checkpoint path, or 'tiny' (random test model)")
    parser.add_argument(
        "--chunk-seconds", type=float, dest="chunk_seconds", help="chunk length (default 30, OMNIQ_CHUNK_SECONDS)"
    )
    parser.add_argument("--fps", type=float, help="frames sampled per second (default 2, OMNIQ_FPS)")
    parser.add_argument(
        "--batch-size", type=int, dest="batch_size", help="rows per generate call (default 4, OMNIQ_BATCH_SIZE)"
    )
    parser.add_argument(
        "--language", help="spoken language: ISO 639-1 code or English name, e.g. en, English (default: detect)"
    )
    parser.add_argument(
        "--transcriber",
        choices=("auto", "omni", "whisper"),
        help="who writes the transcript: omni (Qwen3-Omni) or whisper (faster-whisper, with word times); "
        "default auto: whisper with --model tiny, omni otherwise (OMNIQ_TRANSCRIBER)",
    )
    parser.add_argument(
        "--whisper-model",
        dest="whisper_model",
        help="tiny.en (bundled, default), a CTranslate2 model folder, or a faster-whisper name such as large-v3 "
        "or turbo (downloaded; OMNIQ_WHISPER_MODEL)",
    )


def setting_problems(error: ValueError) -> str:
    """A settings error in one line: ``OMNIQ_NAME: what is wrong`` for each bad setting."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    parts = []
    for problem in error.errors():
        name = "OMNIQ_" + "_".join(str(part) for part in problem["loc"]).upper() if problem["loc"] else "settings"
        parts.append(f"{name}: {str(problem['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def _unreachable_reason(error: BaseException) -> str:
    """``Connection refused`` out of redis-py's ``Error 111 connecting to host:port. Connection refused.``"""
    text = str(error).strip()
    match = re.match(r"Error \d+ connecting to \S+?\.?\s+(.*?)\.?$", text)
    return (match.group(1) if match else text) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    import redis
    from kombu.exceptions import OperationalError

    from pipeline.errors import TransientError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError) as error:
        url = redacted(Settings().broker_url)
        print(f"omniq: cannot reach Redis at {url} ({_unreachable_reason(error)})", file=sys.stderr)
        return EXIT_NO_REDIS
    except TransientError as error:  # storage (S3) unreachable or failing
        print(f"omniq: cannot reach storage: {error}", file=sys.stderr)
        return EXIT_NO_STORAGE
    except OmniqError as error:
        print(f"omniq: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as error:  # pydantic validation of settings
        print(f"omniq: invalid setting: {setting_problems(error)}", file=sys.stderr)
        return EXIT_USAGE
