"""omniq's error hierarchy: retry decisions match on these classes, never on message strings."""

from __future__ import annotations


class OmniqError(Exception):
    """Base of every error omniq raises on purpose."""


class TransientError(OmniqError):
    """Worth retrying with backoff: network, storage 5xx, throttling, Redis, CUDA OOM after shrinking."""


class PermanentError(OmniqError):
    """Retrying cannot help; the job fails at once with this message recorded."""


class PermanentMediaError(PermanentError):
    """The input is not decodable media, or has no stream omniq can use."""


class LimitExceeded(PermanentMediaError):
    """The input is valid media but breaks a configured limit (size, duration, resolution)."""


class ModelError(PermanentError):
    """The model cannot be loaded or run (missing checkpoint, unreachable hub, bad config)."""


class ConfigError(PermanentError):
    """A setting or argument is invalid."""


class SourceNotFound(PermanentError):
    """The input file or object does not exist or cannot be read."""


class MalformedMessage(PermanentError):
    """A queue message (or a job record) that omniq did not write: wrong fields, ids that do not match, or an
    input it may not read. Workers drop it (README "Security")."""


class RowFailed(PermanentError):
    """A row of a job's results failed for good and ``OMNIQ_PARTIAL`` is off: the whole job fails with its reason."""


def error_text(error: BaseException | str) -> str:
    """How a failure is recorded: ``Type: message`` for an exception, the text itself otherwise."""
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"
