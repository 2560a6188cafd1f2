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

from workers.state import ACTIVE_SET, PREFIX, JobState

log = logging.getLogger(__name__)

# Counting a worker death against a unit. A unit that ran beside others in one process (a GPU worker's slots:
# ``<unit>:shared`` is 1) may have died for another's fault, so its death is counted apart (``shared_deaths``)
# and does not make it poison; the worker runs it alone next time, where a death is its own (``deaths``).
_COUNT_DEATH = """
local function count_death(units, unit)
  if redis.call('HGET', units, unit .. ':shared') == '1' then
    redis.call('HINCRBY', units, unit .. ':shared_deaths', 1)
  else
    redis.call('HINCRBY', units, unit .. ':deaths', 1)
  end
end
local function deaths_of(units, unit)
  return {tonumber(redis.call('HGET', units, unit .. ':deaths') or '0'),
          tonumber(redis.call('HGET', units, unit .. ':shared_deaths') or '0')}
end
"""
# KEYS: lease, units, active set; ARGV: holder, ttl ms, unit, now, job id, shared (1/0).
# A unit still marked 'started' with no lease left was not finished, retried or handed back: its worker died
# and nobody noticed yet (the lease expired before the watchdog swept). That death is counted here.
_ACQUIRE = (
    _COUNT_DEATH
    + """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return {0, current, 0, 0, 0} end
redis.call('SADD', KEYS[3], ARGV[5])
local counted = 0
if redis.call('HEXISTS', KEYS[2], ARGV[3] .. ':started') == 1 then
  count_death(KEYS[2], ARGV[3])
  counted = 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3] .. ':started', ARGV[4], ARGV[3] .. ':shared', ARGV[6])
redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':starts', 1)
local deaths = deaths_of(KEYS[2], ARGV[3])
return {1, '', deaths[1], deaths[2], counted}
"""
)
# KEYS: lease, units; ARGV: dead holder, new holder, ttl ms, unit, now, shared — take over from a holder known dead
_STEAL = (
    _COUNT_DEATH
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, 0} end
count_death(KEYS[2], ARGV[4])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[4] .. ':started', ARGV[5], ARGV[4] .. ':shared', ARGV[6])
redis.call('HINCRBY', KEYS[2], ARGV[4] .. ':starts', 1)
return deaths_of(KEYS[2], ARGV[4])
"""
)
# KEYS: lease, units; ARGV: holder, ttl ms, unit, now. 1 renewed, 2 re-taken after it expired (e.g. over a
# Redis outage; the unit is marked started again, since this worker is running it), 0 taken over by another
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('HSETNX', KEYS[2], ARGV[3] .. ':started', ARGV[4])
  return 2
end
return 0
"""
# KEYS: lease, units; ARGV: unit, started value seen by the caller, the dead holder ('' if the lease expired).
# The watchdog's verdict on a started unit without a live lease: count the death once, clear 'started'.
_ABANDON = (
    _COUNT_DEATH
    + """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[3] then return -1 end
if redis.call('HGET', KEYS[2], ARGV[1] .. ':started') ~= ARGV[2] then return -1 end
if current then redis.call('DEL', KEYS[1]) end
redis.call('HDEL', KEYS[2], ARGV[1] .. ':started')
count_death(KEYS[2], ARGV[1])
return deaths_of(KEYS[2], ARGV[1])[1]
"""
)
# KEYS: lease, units; ARGV: holder, unit — a unit this holder ran was stopped at its deadline: counted like a death
# (and as a timeout), its lease and its 'started' go, so the next run neither waits for the lease nor counts again
_TIME_OUT = (
    _COUNT_DEATH
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2] .. ':started')
count_death(KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[2] .. ':timeouts', 1)
return deaths_of(KEYS[2], ARGV[2])[1]
"""
)
# KEYS: units; ARGV: unit — the unit now runs alone in its worker: a death from here on is its own
_SOLO = "redis.call('HSET', KEYS[1], ARGV[1] .. ':shared', '0')"
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lease, units; ARGV: holder, unit — give a unit back unfinished (shutdown): not a death, not started
_HAND_BACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2] .. ':started')
return 1
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


def _pid_namespace() -> str:
    """This process's PID namespace (containers on one host may share a hostname but not their pids)."""
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "-"


