"""What a worker accepts from its queue: each task's message checked before anything acts on it.

Anyone who can write to the broker's Redis can put a message on a queue, so a message is input, not an order
(README "Security"): it names a job by ids that follow from the job's content, carries only the settings that
shape outputs, and may make a worker read only the job's source or the copy the producer staged. A message
that fails a check is dropped with an error in the log (``omniq_malformed_messages``); only a job whose own
spec cannot run fails.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.config import Settings
from pipeline.errors import MalformedMessage
from pipeline.spec import JobSpec, check_input_location, settings_for
from pipeline.storage import Storage

JOB_ID = re.compile(r"[0-9a-f]{20}-[0-9a-f]{10}")
UNIT = re.compile(r"infer-\d{1,9}")
MAX_CHUNKS = 1024  # chunks in one infer message; a batch holds OMNIQ_BATCH_SIZE (at most 64)
MAX_SOURCE = 4096

# The keyword arguments each task takes: (required, optional)
FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "omniq.ingest": (frozenset({"job_id", "source", "spec"}), frozenset()),
    "omniq.infer": (frozenset({"job_id", "source", "chunks"}), frozenset({"unit", "model"})),
    "omniq.summarize": (frozenset({"job_id", "source"}), frozenset({"model"})),
    "omniq.finalize": (frozenset({"job_id", "source"}), frozenset()),
}


def check_message(
    task: str, args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings, storage: Storage
) -> None:
    """Raise :class:`MalformedMessage` unless ``kwargs`` is a message omniq writes for ``task``."""
    if task not in FIELDS:
        return
    required, optional = FIELDS[task]
    given = set(kwargs)
    if args or not required <= given or not given <= required | optional:
        raise MalformedMessage(
            f"{task} takes the keyword arguments {sorted(required)} (and optionally {sorted(optional)}); "
            f"got {len(args)} positional and {sorted(given)[:10]}"
        )
    job_id, source = kwargs["job_id"], kwargs["source"]
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise MalformedMessage(f"{task}: job_id {str(job_id)[:80]!r} is not an omniq job id")
    if not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE:
        raise MalformedMessage(f"{task} of job {job_id}: source must be a non-empty string")
    model = kwargs.get("model")
    if model is not None and not isinstance(model, str):
        raise MalformedMessage(f"{task} of job {job_id}: model must be a string")
    if task == "omniq.infer":
        _check_chunks(job_id, kwargs["chunks"], kwargs.get("unit"))
    if task == "omniq.ingest":
        spec = JobSpec.from_dict(kwargs["spec"])
        if (spec.job_id, spec.source) != (job_id, source):
            raise MalformedMessage(f"{task} of job {job_id}: its spec names another job ({spec.job_id[:40]!r})")
        settings_for(spec, settings)  # the job's settings validate as the environment's do
        check_input_location(spec, storage)


def _check_chunks(job_id: str, chunks: Any, unit: Any) -> None:
    valid = (
        isinstance(chunks, list)
        and 0 < len(chunks) <= MAX_CHUNKS
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 10**9 for c in chunks)
    )
    if not valid:
        raise MalformedMessage(f"omniq.infer of job {job_id}: chunks must be a list of chunk numbers")
    if unit is not None and (not isinstance(unit, str) or not UNIT.fullmatch(unit)):
        raise MalformedMessage(f"omniq.infer of job {job_id}: unit {str(unit)[:40]!r} is not an infer unit")
