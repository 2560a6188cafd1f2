"""Object storage behind one small interface: ``LocalStorage`` (file://) and ``S3Storage`` (boto3).

Keys are '/'-separated relative paths (``results/<media-id>/manifest.json``). Writes are atomic
(temp file + rename locally, a single PUT on S3) and skipped when the stored bytes are identical,
so a redelivered task rewrites nothing; ``if_changed=False`` skips that comparison (one request fewer on
S3) where the caller knows the object is new.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from pipeline.config import Settings
from pipeline.errors import ConfigError, PermanentError, SourceNotFound, TransientError

log = logging.getLogger(__name__)


class Storage(Protocol):
    """Where work data and results live."""

    url: str

    def uri(self, key: str) -> str: ...
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None, *, if_changed: bool = True) -> bool: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str) -> Iterator[str]: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def delete(self, key: str) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: use a relative 'a/b/c' path without '..'")
    return key


def _process_umask() -> int:
    """This process's umask (read once at import: setting it to read it is not thread-safe later)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


class LocalStorage:
    """A directory on a local or shared file system."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None, *, if_changed: bool = True) -> bool:
        target = self.path(key)
        if if_changed and target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                os.fchmod(handle.fileno(), 0o666 & ~_UMASK)  # as open() would make it, not mkstemp's 0600
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return True

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError as error:
            raise SourceNotFound(f"{self.uri(key)}: not found in storage") from error

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end of the object)."""
        try:
            with self.path(key).open("rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except FileNotFoundError as error:
            raise SourceNotFound(f"{self.uri(key)}: not found in storage") from error

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()

    def delete_prefix(self, prefix: str) -> int:
        target = self.path(prefix.rstrip("/"))
        if not target.exists():
            return 0
        count = sum(1 for p in target.rglob("*") if p.is_file())
        shutil.rmtree(target)
        return count

    def delete(self, key: str) -> None:
        """Remove one object (no error if it is gone)."""
        self.path(key).unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, path.read_bytes())

    def link_file(self, key: str, path: Path) -> None:
        """Make ``path``'s bytes readable at ``key``: a hard link where the file system allows (no copy, and the
        bytes stay those enqueued when the file is replaced), else a streamed copy."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)
        except OSError:  # another file system, or a file this user may not link (fs.protected_hardlinks)
            temp = target.with_name(f".{target.name}.part")
            shutil.copyfile(path, temp)
            os.replace(temp, target)

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self.path(key), path)
        except FileNotFoundError as error:
            raise SourceNotFound(f"{self.uri(key)}: not found in storage") from error


def s3_client(settings: Settings):  # type: ignore[no-untyped-def]
    """A boto3 S3 client; credentials come from the standard AWS environment/config chain.

    Clients are expensive to build (~50 ms), so one is kept per endpoint, region and credentials.
    """
    credentials = (
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_PROFILE"),
    )
    key = hashlib.sha256(repr(credentials).encode()).hexdigest()  # never kept in clear
    return _cached_s3_client(settings.s3_endpoint_url, settings.s3_region or "us-east-1", key)


@functools.lru_cache(maxsize=16)
def _cached_s3_client(endpoint_url: str | None, region: str, credentials_key: str):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",  # also for presigned URLs (the viewer's), which AWS accepts only as SigV4
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else {},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=32,
    )
    # a fresh session per client: the default session caches the credentials it read first
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def translate_s3_error(error: Exception, uri: str) -> Exception:
    """Map a boto3 failure to omniq's hierarchy: missing → SourceNotFound, 5xx/network → TransientError."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}:
            return SourceNotFound(f"{uri}: not found ({code}); check the bucket and key")
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return PermanentError(f"{uri}: access denied ({code}); check the AWS credentials and bucket policy")
        if status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}:
            return TransientError(f"{uri}: storage is unavailable ({code})")
        return PermanentError(f"{uri}: storage error {code}: {error}")
    if isinstance(error, NoCredentialsError):
        return ConfigError(f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(error, BotoCoreError):
        return TransientError(f"{uri}: cannot reach storage ({error})")
    from s3transfer.exceptions import S3DownloadFailedError

    if isinstance(error, S3DownloadFailedError):  # a download's parts failed or named another version
        if "ETag" in str(error):
            return TransientError(f"{uri}: the object changed while it was read; reading it again")
        return TransientError(f"{uri}: the download failed ({error})")
    return error


class S3Storage:
    """A bucket and key prefix on S3 or any S3-compatible server (``OMNIQ_S3_ENDPOINT_URL``)."""

    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = s3_client(settings)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, uri: str, method: str, **kwargs: object) -> dict:  # type: ignore[type-arg]
        try:
            return getattr(self.client, method)(**kwargs)
        except Exception as error:  # translated below; anything unknown is re-raised unchanged
            translated = translate_s3_error(error, uri)
            if translated is error:
                raise
            raise translated from error

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None, *, if_changed: bool = True) -> bool:
        s3_key = self._key(key)
        if if_changed:
            md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
            try:
                head = self._call(self.uri(key), "head_object", Bucket=self.bucket, Key=s3_key)
                if head.get("ETag", "").strip('"') == md5 and head.get("ContentLength") == len(data):
                    return False
            except SourceNotFound:
                pass
        extra = {"ContentType": content_type} if content_type else {}
        self._call(self.uri(key), "put_object", Bucket=self.bucket, Key=s3_key, Body=data, **extra)
        return True

    def get_bytes(self, key: str) -> bytes:
        response = self._call(self.uri(key), "get_object", Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end of the object) in one ranged GET."""
        if length <= 0:
            return b""
        byte_range = f"bytes={start}-{start + length - 1}"
        try:
            response = self._call(self.uri(key), "get_object", Bucket=self.bucket, Key=self._key(key), Range=byte_range)
        except PermanentError as error:
            if "InvalidRange" in str(error):  # the object ends before ``start``
                return b""
            raise
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._call(self.uri(key), "head_object", Bucket=self.bucket, Key=self._key(key))
        except SourceNotFound:
            return False
        return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    yield item["Key"][strip:]
        except Exception as error:
            translated = translate_s3_error(error, f"s3://{self.bucket}/{full}")
            if translated is error:
                raise
            raise translated from error

    def delete_prefix(self, prefix: str) -> int:
        keys = [self._key(key) for key in self.list_keys(prefix)]
        for first in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[first : first + 1000]]
            self._call(self.url, "delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def delete(self, key: str) -> None:
        """Remove one object (S3 answers the same whether it existed or not)."""
        self._call(self.uri(key), "delete_object", Bucket=self.bucket, Key=self._key(key))

    def put_file(self, key: str, path: Path) -> None:
        self.put_bytes(key, path.read_bytes())

    def get_file(self, key: str, path: Path) -> None:
        path.write_bytes(self.get_bytes(key))


def open_storage(url: str, settings: Settings) -> LocalStorage | S3Storage:
    """``file:///abs/dir``, ``file://./rel``, a plain directory path, or ``s3://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not url[len("s3://") :].partition("/")[0]:
            raise ConfigError(f"storage URL {url!r} has no bucket: use s3://BUCKET/PREFIX")
        bucket, prefix = split_s3_uri(url, key_required=False)
        return S3Storage(bucket, prefix, settings)
    if parsed.scheme == "file":
        return LocalStorage(Path(unquote(parsed.netloc + parsed.path)))
    if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
        return LocalStorage(Path(url))
    raise ConfigError(f"storage URL {url!r}: unsupported scheme {parsed.scheme!r}; use file:// or s3://")


# S3's bucket naming rules, with the legacy us-east-1 names (upper case, '_', up to 255 characters) that
# botocore still accepts: never a '/', ':' or anything that would change where a URI points.
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name, or None when it is one."""
    if not _BUCKET_NAME.fullmatch(bucket):
        return (
            f"{bucket!r} is not a valid S3 bucket name (3-63 letters, digits, '.' and '-', starting and ending "
            "with a letter or digit; legacy names may also hold upper case and '_', up to 255)"
        )
    if ".." in bucket:
        return f"{bucket!r} is not a valid S3 bucket name (two dots in a row)"
    return None


def split_s3_uri(uri: str, key_required: bool = True) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key). Keys are taken verbatim, as the AWS CLI does: no
    percent-decoding, and ``#``, ``?``, ``%`` and spaces are part of the key. The bucket must be a valid
    bucket name, so that no URI can name another bucket than it seems to."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"{uri!r} is not an s3://BUCKET/KEY URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or (key_required and not key.strip("/")):
        raise ConfigError(f"{uri!r} is not an s3://BUCKET/KEY URI")
    problem = bucket_problem(bucket)
    if problem is not None:
        raise ConfigError(f"{uri!r}: {problem}")
    return bucket, key
