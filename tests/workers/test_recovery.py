"""The watchdog's decisions (pure), leases, and one sweep over job state (fakeredis; publishing recorded)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import fakeredis
import pytest

from pipeline.config import Settings, config_hash_of
from pipeline.sources import SourceRef, job_id_for
from pipeline.spec import JobSpec
from tests.workers.conftest import queued
from workers import runtime, tasks
from workers.reliability.leases import Leases, _pid_namespace, holder_is_dead, lease_key, process_identity
from workers.reliability.recovery import JobView, UnitView, decide, describe, parse_units
from workers.state import JobState

NOW = 10_000.0
LIMITS = {"max_deaths": 3, "lease_seconds": 45, "publish_grace_seconds": 60}


def view(status="running", units=(), done=(), total=4, created=NOW - 600, updated=NOW - 600, job_id="job"):
    return JobView(job_id, status, created, updated, total, set(done), {u.name: u for u in units})


def kinds(actions):
    return [(a.kind, a.unit, a.chunks, a.fail_reason) for a in actions]


def test_healthy_and_waiting_work_is_left_alone():
    held = UnitView("infer-0", sent=1, started="5", chunks=[0, 1], holder="gpu-host|1|2|x")
    waiting = UnitView("infer-2", sent=1, chunks=[2, 3])  # in the queue for an hour: never touched
    assert decide(view(units=[UnitView("ingest", done=True), held, waiting]), NOW, **LIMITS) == []
    queued = view("queued", units=[UnitView("ingest", sent=NOW - 3600)], created=NOW - 3600)
    assert decide(queued, NOW, **LIMITS) == []
    for ended in ("done", "failed", "cancelled"):
        assert decide(view(ended, units=[UnitView("infer-0", started="5", chunks=[0])]), NOW, **LIMITS) == []


def test_a_unit_whose_worker_died_is_sent_again_with_its_missing_chunks():
    lost = UnitView("infer-4", sent=1, started="9000.5", chunks=[4, 5, 6, 7])
    actions = decide(view(units=[UnitView("ingest", done=True), lost], done={4, 5}, total=8), NOW, **LIMITS)
    assert kinds(actions) == [("abandon", "infer-4", [6, 7], None)]
    assert actions[0].started == "9000.5"
    ingest = UnitView("ingest", sent=1, started="1")
    assert kinds(decide(view("ingesting", units=[ingest]), NOW, **LIMITS)) == [("abandon", "ingest", None, None)]


def test_a_unit_that_killed_its_worker_too_often_fails_the_job():
    poison = UnitView("infer-4", started="1", chunks=[4, 5, 6, 7], deaths=2)
    actions = decide(view(units=[UnitView("ingest", done=True), poison], total=8), NOW, **LIMITS)
    assert kinds(actions) == [("abandon", "infer-4", [4, 5, 6, 7], "worker died 3 times while processing chunks 4–7")]
    assert describe("ingest", None).startswith("ingesting") and describe("infer-3", [3]) == "processing chunk 3"


def test_a_job_whose_message_was_never_sent_is_sent_after_the_grace_period():
    fresh = view("queued", units=[], created=NOW - 10, updated=NOW - 10)
    assert decide(fresh, NOW, **LIMITS) == []  # the producer may still be sending
    stranded = view("queued", units=[], created=NOW - 61, updated=NOW - 61)
    assert kinds(decide(stranded, NOW, **LIMITS)) == [("publish", "ingest", None, None)]


def test_a_retry_that_nobody_picked_up_is_sent_again():
    due = UnitView("summarize", sent=1, retry_at=NOW - 10)
    assert decide(view("summarizing", units=[due]), NOW, **LIMITS) == []  # within a lease period of its time
    late = UnitView("summarize", sent=1, retry_at=NOW - 46)
    assert kinds(decide(view("summarizing", units=[late]), NOW, **LIMITS)) == [("publish", "summarize", None, None)]


def test_lost_successors_are_sent_when_everything_before_them_is_done():
    base = [UnitView("ingest", done=True), UnitView("infer-0", done=True, chunks=[0, 1])]
    all_done = view(units=base, done={0, 1}, total=2)
    assert kinds(decide(all_done, NOW, **LIMITS)) == [("publish", "summarize", None, None)]
    assert decide(view(units=base, done={0, 1}, total=2, updated=NOW - 5), NOW, **LIMITS) == []  # just now
    summarized = view("summarizing", units=[*base, UnitView("summarize", sent=1, done=True)], done={0, 1}, total=2)
    assert kinds(decide(summarized, NOW, **LIMITS)) == [("publish", "finalize", None, None)]
    sent = view("finalizing", units=[*base, UnitView("summarize", sent=1, done=True), UnitView("finalize", sent=1)])
    assert decide(sent, NOW, **LIMITS) == []


def test_parse_units_reads_the_state_hash():
    units = parse_units(
        {"infer-0:sent": "1.5", "infer-0:chunks": "0,1", "infer-0:started": "2.5", "infer-0:deaths": "2",
         "ingest:done": "3", "summarize:retry_at": "9"},
        {"infer-0": "h|1|2|x"},
    )  # fmt: skip
    assert units["infer-0"] == UnitView("infer-0", 1.5, "2.5", False, 2, [0, 1], None, "h|1|2|x")
    assert units["ingest"].done and units["summarize"].retry_at == 9.0


# -- leases ---------------------------------------------------------------------------------------------


@pytest.fixture
def state():
    return JobState(fakeredis.FakeRedis(decode_responses=True))


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lease_is_exclusive_until_released(state):
    leases = Leases(state, 45, 10)
    first = leases.acquire("j", "infer-0")
    assert first.held and first.deaths == 0 and lease_key("j", "infer-0") in leases.held()
    assert state.units("j")["infer-0:started"]
    other = Leases(state, 45, 10).acquire("j", "infer-0")
    assert not other.held and other.other == first.holder  # a live holder (this process) keeps it
    leases.release("j", "infer-0", "not-the-holder")
    assert state.redis.get(lease_key("j", "infer-0")) == first.holder
    leases.release("j", "infer-0", first.holder)
    assert Leases(state, 45, 10).acquire("j", "infer-0").held


def test_a_dead_holder_on_this_host_is_taken_over_and_counted(state):
    dead = f"{socket.gethostname()}|{_dead_pid()}|123|{_pid_namespace()}|abcd"
    assert holder_is_dead(dead) and not holder_is_dead(process_identity() + "|x")
    assert not holder_is_dead(f"another-host|{_dead_pid()}|1|{_pid_namespace()}|x")  # unknown: assumed alive
    assert not holder_is_dead(f"{socket.gethostname()}|{_dead_pid()}|1|4026530000|x")  # another container
    state.redis.set(lease_key("j", "ingest"), dead, px=45_000)
    taken = Leases(state, 45, 10).acquire("j", "ingest")
    assert taken.held and taken.deaths == 1 and state.redis.get(lease_key("j", "ingest")) == taken.holder
    state.redis.set(lease_key("j", "summarize"), f"another-host|{_dead_pid()}|1|{_pid_namespace()}|x", px=45_000)
    assert not Leases(state, 45, 10).acquire("j", "summarize").held


def test_a_started_unit_whose_lease_expired_unnoticed_counts_a_death_when_taken(state):
    leases = Leases(state, 45, 10)
    first = leases.acquire("j", "ingest")
    state.redis.delete(lease_key("j", "ingest"))  # its worker died and the lease expired; no sweep since
    again = leases.acquire("j", "ingest")
    assert again.held and again.deaths == 1
    leases.release("j", "ingest", again.holder)
    state.unit_done("j", "ingest")  # a unit that ended cleanly is not a death when it is taken again
    after = leases.acquire("j", "ingest")
    assert after.deaths == 1 and not after.died_now
    assert first.holder != again.holder


def test_a_death_beside_other_units_is_counted_apart_and_the_unit_then_runs_alone(state):
    leases = Leases(state, 45, 10)
    shared = leases.acquire("j", "infer-0", shared=True)
    assert not shared.suspect
    state.redis.delete(lease_key("j", "infer-0"))  # the GPU worker died with several units in it
    taken = leases.acquire("j", "infer-0", shared=True)
    assert taken.died_now and (taken.deaths, taken.shared_deaths) == (0, 1) and taken.suspect
    leases.run_alone("j", "infer-0")  # alone from here: its next death is its own
    started = state.units("j")["infer-0:started"]
    state.redis.delete(lease_key("j", "infer-0"))  # it killed its worker, alone
    assert leases.abandon("j", "infer-0", started) == 1
    units = state.units("j")
    assert (units["infer-0:deaths"], units["infer-0:shared_deaths"], units["infer-0:shared"]) == ("1", "1", "0")
    # the watchdog's view: a death beside others never fails a job, one alone counts toward the limit
    beside = UnitView("infer-0", started="1", chunks=[0], deaths=2, shared=True)
    assert kinds(decide(view(units=[UnitView("ingest", done=True), beside], total=1), NOW, **LIMITS)) == [
        ("abandon", "infer-0", [0], None)
    ]
    alone = UnitView("infer-0", started="1", chunks=[0], deaths=2, shared=False)
    assert decide(view(units=[UnitView("ingest", done=True), alone], total=1), NOW, **LIMITS)[0].fail_reason


def test_a_suspect_unit_runs_alone_after_the_running_ones_and_before_new_ones():
    from workers.threads import SoloGate

    gate, events, lock = SoloGate(), [], threading.Lock()

    def run(name: str, solo: bool, seconds: float) -> None:
        with gate.solo() if solo else gate.shared():
            with lock:
                events.append(("start", name))
            time.sleep(seconds)
            with lock:
                events.append(("end", name))

    first = threading.Thread(target=run, args=("a", False, 0.3))
    first.start()
    time.sleep(0.05)
    suspect = threading.Thread(target=run, args=("s", True, 0.2))
    suspect.start()
    time.sleep(0.05)
    late = threading.Thread(target=run, args=("b", False, 0.05))
    late.start()
    for thread in (first, suspect, late):
        thread.join(timeout=10)
    assert events == [("start", "a"), ("end", "a"), ("start", "s"), ("end", "s"), ("start", "b"), ("end", "b")]


def test_renewal_keeps_a_lease_and_retakes_one_that_expired(state):
    leases = Leases(state, 45, 10)
    got = leases.acquire("j", "finalize")
    key = lease_key("j", "finalize")
    state.redis.pexpire(key, 100)
    leases.renew_now()
    assert state.redis.pttl(key) > 40_000
    state.redis.delete(key)  # expired over a Redis outage: taken again by the renewer
    leases.renew_now()
    assert state.redis.get(key) == got.holder
    state.redis.set(key, "someone-else")  # the watchdog gave it to another worker: not taken back
    leases.renew_now()
    assert state.redis.get(key) == "someone-else"


def test_a_lease_released_while_it_is_being_renewed_stays_released(state, monkeypatch):
    leases = Leases(state, 45, 1000)  # no renewals but the one below
    got = leases.acquire("j", "infer-0")
    state.redis.delete(lease_key("j", "infer-0"))  # it expired: the renewal takes it again
    releasing = threading.Thread(target=leases.release, args=("j", "infer-0", got.holder))
    real_pipeline = state.redis.pipeline

    def pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a, **k):
            releasing.start()  # the task ends and releases its lease in the middle of the renewal
            releasing.join(timeout=0.5)
            return real_execute(*a, **k)

        pipe.execute = execute
        return pipe

    monkeypatch.setattr(state.redis, "pipeline", pipeline)
    leases.renew_now()
    releasing.join(timeout=5)
    assert not state.redis.exists(lease_key("j", "infer-0"))  # not renewed back into existence


def test_the_renewing_thread_keeps_a_short_lease_alive(state):
    leases = Leases(state, 3, 0.2)
    leases.acquire("j", "infer-0")
    time.sleep(3.5)
    assert state.redis.exists(lease_key("j", "infer-0"))
    leases.release_all()
    assert not state.redis.exists(lease_key("j", "infer-0")) and leases.held() == {}


def test_abandon_counts_a_death_once(state):
    leases = Leases(state, 45, 10)
    state.redis.hset(JobState.key("j", "units"), "infer-0:started", "5")
    assert leases.abandon("j", "infer-0", "5") == 1
    assert leases.abandon("j", "infer-0", "5") == -1  # a second sweeper finds nothing to do
    state.redis.hset(JobState.key("j", "units"), "infer-0:started", "6")
    state.redis.set(lease_key("j", "infer-0"), "x")
    assert leases.abandon("j", "infer-0", "6") == -1  # held again


def test_a_dead_holder_on_this_host_counts_as_no_holder(state):
    leases = Leases(state, 45, 10)
    dead = f"{socket.gethostname()}|{_dead_pid()}|123|{_pid_namespace()}|x"
    state.redis.set(lease_key("j", "ingest"), dead, px=45_000)
    state.redis.hset(JobState.key("j", "units"), "ingest:started", "5")
    assert leases.alive([("j", "ingest")]) == [None]
    assert leases.abandon("j", "ingest", "5") == -1  # a lease is respected unless its dead holder is named
    assert leases.abandon("j", "ingest", "5", dead) == 1 and not state.redis.exists(lease_key("j", "ingest"))


# -- one sweep ------------------------------------------------------------------------------------------


def producer_spec(name: str) -> dict:
    """A spec as the producer writes it: the watchdog checks that its ids follow from its content."""
    ref = SourceRef(f"s3://media-in/{name}.mp4", "etag=e;size=1", 1)
    config = Settings(model="tiny").effective_config()
    job_id = job_id_for(ref.media_id, config_hash_of(config))
    return JobSpec(job_id, ref.media_id, ref.uri, ref.uri, ref.fingerprint, config).to_dict()


def test_a_sweep_resends_lost_and_stranded_work_and_fails_poison(state, monkeypatch):
    settings = Settings(model="tiny", max_worker_deaths=2)
    sent = []
    monkeypatch.setattr(
        tasks, "publish_unit", lambda spec, unit, chunks=None, **kw: sent.append((spec.job_id, unit, chunks))
    )
    failed = []
    monkeypatch.setattr(tasks, "fail_job", lambda job_id, reason, spec=None: failed.append((job_id, reason)))
    gave_up = []  # a poison infer unit's rows fail (README "Partial results"), tested on workers in tests/faults
    monkeypatch.setattr(tasks, "give_up", lambda job_id, unit, chunks, reason: gave_up.append((job_id, unit, reason)))
    monkeypatch.setattr(runtime, "state", lambda: state)
    specs = {name: producer_spec(name) for name in ("lost", "stranded", "poison", "busy", "forged")}
    lost, stranded, poison, busy, forged = (specs[name]["job_id"] for name in specs)
    for name, spec in specs.items():
        state.create(spec["job_id"], spec["source"], spec["media_id"], spec)
    # a record someone wrote to Redis by hand: its config sets a worker setting
    forged_record = specs["forged"] | {"config": {**specs["forged"]["config"], "s3_endpoint_url": "http://x"}}
    state.redis.hset(JobState.key(forged), "spec", json.dumps(forged_record))
    old = time.time() - 600
    for job_id in (stranded, forged):
        state.redis.hset(JobState.key(job_id), mapping={"created_at": old, "updated_at": old})
    for job_id in (lost, poison, busy):
        state.advance(job_id, "running", chunks_total=2)
        state.unit_done(job_id, "ingest")
        state.mark_sent([(job_id, "infer-0", [0, 1])])
        state.redis.hset(JobState.key(job_id, "units"), "infer-0:started", "1")
    state.redis.hset(JobState.key(poison, "units"), "infer-0:deaths", "1")
    state.complete_chunks(lost, [0], 2)
    state.redis.set(lease_key(busy, "infer-0"), "h|1|2|x", px=45_000)
    from workers.reliability.watchdog import EPOCH, Watchdog

    state.redis.set(EPOCH, "1")  # not a fresh Redis: no restore from the store
    report = Watchdog(state, Leases(state, 45, 10), settings).sweep()
    assert sorted(sent) == sorted([(lost, "infer-0", [1]), (stranded, "ingest", None)])
    assert gave_up == [(poison, "infer-0", "worker died 2 times while processing chunks 0–1")]
    assert failed == [
        (forged, "its record in Redis is malformed: job spec config may hold only output-shaping settings; "
         "not ['s3_endpoint_url']"),
    ]  # fmt: skip
    assert report["resent"] == 2 and report["failed"] == 1 and report["gave_up"] == 1
    assert state.redis.hget(JobState.key(lost), "recovered") == "1"
    assert Watchdog(state, Leases(state, 45, 10), settings).sweep() is None  # another worker holds the lock


def test_a_message_fetched_by_a_worker_that_died_before_starting_it_is_sent_again(broker, monkeypatch):
    """A worker took the message from Redis (kombu's unacked hash) and was SIGKILLed before it could take the
    unit's lease: without the watchdog, Redis would give it back only after the visibility timeout (hours)."""
    url, client, state = broker
    monkeypatch.setattr(runtime, "state", lambda: state)
    spec = producer_spec("j")
    j = spec["job_id"]
    state.create(j, spec["source"], spec["media_id"], spec)
    state.advance(j, "running", chunks_total=2)
    state.unit_done(j, "ingest")
    tasks.infer.publish(5, f"{j}-infer-0", model="tiny", job_id=j, source=spec["source"], chunks=[0, 1])
    state.mark_sent([(j, "infer-0", [0, 1])])
    fetch_and_die = (
        "import os, sys\nfrom kombu import Connection\n"
        "channel = Connection(sys.argv[1], transport_options={'sep': ':', 'priority_steps': list(range(10))}).channel()\n"
        "message = channel.basic_get(sys.argv[2], no_ack=False)\n"
        "assert message is not None\nos._exit(0)  # a SIGKILL: nothing is acknowledged or given back\n"
    )
    from workers.app import gpu_queue_for

    subprocess.run([sys.executable, "-c", fetch_and_die, url, gpu_queue_for("tiny")], check=True, timeout=60)
    assert client.hlen("unacked") == 1 and not queued(client, gpu_queue_for("tiny"))
    sent = []
    monkeypatch.setattr(
        tasks, "publish_unit", lambda spec, unit, chunks=None, **kw: sent.append((spec.job_id, unit, chunks))
    )
    from workers.reliability.watchdog import EPOCH, Watchdog

    client.set(EPOCH, "1")
    settings = Settings(model="tiny")
    # sent long ago to a queue that is empty now: "lost", unless a worker holds its message (as here, or as a
    # worker that stops holds it a moment after handing its unit back): then it is not sent again
    state.redis.hset(JobState.key(j, "units"), "infer-0:sent", time.time() - 120)
    first = Watchdog(state, Leases(state, 45, 10), settings).sweep(force=True)
    assert first["resent_stranded"] == 0 and first.get("resent", 0) == 0 and sent == []  # too new to be stranded
    report = Watchdog(state, Leases(state, 45, 10), settings).sweep(now=time.time() + 60, force=True)
    assert report["resent_stranded"] == 1 and sent == [(j, "infer-0", [0, 1])]
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    # the stranded copy is gone: the next sweep finds nothing to send
    assert (
        Watchdog(state, Leases(state, 45, 10), settings).sweep(now=time.time() + 60, force=True)["resent_stranded"] == 0
    )


def test_a_unit_overtaken_in_its_queue_by_a_later_one_that_started_is_lost():
    """kombu takes a message out of the Redis list a moment before recording it as unacknowledged: a worker
    killed in between loses it. Queues are served in order, so a later message of the same queue and priority
    that started means the earlier one will not."""
    from workers.reliability.watchdog import Overtaken

    def job(job_id: str, priority: int, **unit: object) -> tuple[JobView, dict[str, str]]:
        spec = json.dumps({"priority": priority, "config": {"model": "tiny"}})
        return view(units=[UnitView("ingest", done=True), UnitView("infer-0", **unit)], job_id=job_id), {"spec": spec}

    overtaken = Overtaken()
    overtaken.note(*job("lost", 5, sent=100.0, chunks=[0]))
    overtaken.note(*job("waiting", 5, sent=190.0, chunks=[0]))  # sent just before: may still be on its way
    overtaken.note(*job("urgent", 9, sent=50.0, chunks=[0]))  # another priority: another Redis list
    overtaken.note(*job("retrying", 5, sent=10.0, retry_at=300.0))  # held by a worker until its retry time
    overtaken.note(*job("running", 5, sent=200.0, started="201"))
    assert [(v.job_id, u.name) for v, _, u in overtaken.lost(45)] == [("lost", "infer-0")]
    # with nothing left in the GPU queue, a unit sent long enough ago is lost too, whatever else started
    lost = overtaken.lost(45, now=230.0, empty=frozenset({("gpu", "tiny")}))
    assert sorted(v.job_id for v, _, _ in lost) == ["lost", "urgent"]  # "waiting" was sent 40 s ago only
