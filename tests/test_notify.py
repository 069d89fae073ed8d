"""sd_notify spoken directly (vmshare.daemon.notify) and the watchdog's rule
(vmshare.daemon.liveness), against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshare.daemon import notify
from vmshare.daemon.liveness import Liveness, keep_alive
from vmshare.daemon.notify import Notifier, parse_address, status_field, watchdog_seconds
from vmshare.daemon.reconcile import Outcome


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


def test_addresses() -> None:
    assert parse_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_address("@sd-notify/x") == b"\0sd-notify/x"
    for unsupported in ("", "@", "relative/path", "vsock:2:1234"):
        assert parse_address(unsupported) is None


def test_unset_environment_is_silent_and_cleared() -> None:
    env = {"WATCHDOG_USEC": "1000000", "PATH": "/bin"}
    n = Notifier.from_env(env, pid=42)
    assert not n.enabled and n.watchdog is None
    assert n.send("READY=1") is False and n.ready("x") is False
    assert env == {"PATH": "/bin"}


def test_env_is_read_and_taken_out(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42", "X": "1"}
    n = Notifier.from_env(env, pid=42)
    assert n.enabled and n.watchdog == 3.0
    assert env == {"X": "1"}
    assert n.ready("up") and n.ping() and n.stopping("bye")
    assert [sock.recv(4096).decode() for _ in range(3)] == [
        "READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1\nSTATUS=bye"]
    assert n.sent == 3


def test_abstract_socket() -> None:
    name = f"vmshare-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.status("watching 2 domains")
        assert sock.recv(4096) == b"STATUS=watching 2 domains"
    finally:
        sock.close()


@pytest.mark.parametrize(("env", "want"), [
    ({"WATCHDOG_USEC": "500000"}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "7"}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "8"}, None),   # another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_timeout(env: dict[str, str], want: float | None) -> None:
    assert watchdog_seconds(env, 7) == want


def test_status_stays_one_field() -> None:
    # a domain name may hold a newline; it must not start a forged READY=1 line
    assert status_field("vm\nREADY=1") == "STATUS=vm READY=1"
    assert len(status_field("x" * 10_000)) == len("STATUS=") + notify.MAX_STATUS


def test_send_failure_never_raises_and_logs_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gone.sock"
    n = Notifier(str(path), watchdog=1.0)
    with caplog.at_level(logging.DEBUG, logger="vmshare.daemon.notify"):
        assert n.ping() is False
        assert n.ping() is False
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        try:
            assert n.ping() is True
            assert sock.recv(100) == b"WATCHDOG=1"
        finally:
            sock.close()
    assert any("again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_full_receiver_never_blocks_the_sender(
        receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = Notifier(path)
    results = [n.status("x" * 200) for _ in range(5_000)]
    assert results[0] is True
    assert results[-1] is False          # EAGAIN: dropped, not waited for
    assert len(drain(sock)) == results.count(True)


def run_keep_alive(n: Notifier, live: Liveness, seconds: float) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stop.set)
        await keep_alive(n, live, lambda: "fine", stop)
    asyncio.run(main())


def test_pings_at_half_the_timeout_while_the_worker_is_free(
        receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    run_keep_alive(Notifier(path, watchdog=0.4), Liveness(), 1.0)
    got = drain(sock)
    assert got[:2] == ["WATCHDOG=1", "STATUS=fine"] and got.count("STATUS=fine") == 1
    assert 3 <= got.count("WATCHDOG=1") <= 6    # every 0.2 s for 1 s


def test_a_stuck_worker_step_stops_the_pings(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    ages = iter([0.15] + [0.15 + 0.2 * i for i in range(1, 100)])
    live = Liveness(clock=lambda: next(ages), busy_since=0.0)   # one step, 0.15 s in
    run_keep_alive(Notifier(path, watchdog=0.4), live, 1.0)
    got = drain(sock)
    assert got[:2] == ["WATCHDOG=1", "STATUS=fine"]   # 0.15 s < half the timeout: alive
    assert got.count("WATCHDOG=1") == 1
    assert got[-1].startswith("STATUS=not feeding the watchdog: one worker step has run ")


def test_no_watchdog_means_status_only(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    live = Liveness()
    live.busy_since = live.clock() - 1000.0
    run_keep_alive(Notifier(path), live, 0.3)
    assert drain(sock) == ["STATUS=fine"]


def test_timed_steps_and_the_summary() -> None:
    clock = iter([10.0, 10.5])
    live = Liveness(clock=lambda: next(clock))
    assert live.timed(lambda: live.busy_since)() == 10.0
    assert live.busy_since is None
    assert live.summary() == "starting: no reconcile yet"

    outcomes = [Outcome("a", "changed"), Outcome("b", "unchanged"), Outcome("c", "changed")]
    assert live.reconciled(outcomes) == 2
    assert live.summary().startswith("watching 3 domains, last reconcile ")
    assert live.summary().endswith(" (2 changed)")
    calls: list[int] = []
    live.on_ready = lambda: calls.append(os.getpid())
    live.mark_ready()
    live.mark_ready()
    assert len(calls) == 1


def test_the_status_line_of_a_daemon(tmp_path: Path) -> None:
    from tests.fakes.hypervisor import FakeHypervisor
    from tests.ksmtree import make_sysfs
    from vmshare.config import Config, DaemonSettings
    from vmshare.daemon.reconcile import Reconciler
    from vmshare.daemon.runner import Daemon, DaemonOptions
    from vmshare.daemon.service import daemon_status
    from vmshare.daemon.state import StateStore
    from vmshare.ksm.procfs import ProcFs
    from vmshare.ksm.sysfs import KsmSysfs

    config = Config(path=None, daemon=DaemonSettings(history_file=tmp_path / "h.jsonl"))
    d = Daemon(DaemonOptions(config=config, uri="qemu:///system"))
    assert daemon_status(d) == "starting: connecting to qemu:///system"
    sysfs = KsmSysfs(make_sysfs(tmp_path / "ksm"))
    d.reconciler = Reconciler(FakeHypervisor([]), config,
                              state=StateStore(tmp_path / "state.json"),
                              audit_path=tmp_path / "audit.jsonl",
                              procfs=ProcFs(tmp_path), sysfs=sysfs)
    d.connected.set()
    assert daemon_status(d) == "starting: no reconcile yet, ksm run=0"
    d.live.reconciled([Outcome("a", "changed")])
    (tmp_path / "ksm" / "run").write_text("1\n")
    assert daemon_status(d).startswith("watching 1 domain, last reconcile ")
    assert daemon_status(d).endswith(" (1 changed), ksm run=1")
    (tmp_path / "ksm" / "run").unlink()
    assert daemon_status(d).endswith(", ksm run=?")
    d.live.mark_ready()
    d.connected.clear()
    assert daemon_status(d) == "connection to qemu:///system lost; reconnecting"
    d.pool.shutdown()
