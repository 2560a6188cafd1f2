"""Input sources: local paths, file:// and s3:// URIs; deterministic media and job ids."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from pipeline import deadlines
from pipeline.config import Settings
from pipeline.errors import ConfigError, LimitExceeded, SourceNotFound


@dataclass(frozen=True)
class SourceRef:
    """A source as omniq names it (``uri``), with the fingerprint that makes its media id."""

    uri: str
    fingerprint: str  # size + mtime for files, ETag + size for S3 objects
    size_bytes: int

    @property
    def media_id(self) -> str:
        return hashlib.sha256(f"{self.uri}\n{self.fingerprint}".encode()).hexdigest()[:20]

    @property
    def name(self) -> str:
        if self.uri.startswith("s3://"):
            return PurePosixPath(self.uri.partition("://")[2]).name or "media"
        return Path(urlparse(self.uri).path).name or "media"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def display_source(uri: str) -> str:
    """A source as people write it: a local file as its path (no percent-encoding), S3 URIs as they are."""
    path = local_path(uri) if uri.startswith("file:") else None
    return str(path) if path is not None else uri


def job_id_for(media_id: str, config_hash: str) -> str:
    """The job id: the media id plus the hash of the settings that change outputs."""
    return f"{media_id}-{config_hash[:10]}"


def local_path(uri: str) -> Path | None:
    """The local path a source names, or None for remote URIs."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.netloc + parsed.path))
    if parsed.scheme in ("", None):
        return Path(uri)
    return None


def resolve_source(uri: str, settings: Settings) -> SourceRef:
    """Name and fingerprint a source without reading its content."""
    path = local_path(uri)
    if path is not None:
        path = path.expanduser().resolve()
        if not path.is_file():
            raise SourceNotFound(f"{uri}: no such file; check the path")
        stat = path.stat()
        return SourceRef(path.as_uri(), f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}", stat.st_size)
    if uri.startswith("s3://"):
        from pipeline.storage import s3_client, split_s3_uri, translate_s3_error

        bucket, key = split_s3_uri(uri)
        try:
            head = s3_client(settings).head_object(Bucket=bucket, Key=key)
        except Exception as error:
            translated = translate_s3_error(error, uri)
            if translated is error:
                raise
            raise translated from error
        size = int(head.get("ContentLength", 0))
        return SourceRef(f"s3://{bucket}/{key}", f"etag={head.get('ETag', '').strip(chr(34))};size={size}", size)
    raise ConfigError(f"{uri}: unsupported source; give a local path, file:///path or s3://bucket/key")


def check_size(size_bytes: int, settings: Settings, name: str) -> None:
    """Raise :class:`LimitExceeded` for a file over ``OMNIQ_MAX_FILE_BYTES``, naming it and the setting."""
    if size_bytes > settings.max_file_bytes:
        raise LimitExceeded(
            f"{name}: {size_bytes} bytes is over the limit of {settings.max_file_bytes}; "
            "raise OMNIQ_MAX_FILE_BYTES to accept it"
        )


class _SizeGuard:
    """A download progress callback that stops the download once more bytes came than the limit allows."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings, self.name = settings, name
        self.received = 0

    def __call__(self, count: int) -> None:
        self.received += count
        check_size(self.received, self.settings, self.name)


def fetch_source(uri: str, directory: Path, settings: Settings, name: str | None = None) -> Path:
    """A local path with the source's bytes: local files are used in place, S3 objects are downloaded.

    An object's size is checked against ``OMNIQ_MAX_FILE_BYTES`` before a byte is fetched (the object may have
    grown since it was enqueued), and the download stops if more bytes arrive than the limit allows.
    ``name`` is how errors name the source.
    """
    name = name or uri
    path = local_path(uri)
    if path is not None:
        if not path.is_file():
            raise SourceNotFound(f"{name}: no such file; check the path")
        return path
    from pipeline.storage import s3_client, split_s3_uri, translate_s3_error

    bucket, key = split_s3_uri(uri)
    target = directory / ("source" + Path(key).suffix.lower()[:16])
    client = s3_client(settings)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        size = int(head.get("ContentLength", 0))
        check_size(size, settings, name)
        deadlines.allow(deadlines.download_seconds(settings, size))  # a slower trickle is stopped at the deadline
        # s3transfer reads one version (its GETs carry If-Match with the ETag it measured); the guard counts
        # what arrives, whatever any HEAD said
        client.download_file(bucket, key, str(target), Callback=_SizeGuard(settings, name))
    except LimitExceeded:
        target.unlink(missing_ok=True)
        raise
    except Exception as error:
        translated = translate_s3_error(error, uri)
        if translated is error:
            raise
        raise translated from error
    return target
