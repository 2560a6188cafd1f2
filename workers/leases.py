"""Leases: one Redis key per running unit of work, renewed by a thread while its worker lives.

A worker takes a unit's lease when it starts the unit (``SET NX PX``) and a daemon thread renews every lease
the process holds every ``OMNIQ_LEASE_RENEW_SECONDS``; a lease of a killed worker expires after
``OMNIQ_LEASE_SECONDS``, which is how the watchdog knows the work was lost. The holder names its process
(host, pid and the process's start time), so a worker on the same host can tell at once that a holder has
died (a killed prefork child whose message Celery hands straight back) and take over, counting a death.
BullMQ's job locks and asynq's leases are the models.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from workers.state import PREFIX, JobState

log = logging.getLogger(__name__)

# KEYS: lease, units; ARGV: holder, ttl ms, unit, now
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return {0, current} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3] .. ':started', ARGV[4])
redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':starts', 1)
return {1, ''}
"""
# KEYS: lease, units; ARGV: dead holder, new holder, ttl ms, unit, now — take over from a holder known dead
_STEAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[4] .. ':started', ARGV[5])
redis.call('HINCRBY', KEYS[2], ARGV[4] .. ':starts', 1)
return redis.call('HINCRBY', KEYS[2], ARGV[4] .. ':deaths', 1)
"""
# KEYS: lease; ARGV: holder, ttl ms. 1 renewed, 2 re-taken after it expired (e.g. over a Redis outage), 0 lost
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
# KEYS: lease, units; ARGV: unit, started value seen by the caller.
# The watchdog's verdict on a started unit without a live lease: count the death once, clear 'started'.
_ABANDON = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('HGET', KEYS[2], ARGV[1] .. ':started') ~= ARGV[2] then return -1 end
redis.call('HDEL', KEYS[2], ARGV[1] .. ':started')
return redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':deaths', 1)
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(job_id: str, unit: str) -> str:
    return f"{PREFIX}:lease:{job_id}:{unit}"


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux); tells a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_identity() -> str:
    """``host|pid|start ticks``: unique to this process among the live ones on this host."""
    return f"{socket.gethostname()}|{os.getpid()}|{_start_ticks(os.getpid()) or '-'}"


def holder_is_dead(holder: str) -> bool:
    """True only when the holder is a process on this host that no longer runs; unknown means alive."""
    parts = holder.split("|")
    if len(parts) < 3 or parts[0] != socket.gethostname():
        return False
    pid, ticks = int(parts[1]), parts[2]
    current = _start_ticks(pid)
    if current is None:  # no /proc entry (or no /proc): ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return ticks != "-" and current != ticks  # the pid now belongs to a newer process


def holder_name(holder: str) -> str:
    """A holder as people read it: ``host pid 1234``."""
    parts = holder.split("|")
    return f"{parts[0]} pid {parts[1]}" if len(parts) >= 2 else holder


@dataclass
class Acquired:
    """The outcome of :meth:`Leases.acquire`: ``held`` or not, and the worker deaths counted on a takeover."""

    held: bool
    holder: str = ""
    deaths: int = 0  # > 0 when a dead holder's lease was taken over (its worker died mid-unit)
    other: str = ""  # who holds it, when not held


class Leases:
    """The leases this process holds, and the thread that renews them."""

    def __init__(self, state: JobState, ttl_seconds: float, renew_seconds: float) -> None:
        self.state = state
        self.ttl_ms = int(ttl_seconds * 1000)
        self.renew_seconds = min(renew_seconds, ttl_seconds / 3)
        client = state.redis
        self._acquire = client.register_script(_ACQUIRE)
        self._steal = client.register_script(_STEAL)
        self._renew = client.register_script(_RENEW)
        self._abandon = client.register_script(_ABANDON)
        self._release = client.register_script(_RELEASE)
        self._held: dict[str, str] = {}  # lease key -> holder
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stopped = threading.Event()

    def acquire(self, job_id: str, unit: str) -> Acquired:
        """Take a unit's lease. A holder that is a dead process on this host is taken over (a death)."""
        key = lease_key(job_id, unit)
        holder = f"{process_identity()}|{uuid.uuid4().hex[:8]}"
        units = JobState.key(job_id, "units")
        now = time.time()
        ok, current = self._acquire(keys=[key, units], args=[holder, self.ttl_ms, unit, now])
        deaths = 0
        if not int(ok):
            if not holder_is_dead(current):
                return Acquired(False, other=current)
            deaths = int(self._steal(keys=[key, units], args=[current, holder, self.ttl_ms, unit, now]))
            if deaths < 0:  # someone else took it in between
                return Acquired(False, other=str(self.state.redis.get(key) or ""))
        self._hold(key, holder)
        return Acquired(True, holder, deaths)

    def _hold(self, key: str, holder: str) -> None:
        with self._lock:
            self._held[key] = holder
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()  # a forked child starts its own thread
                self._stopped.clear()
                self._thread = threading.Thread(target=self._renew_loop, name="omniq-leases", daemon=True)
                self._thread.start()

    def release(self, job_id: str, unit: str, holder: str) -> None:
        """Give a lease back (only if it is still ours); never raises."""
        key = lease_key(job_id, unit)
        with self._lock:
            self._held.pop(key, None)
        try:
            self._release(keys=[key], args=[holder])
        except redis.exceptions.RedisError as error:
            log.warning("could not release lease %s (it expires by itself): %s", key, error)

    def release_all(self) -> None:
        """Give back every lease of this process (on shutdown, so handed-back messages can start at once)."""
        self._stopped.set()
        with self._lock:
            held, self._held = dict(self._held), {}
        for key, holder in held.items():
            try:
                self._release(keys=[key], args=[holder])
            except redis.exceptions.RedisError:
                pass  # it expires by itself

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._held)

    def renew_now(self) -> None:
        """Renew every held lease once (the thread calls this; tests may too)."""
        with self._lock:
            held = dict(self._held)
        if not held:
            return
        with self.state.redis.pipeline(transaction=False) as pipe:
            for key, holder in held.items():
                self._renew(keys=[key], args=[holder, self.ttl_ms], client=pipe)
            results = pipe.execute()
        for (key, _), result in zip(held.items(), results, strict=True):
            if int(result) == 0:
                log.warning("lease %s was taken over by another worker; this worker's copy is now a duplicate", key)

    def _renew_loop(self) -> None:
        while not self._stopped.wait(self.renew_seconds):
            try:
                self.renew_now()
            except redis.exceptions.RedisError as error:
                log.warning("could not renew leases (will try again): %s", error)

    def abandon(self, job_id: str, unit: str, started: str) -> int:
        """Declare a started unit without a live lease lost; returns its deaths, or -1 if it is not lost."""
        keys = [lease_key(job_id, unit), JobState.key(job_id, "units")]
        return int(self._abandon(keys=keys, args=[unit, started]))

    def alive(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """The holder of each (job id, unit) lease, None where there is no live lease; one round trip."""
        with self.state.redis.pipeline(transaction=False) as pipe:
            for job_id, unit in pairs:
                pipe.get(lease_key(job_id, unit))
            return pipe.execute()
