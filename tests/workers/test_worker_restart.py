"""``omniq worker`` starts itself again when Celery stops on its own (it gives up on some broker errors, e.g.
"Unrecoverable error" while Redis restarts: the worker stops and Celery's command returns its exit status), with
a pause that grows with each restart, and never when it was asked to stop. Celery giving up cannot be caused on
demand, so ``run_celery`` returns that status (or raises) here; the restart itself (``os.execv``) is recorded
instead of replacing the test process. The fault suite's Redis restarts exercise the real thing."""

from __future__ import annotations

import pytest

from workers import cli, lifecycle


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
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: calls.append(("sleep", seconds)))
    monkeypatch.setattr(cli.os, "execv", execv)
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
