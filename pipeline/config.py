"""One validated settings object, read once from ``OMNIQ_*`` environment variables."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
TINY_MODEL = "tiny"
TRANSCRIBERS = ("auto", "omni", "whisper")  # auto: whisper with the tiny model, omni with a real checkpoint
ENGINES = ("transformers", "vllm")  # what runs Qwen3-Omni (README "Engines")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "omniq"


class Settings(BaseSettings):
    """Everything omniq reads from the environment. Pass it down; never read ``os.environ`` elsewhere."""

    model_config = SettingsConfigDict(env_prefix="OMNIQ_", extra="ignore")

    # Where things live
    broker_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = "file://./omniq-data"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    cache_dir: Path = Field(default_factory=default_cache_dir)

    # Model
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=1024)  # hub id, local path, or "tiny"
    engine: str = "transformers"  # transformers | vllm (from an environment of its own: README "Engines")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    batch_size: int = Field(default=4, ge=1, le=64)  # rows per generate call
    batch_max_media_tokens: int = Field(default=131_072, ge=1)  # audio + video tokens per generate call
    batch_gather_ms: float = Field(default=150.0, ge=0, le=2000)  # how long a row may wait for others to batch with
    gpu_slots: int | None = Field(default=None, ge=1)  # messages a GPU worker works on at once (default 4 x batch)
    attention: str = "auto"  # auto (transformers' default: sdpa) | sdpa | eager | flash_attention_2 | ...
    experts: str = "auto"  # MoE experts: auto (grouped_mm, batched_mm for decode on GPU) | grouped_mm | eager | ...
    # vLLM engine: its share of the GPU's memory (weights + KV cache), GPUs per worker (tensor parallel), the longest
    # prompt + answer it takes, the sequences it runs at once (None: vLLM's default), and whether its engine core
    # runs in a process of its own (faster on a GPU; in-process, a killed worker takes the engine with it)
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    vllm_tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    vllm_max_model_len: int = Field(default=32_768, ge=512, le=262_144)
    vllm_max_num_seqs: int | None = Field(default=None, ge=1, le=4096)
    vllm_engine_process: bool = False
    language: str | None = None  # ISO 639-1 code or English name ("en", "English"); None: detected per file
    # Who writes the transcript (README "Transcribers"): Qwen3-Omni, or Whisper on CTranslate2 (words with times)
    transcriber: str = "auto"  # auto | omni | whisper
    whisper_model: str = Field(default="tiny.en", min_length=1, max_length=1024)  # tiny.en (bundled), folder, name
    # omni transcripts: word times by forced alignment with the Whisper model, where it knows the language
    align_words: bool = True
    whisper_compute_type: str = "auto"  # auto: float16 on CUDA, int8 on the CPU; or any CTranslate2 compute type
    transcript_max_new_tokens: int = Field(default=256, ge=1, le=8192)
    caption_max_new_tokens: int = Field(default=128, ge=1, le=8192)
    summary_max_new_tokens: int = Field(default=192, ge=1, le=8192)

    # Media
    chunk_seconds: float = Field(default=30.0, gt=0, le=600)
    chunk_overlap_seconds: float = Field(default=0.0, ge=0, le=60)
    silence_search_seconds: float = Field(default=3.0, ge=0, le=60)  # how far a boundary may move to silence
    silence_noise_db: float = Field(default=-35.0, ge=-120, le=0)
    silence_min_seconds: float = Field(default=0.3, gt=0, le=10)
    # Speech (README "Transcripts and subtitles"): Silero VAD at ingest; one transcript row per utterance
    vad_threshold: float = Field(default=0.5, gt=0, lt=1)  # speech probability above which a window is speech
    utterance_merge_seconds: float = Field(default=0.3, ge=0, le=2)  # speech closer than this is one utterance
    utterance_max_seconds: float = Field(default=10.0, ge=2, le=30)  # longer runs split at their quietest point
    fps: float = Field(default=2.0, gt=0, le=30)
    frame_max_pixels: int = Field(default=448 * 448, ge=32 * 32, le=4096 * 4096)
    max_file_bytes: int = Field(default=50 * 1024**3, gt=0)
    max_duration_seconds: float = Field(default=6 * 3600.0, gt=0)
    max_dimension: int = Field(default=8192, gt=0)
    ffmpeg_timeout_seconds: float = Field(default=3600.0, gt=0)
    # Step deadlines (README "Deadlines"): the floor of every deadline, plus this many seconds per second of the
    # work's media, per token a model call may write, and per byte a download brings at this rate
    deadline_min_seconds: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    deadline_factor: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    deadline_token_seconds: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    deadline_bytes_per_second: float = Field(default=1024.0**2, gt=0, allow_inf_nan=False)
    probe_timeout_seconds: float = Field(default=60.0, gt=0)

    # Storage lifecycle
    keep_work: bool = False
    # Folders whose files workers may read as local sources (comma-separated). Besides these, a worker reads
    # local files only from its store, where the producer puts (links or uploads) what it enqueues.
    local_source_roots: str = ""

    # Search index (see pipeline/search/__init__.py): sqlite:///path; unset = index.sqlite beside local results,
    # or under cache_dir when results are on S3
    index_url: str | None = None
    # Search by meaning (README "Search"): the sentence-transformers model that embeds every indexed entry and
    # every query; all-MiniLM-L6-v2 is bundled, or a model folder or hub id; none: search by words only
    embedding_model: str = Field(default="all-MiniLM-L6-v2", min_length=1, max_length=1024)

    # Triggers and bulk enqueue
    media_extensions: str = (
        ".mp4,.mov,.mkv,.webm,.avi,.m4v,.mpg,.mpeg,.ts,.mts,.m2ts,.flv,.wmv,.3gp,.ogv,"
        ".mp3,.wav,.flac,.m4a,.aac,.ogg,.oga,.opus,.wma,.aiff,.aif,.amr"
    )
    trigger_include_prefixes: str = ""  # comma-separated key prefixes; empty = every key
    trigger_exclude_prefixes: str = ""  # comma-separated key prefixes to ignore (e.g. omniq's own output prefix)
    trigger_buckets: str = ""  # comma-separated buckets whose events are enqueued; empty = any bucket
    sqs_endpoint_url: str | None = None
    webhook_token: SecretStr | None = None

    # Notifications (README "Job events"): ended jobs POSTed here, signed with the secret
    notify_url: str | None = None
    notify_secret: SecretStr | None = None
    notify_retry_seconds: float = Field(default=3600.0, ge=0)  # how long a delivery is retried before it is given up

    # Workers and recovery (README "Reliability"): leases, the watchdog, retry budgets
    lease_seconds: float = Field(default=45.0, ge=3)  # a running step's lease expires this long after its last renewal
    lease_renew_seconds: float = Field(default=10.0, gt=0)  # how often a worker renews the leases it holds
    watchdog_interval_seconds: float = Field(default=15.0, ge=0)  # one sweep per interval across all workers; 0 = off
    publish_grace_seconds: float = Field(default=60.0, ge=1)  # a job queued this long without its message is re-sent
    max_worker_deaths: int = Field(default=3, ge=1)  # a step that kills its worker this often fails its job
    redis_retry_seconds: float = Field(default=300.0, ge=0)  # how long workers ride out a Redis outage in a task
    retry_budget_seconds: float = Field(default=1800.0, ge=0)  # how long a step retries transient errors
    retry_min_seconds: float = Field(default=5.0, gt=0)  # backoff floor between retries
    retry_max_seconds: float = Field(default=300.0, gt=0)  # backoff ceiling between retries
    soft_shutdown_seconds: float = Field(default=8.0, ge=0)  # SIGTERM: finish within this, then hand tasks back
    # The broker's last resort: Redis redelivers an unacknowledged message after this long (leases come first).
    visibility_timeout_seconds: int = Field(default=6 * 3600, ge=60)
    # A row (a chunk's transcript, caption or summary, or the file summary) that fails for good leaves a gap and
    # the job ends "partial" with every good row published (README "Partial results"); false: the job fails
    partial: bool = True
    # Fault injection for tests (pipeline/failpoints.py): NAME=ACTION[:key=value...];... Off when empty.
    failpoints: str = ""
    flower_basic_auth: SecretStr | None = None  # "user:password" for omniq flower
    metrics_basic_auth: SecretStr | None = None  # "user:password" for a metrics port beyond loopback
    # Signed queue messages (README "Security"): this process's key and certificate (PEM), and the folder of the
    # certificates whose messages are accepted; all three or none
    signing_key: Path | None = None
    signing_cert: Path | None = None
    signing_cert_store: Path | None = None

    @model_validator(mode="after")
    def _signing_all_or_none(self) -> Settings:
        given = [self.signing_key, self.signing_cert, self.signing_cert_store]
        if any(given) and not all(given):
            raise ValueError(
                "message signing needs OMNIQ_SIGNING_KEY, OMNIQ_SIGNING_CERT and OMNIQ_SIGNING_CERT_STORE together "
                "(a private key, its certificate and a folder of trusted certificates), or none of them"
            )
        return self

    @field_validator("failpoints")
    @classmethod
    def _failpoints_parse(cls, value: str) -> str:
        from pipeline.failpoints import parse

        parse(value)  # a ValueError names the part that does not parse
        return value

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ENGINES:
            raise ValueError(f"engine {value!r}: use transformers (the default) or vllm")
        return value

    @field_validator("transcriber")
    @classmethod
    def _known_transcriber(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in TRANSCRIBERS:
            raise ValueError(f"transcriber {value!r}: use omni (Qwen3-Omni), whisper (faster-whisper) or auto")
        return value

    @property
    def transcriber_name(self) -> str:
        """``omni`` or ``whisper``: ``auto`` is Whisper for the tiny test model (whose text is random) and
        Qwen3-Omni for a real checkpoint."""
        if self.transcriber != "auto":
            return self.transcriber
        return "whisper" if self.model == TINY_MODEL else "omni"

    @field_validator("language")
    @classmethod
    def _language_code(cls, value: str | None) -> str | None:
        """Empty means detect; otherwise a known language, stored as its ISO 639-1 code."""
        if not value or not value.strip():
            return None
        from pipeline.languages import code_of

        code = code_of(value)
        if code is None:
            raise ValueError(
                f"language {value!r} is not one omniq knows: give an ISO 639-1 code (e.g. 'en', 'de', 'zh') or an "
                "English language name (e.g. 'English'), or leave it unset to detect the language of each file"
            )
        return code

    def media_extension_set(self) -> frozenset[str]:
        """Lower-case extensions, each with its leading dot."""
        parts = (p.strip().lower() for p in self.media_extensions.split(","))
        return frozenset(p if p.startswith(".") else f".{p}" for p in parts if p)

    def local_source_paths(self) -> list[Path]:
        """``local_source_roots`` as resolved folders."""
        return [Path(p.strip()).expanduser().resolve() for p in self.local_source_roots.split(",") if p.strip()]

    def allows_local_source(self, path: Path) -> bool:
        """Whether workers read ``path`` in place: its real path (symlinks followed) is under a root."""
        real = path.resolve()
        return any(real.is_relative_to(root) for root in self.local_source_paths())

    def effective_config(self) -> dict[str, object]:
        """The settings that change outputs; they go into job ids and manifests."""
        from pipeline.prompts import PROMPT_VERSION

        values = {name: getattr(self, name) for name in OUTPUT_SETTINGS}
        values["transcriber"] = self.transcriber_name  # auto is named by what it chose
        return {"prompt_version": PROMPT_VERSION, **values}

    def config_hash(self) -> str:
        return config_hash_of(self.effective_config())


# The settings a job carries (its config, in its id and its messages) and applies on every worker; every other
# setting (endpoints, credentials, limits, paths) is the worker's own, from its environment (README "Security").
OUTPUT_SETTINGS = (
    "model",
    "language",
    "transcriber",
    "whisper_model",
    "align_words",
    "chunk_seconds",
    "chunk_overlap_seconds",
    "silence_search_seconds",
    "silence_noise_db",
    "silence_min_seconds",
    "vad_threshold",
    "utterance_merge_seconds",
    "utterance_max_seconds",
    "fps",
    "frame_max_pixels",
    "transcript_max_new_tokens",
    "caption_max_new_tokens",
    "summary_max_new_tokens",
)
CONFIG_KEYS = frozenset({"prompt_version", *OUTPUT_SETTINGS})


def redacted(url: str) -> str:
    """A URL without its password, for messages and logs (``redis://:***@host``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def config_hash_of(config: dict[str, object]) -> str:
    """The hash of an effective config (as stored in job specs and manifests)."""
    blob = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
