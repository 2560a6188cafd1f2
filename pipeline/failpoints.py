"""Failpoints: off-by-default fault injection for tests and for users who want to see a failure on real workers.

In the spirit of TiKV's fail-rs and FoundationDB's buggify: named places in the code call :func:`hit`, which does
nothing unless the process was started with ``OMNIQ_FAILPOINTS`` naming that place. The value is read once, with
the other settings, when ``omniq run`` or ``omniq worker`` starts (:func:`install`); a queue message cannot set it
(a job carries only the output-shaping settings). Its grammar: ``;``-separated ``NAME=ACTION[:key=value...]``::

    infer.row=raise:chunk=3:kind=caption   that row (chunk 3's caption) raises every time it is run
    gpu.generate=hang                      the first model call of the process blocks for ever
    media.ffmpeg=hang                      the first ffmpeg decode of the process reads a stalled input

``infer.row`` takes ``chunk`` (a number) and ``kind`` (``transcript``, ``caption``, ``summary`` or
``file_summary``), each optional (absent: every chunk, every kind). ``hang`` fires once per worker: in the first
of its processes to get there (a marker file made with ``O_EXCL``, shared by the processes a worker forks), and
not again after the worker restarts itself in place (:func:`unfired`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ROW_KINDS = ("transcript", "caption", "summary", "file_summary")
# each place, the actions it takes, and the keys those take
PLACES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "infer.row": (("raise",), ("chunk", "kind")),
    "gpu.generate": (("hang", "raise"), ()),
    "media.ffmpeg": (("hang",), ()),
}


class FailpointError(RuntimeError):
    """What a ``raise`` failpoint raises: an error the code around it did not expect, as a model bug would be."""


@dataclass
class Failpoint:
    name: str
    action: str
    match: dict[str, str] = field(default_factory=dict)
    fired: int = 0

    def matches(self, context: dict[str, object]) -> bool:
        return all(str(context.get(key)) == value for key, value in self.match.items())

    def describe(self) -> str:
        return ":".join([f"{self.name}={self.action}", *(f"{k}={v}" for k, v in self.match.items())])


def parse(text: str) -> dict[str, Failpoint]:
    """``OMNIQ_FAILPOINTS`` as failpoints by name; raises ``ValueError`` naming the part that does not parse."""
    points: dict[str, Failpoint] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, equals, rest = part.partition("=")
        name = name.strip()
        if not equals or name not in PLACES:
            raise ValueError(
                f"failpoint {part!r}: write NAME=ACTION[:key=value...] with NAME one of {', '.join(PLACES)}"
            )
        action, *options = rest.split(":")
        actions, keys = PLACES[name]
        if action not in actions:
            raise ValueError(f"failpoint {part!r}: {name} takes the action {' or '.join(actions)}, not {action!r}")
        match: dict[str, str] = {}
        for option in options:
            key, equals, value = option.partition("=")
            if not equals or key not in keys or not value:
                allowed = f"the keys {', '.join(keys)}" if keys else "no keys"
                raise ValueError(f"failpoint {part!r}: {option!r} is not key=value; {name} takes {allowed}")
            if key == "chunk" and not value.isdigit():
                raise ValueError(f"failpoint {part!r}: chunk={value!r} is not a chunk number")
            if key == "kind" and value not in ROW_KINDS:
                raise ValueError(f"failpoint {part!r}: kind={value!r}: use one of {', '.join(ROW_KINDS)}")
            match[key] = str(int(value)) if key == "chunk" else value
        if name in points:
            raise ValueError(f"failpoint {part!r}: {name} is named twice")
        points[name] = Failpoint(name, action, match)
    return points


_installed: dict[str, Failpoint] = {}
_lock = threading.Lock()
_hung = threading.Event()  # never set: what a hanging failpoint waits on
_marks: str | None = None  # the folder of "this hang fired" markers, shared with forked processes


def install(text: str) -> None:
    """Arm the failpoints of ``text`` (``OMNIQ_FAILPOINTS``, validated by the settings) in this process."""
    global _marks
    points = parse(text)
    with _lock:
        _installed.clear()
        _installed.update(points)
        if any(p.action == "hang" for p in points.values()):
            _marks = tempfile.mkdtemp(prefix="omniq-failpoints-")
    if points:
        log.warning("failpoints armed (OMNIQ_FAILPOINTS): %s", "; ".join(p.describe() for p in points.values()))


def _fire_once(point: Failpoint) -> bool:
    """True for the first caller among this worker's processes (a marker file created exclusively)."""
    if _marks is None:
        return not point.fired
    try:
        os.close(os.open(os.path.join(_marks, point.name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def armed(name: str, **context: object) -> bool:
    """Whether failpoint ``name`` fires here (for places that act themselves, e.g. a stalled ffmpeg input)."""
    point = _installed.get(name)
    if point is None or not point.matches(context):
        return False
    with _lock:
        if point.action == "hang" and not _fire_once(point):
            return False  # once per worker
        point.fired += 1
    return True


def unfired() -> str:
    """The armed failpoints without the hangs that fired: what a worker that restarts itself arms again."""
    with _lock:
        points = [p for p in _installed.values() if not (p.action == "hang" and (p.fired or _fired_elsewhere(p)))]
    return ";".join(p.describe() for p in points)


def _fired_elsewhere(point: Failpoint) -> bool:
    return _marks is not None and os.path.exists(os.path.join(_marks, point.name))


def hit(name: str, **context: object) -> None:
    """The failpoint ``name`` at this place: nothing unless armed for this ``context``; then raise or hang."""
    if not _installed or not armed(name, **context):
        return
    point = _installed[name]
    where = ", ".join(f"{k}={v}" for k, v in context.items() if v is not None)
    if point.action == "raise":
        raise FailpointError(f"failpoint {point.describe()} fired ({where or name})")
    log.warning("failpoint %s fired: this call blocks for ever (%s)", point.describe(), where or name)
    _hung.wait()
