"""``omniq worker`` starts itself again when Celery stops on its own (it gives up on some broker errors, e.g.
"Unrecoverable error" while Redis restarts: the worker stops and Celery's command returns its exit status), with
a pause that grows with each restart, and never when it was asked to stop. Celery giving up cannot be caused on
demand, so ``run_celery`` returns that status (or raises) here; the restart itself (``os.execv``) is recorded
instead of replacing the test process. The fault suite's Redis restarts exercise the real thing."""

from __future__ import annotations

import types

import pytest

from workers import cli
from workers.reliability import lifecycle


class Restarted(Exception):
    """Stands for the process being replaced: ``os.execv`` never returns."""


@pytest.fixture(params=["exit status", "exception"])
def restarts(request, monkeypatch):
    calls: list[tuple[str, object]] = []

    def gave_up(argv):
        calls.append(("worker_main", argv))
        if request.param == "exception":
            raise RuntimeError("kombu could not requeue the unacked messages")
        return 70  # what Celery's worker command returns after "Unrecoverable error" (EX_SOFTWARE)

    def execv(executable, argv):
        calls.append(("execv", argv))
        raise Restarted

    monkeypatch.setenv("REMAP_SIGTERM", "SIGQUIT")  # what cmd_worker sets, undone after the test
    monkeypatch.setattr(cli, "run_celery", lambda app_, argv: gave_up(argv))
    # lifecycle's own clock, not the time module's sleep: other threads of this process (the deadline monitor,
    # lease renewers) sleep too
    pause = types.SimpleNamespace(sleep=lambda seconds: calls.append(("sleep", seconds)))
    monkeypatch.setattr(lifecycle, "time", pause)
    monkeypatch.setattr(lifecycle.os, "execv", execv)
    monkeypatch.setattr(cli.sys, "argv", ["omniq", "worker", "--queue", "media", "--concurrency", "1"])
    return calls


def test_the_worker_starts_again_after_a_pause_that_grows(restarts, monkeypatch, capsys):
    monkeypatch.setenv("OMNIQ_WORKER_RESTARTS", "2")
    with pytest.raises(Restarted):
        cli.main(["worker", "--queue", "media", "--concurrency", "1"])
    kinds = [kind for kind, _ in restarts]
    assert kinds == ["worker_main", "sleep", "execv"]
    assert restarts[1][1] == 8.0  # 2 s, 4 s, 8 s ... at most 30 s
    assert restarts[2][1][1:] == ["-m", "workers.cli", "worker", "--queue", "media", "--concurrency", "1"]
    assert cli.os.environ["OMNIQ_WORKER_RESTARTS"] == "3"
    assert "stopped unexpectedly" in capsys.readouterr().err


def test_the_pause_is_capped(restarts, monkeypatch):
    monkeypatch.setenv("OMNIQ_WORKER_RESTARTS", "9")
    with pytest.raises(Restarted):
        cli.main(["worker", "--queue", "media", "--concurrency", "1"])
    assert ("sleep", 30.0) in restarts


def test_a_worker_asked_to_stop_is_not_started_again(restarts, monkeypatch):
    monkeypatch.delenv("OMNIQ_WORKER_RESTARTS", raising=False)
    lifecycle._shutdown_requested.set()
    try:
        code = cli.main(["worker", "--queue", "media", "--concurrency", "1"])
    finally:
        lifecycle._shutdown_requested.clear()
    assert [kind for kind, _ in restarts] == ["worker_main"] and code != 0


def test_a_worker_whose_model_call_hung_starts_again_without_the_hang_that_fired(restarts, monkeypatch, capsys):
    """``workers.reliability.deadlines`` asked for the restart (and sent the cold shutdown, here Celery's return): the worker
    starts again in place, and a failpoint hang that fired is not armed in the new process."""
    from pipeline import failpoints

    monkeypatch.delenv("OMNIQ_WORKER_RESTARTS", raising=False)
    monkeypatch.setenv("OMNIQ_FAILPOINTS", "gpu.generate=hang;infer.row=raise:chunk=1")

    def hung(app_, argv):  # the worker (which armed the failpoints) hung in its first generate, then stopped
        assert failpoints.armed("gpu.generate")
        return 0  # the cold shutdown's exit status

    monkeypatch.setattr(cli, "run_celery", hung)
    from workers.reliability import deadlines

    deadlines.RESTART.set()
    try:
        with pytest.raises(Restarted):
            cli.main(["worker", "--queue", "media", "--concurrency", "1"])
    finally:
        deadlines.RESTART.clear()
        failpoints.install("")
    assert [kind for kind, _ in restarts] == ["sleep", "execv"]
    assert cli.os.environ["OMNIQ_FAILPOINTS"] == "infer.row=raise:chunk=1"
    assert "a model call passed its deadline" in capsys.readouterr().err
