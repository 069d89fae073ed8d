"""The daemon's background tasks are supervised; its start refuses an unsafe spool
and a second drainer (issue 12 defects 1, 5, 6)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from vmshare.config import Config, DaemonSettings
from vmshare.daemon import supervisor as sup
from vmshare.daemon import wakeup
from vmshare.daemon.runner import Daemon, DaemonOptions
from vmshare.daemon.spool import SpoolError


def test_a_dying_task_is_restarted_loudly(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise ValueError("poison")

    async def main() -> sup.Supervisor:
        s = sup.Supervisor(restart_delay=0.0)
        await s.run("periodic", flaky, asyncio.Event())
        return s

    with caplog.at_level(logging.ERROR, logger="vmshare.daemon"):
        s = asyncio.run(main())
    assert len(runs) == 3 and s.deaths == {"periodic": 2} and s.failed is None
    died = [r for r in caplog.records if "background task periodic died" in r.getMessage()]
    assert len(died) == 2 and all(r.exc_info for r in died)
    assert "restarting it" in died[0].getMessage()


def test_a_task_that_keeps_dying_stops_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    async def always() -> None:
        raise RecursionError("deep")

    async def main() -> tuple[sup.Supervisor, bool]:
        s = sup.Supervisor(restart_delay=0.0)
        stop = asyncio.Event()
        await asyncio.wait_for(s.run("periodic", always, stop), 5)
        return s, stop.is_set()

    s, stopped = asyncio.run(main())
    assert stopped and s.failed == "periodic" and s.deaths == {"periodic": sup.TASK_DEATHS}
    assert "stopping the daemon" in caplog.records[-1].getMessage()


def _daemon(tmp_path: Path, **opts: object) -> Daemon:
    settings = DaemonSettings(spool_dir=tmp_path / "spool", socket=tmp_path / "run" / "w.sock",
                              audit_log=tmp_path / "audit.jsonl",
                              state_file=tmp_path / "state.json",
                              history_file=tmp_path / "h.jsonl",
                              history_db=tmp_path / "h.sqlite")
    return Daemon(DaemonOptions(config=Config(path=None, daemon=settings), **opts))  # type: ignore[arg-type]


def test_once_refuses_beside_a_running_daemon(tmp_path: Path) -> None:
    running = wakeup.bind_wakeup_socket(tmp_path / "run" / "w.sock")
    try:
        d = _daemon(tmp_path, once=True)
        with pytest.raises(wakeup.DaemonRunning, match=r"a vmshare daemon is running .*--once "
                           "would take its spool entries"):
            asyncio.run(d.run(asyncio.Event()))
    finally:
        running.close()
    _daemon(tmp_path, once=True)._check_spool()     # a stale socket file is no daemon


def test_start_refuses_a_world_writable_spool(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool").chmod(0o1777)
    with pytest.raises(SpoolError, match="writable by others"):
        asyncio.run(_daemon(tmp_path).run(asyncio.Event()))
    assert (tmp_path / "spool").stat().st_mode & 0o7777 == 0o1777


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5", "1e308", "soon"])
def test_daemon_intervals_must_be_finite_and_in_range(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from vmshare.cli import main as cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["daemon", "--once", "--resync-interval", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--resync-interval" in err and value in err


def test_drain_spool_survives_a_bug_and_keeps_to_its_scope(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import json

    from vmshare.daemon import spool
    d = _daemon(tmp_path, domains=("web-*",))
    spool.ensure_spool_dir(tmp_path / "spool")
    for i, name in enumerate(["web-1", "db-1"]):
        (tmp_path / "spool" / f"{i}-1-x.json").write_text(json.dumps(
            {"v": 1, "domain": name, "uuid": None, "operation": "started",
             "sub_operation": "begin", "extra": "-", "time": 1.0, "seq": i}))
    d.drain_spool(None)
    assert [t.vm for t in [d.queue.get_nowait()]] == ["web-1"] and d.queue.empty()
    assert [p.name for p in (tmp_path / "spool").iterdir()] == ["1-1-x.json"]

    def broken(*args: object, **kw: object) -> list[object]:
        raise RuntimeError("a bug")
    monkeypatch.setattr(spool, "drain", broken)
    with caplog.at_level(logging.ERROR, logger="vmshare.daemon"):
        d.drain_spool(None)                        # logged loudly, not raised
    assert "internal error draining the hook spool; still serving" in caplog.text
