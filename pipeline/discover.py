"""Find the media to enqueue: files, directories (recursive), ``s3://bucket/prefix`` listings and list files.

Discovery names each source and fingerprints it (size/mtime, or ETag/size from the S3 listing itself), so
enqueueing a bucket of 10,000 objects costs one listing request per 1,000 objects, not one HEAD per object.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.config import Settings
from pipeline.errors import ConfigError, OmniqError
from pipeline.sources import SourceRef, check_size, local_path, resolve_source
from pipeline.storage import split_s3_uri


@dataclass(frozen=True)
class Discovered:
    """One candidate: a named, fingerprinted source, or the reason it was rejected."""

    uri: str
    ref: SourceRef | None = None
    rejected: str | None = None


@dataclass(frozen=True)
class Filters:
    """Which files a directory or prefix expands to. Explicitly named files are always taken."""

    extensions: frozenset[str]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def wants(self, relative: str) -> bool:
        return self.left_out(relative) is None

    def left_out(self, relative: str) -> str | None:
        """Why a file is not taken (``hidden``, ``excluded``, ``not included``, ``not media``), or None."""
        name = PurePosixPath(relative).name
        if name.startswith(".") or relative.endswith("/"):
            return "hidden"
        matches = lambda patterns: any(  # noqa: E731
            fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns
        )
        if self.exclude and matches(self.exclude):
            return "excluded"
        if self.include:
            return None if matches(self.include) else "not included"
        return None if PurePosixPath(name).suffix.lower() in self.extensions else "not media"


def read_list_file(path: Path) -> Iterator[str]:
    """URIs from a list file: one per line, or JSON lines with a ``uri`` field; blank and ``#`` lines skipped."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"--from-file {path}: cannot read it ({error.strerror})") from error
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                uri = json.loads(line).get("uri")
            except (json.JSONDecodeError, AttributeError) as error:
                raise ConfigError(f"--from-file {path}:{number}: not valid JSON ({error})") from error
            if not isinstance(uri, str) or not uri:
                raise ConfigError(f'--from-file {path}:{number}: a JSON line needs a "uri" string')
            yield uri
        else:
            yield line


def _walk_directory(root: Path, filters: Filters, settings: Settings, ignored: list[str]) -> Iterator[Discovered]:
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(files):
            path = Path(directory) / name
            reason = filters.left_out(path.relative_to(root).as_posix())
            if reason is None:
                yield _local(str(path), settings)
            elif reason == "not media":  # what the user did not choose to leave out
                ignored.append(str(path))


def _local(uri: str, settings: Settings) -> Discovered:
    try:
        return Discovered(uri, resolve_source(uri, settings))
    except OmniqError as error:
        return Discovered(uri, rejected=str(error))


def _is_s3_prefix(uri: str, filters: Filters) -> bool:
    key = split_s3_uri(uri, key_required=False)[1]
    return not key or key.endswith("/") or PurePosixPath(key).suffix.lower() not in filters.extensions


def list_s3_prefix(
    uri: str, settings: Settings, filters: Filters, ignored: list[str] | None = None
) -> Iterator[Discovered]:
    """Every object under ``s3://bucket/prefix`` that the filters want, fingerprinted from the listing; the
    others go to ``ignored`` (folder markers and empty objects are not counted)."""
    from pipeline.storage import s3_client, translate_s3_error

    bucket, prefix = split_s3_uri(uri, key_required=False)
    paginator = s3_client(settings).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": 1000}):
            for item in page.get("Contents", []):
                key, size = item["Key"], int(item.get("Size", 0))
                if size == 0:
                    continue
                reason = filters.left_out(key[len(prefix) :].lstrip("/") or key)
                if reason is not None:
                    if ignored is not None and reason == "not media":
                        ignored.append(f"s3://{bucket}/{key}")
                    continue
                etag = str(item.get("ETag", "")).strip('"')
                yield Discovered(
                    f"s3://{bucket}/{key}", SourceRef(f"s3://{bucket}/{key}", f"etag={etag};size={size}", size)
                )
    except Exception as error:
        translated = translate_s3_error(error, uri)
        if translated is error:
            raise
        yield Discovered(uri, rejected=str(translated))


def discover(
    inputs: Iterable[str], settings: Settings, filters: Filters, ignored: list[str] | None = None
) -> Iterator[Discovered]:
    """Expand inputs in order: directories and S3 prefixes into their media, files and objects as given.

    A source over ``OMNIQ_MAX_FILE_BYTES`` (by its listing, HEAD or stat) is rejected here, before any
    worker downloads it. Files of a directory or prefix left out for not being media (by extension, when no
    ``--include`` is given) are added to ``ignored``.
    A glob (``*``, ``?``, ``[``) in a local path that names no file expands to the files it matches."""
    for item in _expand(inputs, settings, filters, [] if ignored is None else ignored):
        if item.ref is not None:
            try:
                check_size(item.ref.size_bytes, settings, item.uri)
            except OmniqError as error:
                item = Discovered(item.uri, rejected=str(error))
        yield item


def _expand(inputs: Iterable[str], settings: Settings, filters: Filters, ignored: list[str]) -> Iterator[Discovered]:
    for uri in inputs:
        path = local_path(uri)
        if path is not None:
            path = path.expanduser()
            if path.is_dir():
                yield from _walk_directory(path, filters, settings, ignored)
            elif not path.exists() and any(c in str(path) for c in "*?[") and (matches := _glob(path)):
                for match in matches:
                    yield from _expand([str(match)], settings, filters, ignored)
            else:
                yield _local(uri, settings)
        elif uri.startswith("s3://"):
            try:
                if not split_s3_uri(uri, key_required=False)[0]:
                    yield Discovered(uri, rejected=f"{uri}: no bucket; use s3://BUCKET/PREFIX")
                elif _is_s3_prefix(uri, filters):
                    yield from list_s3_prefix(uri, settings, filters, ignored)
                else:
                    yield Discovered(uri, resolve_source(uri, settings))
            except OmniqError as error:
                yield Discovered(uri, rejected=str(error))
        else:
            yield Discovered(uri, rejected=f"{uri}: unsupported source; give a path, a directory or s3://bucket/key")


def _glob(pattern: Path) -> list[Path]:
    """The paths a shell-style pattern matches (``**`` for any depth), sorted; a quoted glob works as typed."""
    anchor = Path(pattern.anchor) if pattern.is_absolute() else Path()
    relative = pattern.relative_to(anchor) if pattern.is_absolute() else pattern
    return sorted(anchor.glob(str(relative)))