def process_identity() -> str:
    """``host|pid|start ticks|pid namespace``: unique to this process among the live ones on this host."""
    return f"{socket.gethostname()}|{os.getpid()}|{_start_ticks(os.getpid()) or '-'}|{_pid_namespace()}"


def holder_is_dead(holder: str) -> bool:
    """True only when the holder is a process of this host and PID namespace that no longer runs;
    a holder elsewhere is assumed alive (its lease expires by itself if it is not)."""
    parts = holder.split("|")
    if len(parts) < 4 or parts[0] != socket.gethostname() or parts[3] != _pid_namespace() or parts[3] == "-":
        return False
    pid, ticks = int(parts[1]), parts[2]
    current = _start_ticks(pid)
    if current is None:  # no /proc entry: ask the kernel whether the pid exists
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
    """The outcome of :meth:`Leases.acquire`: ``held`` or not, and the unit's worker deaths so far."""

    held: bool
    holder: str = ""
    deaths: int = 0  # deaths of workers that ran this unit alone: each one its own fault (poison at the limit)
    shared_deaths: int = 0  # deaths of workers that ran it beside other units (maybe another's fault)
    died_now: bool = False  # this acquire found the previous run dead (and counted it)
    other: str = ""  # who holds it, when not held

    @property
    def suspect(self) -> bool:
        """It was in a worker that died: a worker with several slots runs it alone."""
        return bool(self.deaths or self.shared_deaths)


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
        self._solo = client.register_script(_SOLO)
        self._release = client.register_script(_RELEASE)
        self._hand_back = client.register_script(_HAND_BACK)
        self._time_out = client.register_script(_TIME_OUT)
        self._held: dict[str, str] = {}  # lease key -> holder
        self._units: dict[str, tuple[str, str]] = {}  # lease key -> (job id, unit)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stopped = threading.Event()

    def acquire(self, job_id: str, unit: str, shared: bool = False) -> Acquired:
        """Take a unit's lease. A holder that is a dead process on this host is taken over (a death).

        ``shared``: the unit runs beside other units in this process (a GPU worker's slots), so a death of this
        process is not necessarily its fault (see ``_COUNT_DEATH``)."""
        key = lease_key(job_id, unit)
        holder = f"{process_identity()}|{uuid.uuid4().hex[:8]}"
        units = JobState.key(job_id, "units")
        now = time.time()
        flag = "1" if shared else "0"
        keys, args = [key, units, ACTIVE_SET], [holder, self.ttl_ms, unit, now, job_id, flag]
        ok, current, deaths, shared_deaths, counted = self._acquire(keys=keys, args=args)
        if not int(ok):
            if not holder_is_dead(current):
                return Acquired(False, other=current)
            deaths, shared_deaths = self._steal(keys=[key, units], args=[current, holder, self.ttl_ms, unit, now, flag])
            if int(deaths) < 0:  # someone else took it in between
                return Acquired(False, other=str(self.state.redis.get(key) or ""))
            counted = 1
        self._hold(key, holder, job_id, unit)
        return Acquired(True, holder, int(deaths), int(shared_deaths), bool(int(counted)))

    def run_alone(self, job_id: str, unit: str) -> None:
        """Record that a held unit now runs alone in its worker: a death from here on counts as its own."""
        self._solo(keys=[JobState.key(job_id, "units")], args=[unit])

    def _hold(self, key: str, holder: str, job_id: str, unit: str) -> None:
        with self._lock:
            self._held[key] = holder
            self._units[key] = (job_id, unit)
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()  # a forked child starts its own thread
                self._stopped.clear()
                self._thread = threading.Thread(target=self._renew_loop, name="omniq-leases", daemon=True)
                self._thread.start()

    def _let_go(self, job_id: str, unit: str) -> str:
        """Stop renewing a unit's lease; returns its key."""
        key = lease_key(job_id, unit)
        with self._lock:
            self._held.pop(key, None)
            self._units.pop(key, None)
        return key

    def release(self, job_id: str, unit: str, holder: str) -> None:
        """Give a lease back (only if it is still ours); never raises."""
        key = self._let_go(job_id, unit)
        try:
            self._release(keys=[key], args=[holder])
        except redis.exceptions.RedisError as error:
            log.warning("could not release lease %s (it expires by itself): %s", key, error)

    def hand_back(self, job_id: str, unit: str, holder: str) -> None:
        """Give a unit back unstarted (its message turned out to have nothing to do here); never raises."""
        key = self._let_go(job_id, unit)
        try:
            self._hand_back(keys=[key, JobState.key(job_id, "units")], args=[holder, unit])
        except redis.exceptions.RedisError as error:
            log.warning("could not hand back lease %s (it expires by itself): %s", key, error)

    def time_out(self, job_id: str, unit: str, holder: str) -> int:
        """A unit this process held was stopped at its deadline: count it like a death and let its lease go.
        Returns the unit's own deaths (see ``_COUNT_DEATH``), -1 when the lease is no longer ``holder``'s."""
        key = self._let_go(job_id, unit)
        return int(self._time_out(keys=[key, JobState.key(job_id, "units")], args=[holder, unit]))

    def time_out_held(self, job_id: str, unit: str) -> int:
        """:meth:`time_out` for a unit whose holder this process knows (a model call that hung holds it)."""
        with self._lock:
            holder = self._held.get(lease_key(job_id, unit))
        return -1 if holder is None else self.time_out(job_id, unit, holder)

    def release_all(self) -> None:
        """Hand back every unit this process holds (on shutdown): the leases go, and the units count as not
        started, so their handed-back messages start at once elsewhere and no worker death is counted."""
        self._stopped.set()
        with self._lock:
            held, self._held = dict(self._held), {}
            units, self._units = dict(self._units), {}
        for key, holder in held.items():
            job_id, unit = units[key]
            try:
                self._hand_back(keys=[key, JobState.key(job_id, "units")], args=[holder, unit])
            except redis.exceptions.RedisError:
                pass  # it expires by itself

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._held)

    def renew_now(self) -> None:
        """Renew every held lease once (the thread calls this; tests may too). Runs under the lock, so a
        lease released meanwhile is not taken again after its release."""
        with self._lock:
            if not self._held:
                return
            now = time.time()
            with self.state.redis.pipeline(transaction=False) as pipe:
                for key, holder in self._held.items():
                    job_id, unit = self._units[key]
                    keys = [key, JobState.key(job_id, "units")]
                    self._renew(keys=keys, args=[holder, self.ttl_ms, unit, now], client=pipe)
                results = pipe.execute()
            for key, result in zip(self._held, results, strict=True):
                if int(result) == 0:
                    log.warning("lease %s was taken over by another worker; this one's copy is now a duplicate", key)

    def _renew_loop(self) -> None:
        while not self._stopped.wait(self.renew_seconds):
            try:
                self.renew_now()
            except redis.exceptions.RedisError as error:
                log.warning("could not renew leases (will try again): %s", error)

    def abandon(self, job_id: str, unit: str, started: str, dead_holder: str = "") -> int:
        """Declare a started unit lost (its lease expired, or is held by ``dead_holder``, a process on this
        host that no longer runs); returns its own deaths (see ``_COUNT_DEATH``), or -1 if it is not lost after
        all."""
        keys = [lease_key(job_id, unit), JobState.key(job_id, "units")]
        return int(self._abandon(keys=keys, args=[unit, started, dead_holder]))

    def alive(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        """The holder of each (job id, unit) lease, None where there is no live lease; one round trip.

        A holder that is a dead process on this host counts as none (a worker restarted on the same machine
        finds its predecessor's work at its first sweep, without waiting for the lease to expire)."""
        with self.state.redis.pipeline(transaction=False) as pipe:
            for job_id, unit in pairs:
                pipe.get(lease_key(job_id, unit))
            holders = pipe.execute()
        return [None if holder and holder_is_dead(holder) else holder for holder in holders]

    def holder_of(self, job_id: str, unit: str) -> str:
        return str(self.state.redis.get(lease_key(job_id, unit)) or "")
