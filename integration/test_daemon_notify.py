"""The daemon under a real notify socket, as systemd runs it (Type=notify,
NotifyAccess=main, WatchdogSec=): the real daemon process sends its messages
to a datagram socket this test binds and names in $NOTIFY_SOCKET, and the
kernel's SCM_CREDENTIALS say which process sent each.

A wedged worker is made for real: the daemon's audit writer waits on the
audit log's flock with no deadline, so a process holding that lock (here,
the test) stops the worker in the middle of a reconcile.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import DaemonProc, audit_lines, wait_for, write_config
from integration.domains import IT_DOMAIN_PREFIX
from tests.hostguard import RUN_ID
from vmshare.daemon import wakeup

pytestmark = pytest.mark.integration
NAME = f"{IT_DOMAIN_PREFIX}ntf{RUN_ID}"
CRED = struct.Struct("3i")            # struct ucred: pid, uid, gid


@dataclass
class Message:
    at: float
    pid: int
    fields: dict[str, str]


@dataclass
class Listener:
    """A bound notify socket and what arrives on it, read by a thread.
    ``on_ready`` runs in that thread the moment READY=1 arrives."""

    sock: socket.socket
    on_ready: Callable[[], Any] | None = None
    messages: list[Message] = field(default_factory=list)
    ready_probe: list[Any] = field(default_factory=list)
    closed: bool = False

    def read(self) -> None:
        size = socket.CMSG_SPACE(CRED.size)
        while not self.closed:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, size)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((CRED.unpack(d[:CRED.size])[0] for lvl, typ, d in anc
                        if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), -1)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if "READY" in fields and self.on_ready is not None:
                self.ready_probe.append(self.on_ready())
            self.messages.append(Message(time.monotonic(), pid, fields))

    def having(self, key: str, after: float = 0.0) -> list[Message]:
        return [m for m in list(self.messages) if key in m.fields and m.at >= after]

    def wait(self, key: str, timeout: float, after: float = 0.0) -> Message:
        found: list[Message] = wait_for(lambda: self.having(key, after), timeout,
                                        lambda: f"no {key} in {self.messages[-10:]}", 0.05)
        return found[0]


@contextlib.contextmanager
def listening(address: str | bytes,
              on_ready: Callable[[], Any] | None = None) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.settimeout(0.2)
    listener = Listener(sock, on_ready)
    thread = threading.Thread(target=listener.read, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        listener.closed = True
        thread.join(2)
        sock.close()


def gaps(msgs: list[Message]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(msgs)]


def stop(d: DaemonProc) -> int:
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(timeout=30)
    d.kill()
    return code


def test_ready_after_the_socket_watchdog_status_and_stopping(tmp_path: Path) -> None:
    """No VM (a QMP glob that matches nothing): nothing on the host changes."""
    cfg = write_config(tmp_path, {}, qmp_globs=(f"{tmp_path}/none-*.qmp",))
    wake = tmp_path / "run" / "wake.sock"
    abstract = f"@vmshare-test-{uuid.uuid4().hex}"
    with listening(b"\0" + abstract[1:].encode(),
                   lambda: (wakeup.daemon_running(wake), (tmp_path / "spool").is_dir())) as ln:
        d = DaemonProc(cfg, tmp_path / "daemon.log", env={
            "NOTIFY_SOCKET": abstract, "WATCHDOG_USEC": "1000000"})
        try:
            ready = ln.wait("READY", 60)
            # probed by the listener thread the moment READY arrived
            assert ln.ready_probe == [(True, True)]
            assert ready.fields["READY"] == "1" and ready.pid == d.proc.pid
            assert ready.fields["STATUS"].startswith("watching 0 domains, last reconcile ")
            assert "ksm run=" in ready.fields["STATUS"]
            time.sleep(5)
            pings = ln.having("WATCHDOG", after=ready.at)
            assert all(m.fields["WATCHDOG"] == "1" and m.pid == d.proc.pid for m in pings)
            # every half timeout (0.5 s): never a gap systemd would act on (1 s)
            assert 8 <= len(pings) <= 12, gaps(pings)
            assert all(0.3 < g < 1.0 for g in gaps(pings)), gaps(pings)
            before = time.monotonic()
            assert stop(d) == 0
            bye = ln.wait("STOPPING", 5, after=before)
            assert bye.fields["STATUS"] == "stopping: SIGTERM" and bye.pid == d.proc.pid
            assert not ln.having("WATCHDOG", after=bye.at + 0.01)
            assert len(ln.having("READY")) == 1
        finally:
            d.kill()


def test_a_notify_socket_that_fails_costs_one_line(tmp_path: Path) -> None:
    """$NOTIFY_SOCKET naming nothing (the manager gone): the daemon serves and stops
    as usual, and warns once, not at every ping."""
    cfg = write_config(tmp_path, {}, qmp_globs=(f"{tmp_path}/none-*.qmp",))
    d = DaemonProc(cfg, tmp_path / "daemon.log", env={
        "NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "400000"})
    try:
        d.wait_log("running: ", 60)
        time.sleep(2)                               # about ten pings, all failing
        assert d.proc.poll() is None
        assert stop(d) == 0
        tries = [ln for ln in d.text().splitlines() if "cannot notify the service" in ln]
        assert len(tries) >= 4                      # it kept trying (DEBUG: --debug)
        assert [ln for ln in tries if " WARNING " in ln] == tries[:1], tries
        assert "stopped; outcomes" in d.text()
    finally:
        d.kill()


def paused_qemu(qemu_launcher: Callable[[list[str]], Any], sock_dir: Path, name: str) -> None:
    """A QEMU whose RAM is not mergeable (mem-merge=off), stopped before its first
    instruction (-S): a VM for the daemon to act on, with no guest to boot."""
    from vmshare.guest.launch import QEMU_BINARY
    qemu_launcher([QEMU_BINARY, "-S", "-name", name, "-accel", "tcg",
                   "-machine", "pc,mem-merge=off", "-m", "64", "-nodefaults",
                   "-no-user-config", "-display", "none",
                   "-qmp", f"unix:{sock_dir / name}.qmp,server=on,wait=off"])


@contextlib.contextmanager
def audit_lock_held(audit: Path) -> Iterator[None]:
    """Another process holding the audit log's flock and never letting go: the
    daemon's next audited change waits on it without a deadline."""
    fd = os.open(audit, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wait_stalled(ln: Listener, d: DaemonProc, after: float) -> Message:
    found: Message = wait_for(
        lambda: next((m for m in ln.having("STATUS", after)
                      if "not feeding the watchdog" in m.fields["STATUS"]), None), 30,
        lambda: f"no stall STATUS: {ln.messages[-5:]}\n{d.text()[-2000:]}")
    return found


def test_a_wedged_worker_stops_the_watchdog(tmp_path: Path,
                                            qemu_launcher: Callable[[list[str]], Any]) -> None:
    """Wedged, the pings stop at half the timeout; unwedged, they resume; wedged
    again and sent systemd's WatchdogSignal (SIGABRT), the daemon dies with every
    thread's traceback in its log, the stuck flock among them."""
    names = [f"{NAME}-a", f"{NAME}-b"]
    cfg = write_config(tmp_path, dict.fromkeys(names, "on"), qmp_globs=(f"{tmp_path}/*.qmp",))
    audit = tmp_path / "audit.jsonl"
    notify = tmp_path / "notify.sock"
    env = {"NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000",
           "VMSHARE_CONTROL_LOCK": str(tmp_path / "control.lock")}
    with listening(str(notify)) as ln:
        d = DaemonProc(cfg, tmp_path / "daemon.log", env=env)
        try:
            ready = ln.wait("READY", 60)
            ln.wait("WATCHDOG", 5, after=ready.at + 1.5)
            with audit_lock_held(audit):
                paused_qemu(qemu_launcher, tmp_path, names[0])
                stuck = wait_stalled(ln, d, ready.at)
                time.sleep(4)                       # two timeouts' worth
                assert not ln.having("WATCHDOG", after=stuck.at - 0.01)
                last = ln.having("WATCHDOG")[-1]
                assert stuck.at - last.at < 2.0 + 0.5   # it stopped at the half timeout
                assert d.proc.poll() is None          # alive: systemd would kill it now
                assert "not feeding the watchdog" in d.text()
                freed = time.monotonic()
            ln.wait("WATCHDOG", 10, after=freed)
            wait_for(lambda: [r for r in audit_lines(audit) if r.get("vm") == names[0]], 30,
                     lambda: f"no audit record for {names[0]}:\n{d.text()[-2000:]}")
            wait_for(lambda: "watching 1 domain," in ln.having("STATUS")[-1].fields["STATUS"],
                     30, lambda: f"STATUS: {ln.messages[-3:]}")
            with audit_lock_held(audit):
                paused_qemu(qemu_launcher, tmp_path, names[1])
                wait_stalled(ln, d, time.monotonic())
                d.proc.send_signal(signal.SIGABRT)  # what systemd sends when it expires
                assert d.proc.wait(timeout=30) == -signal.SIGABRT
            log = d.text()
            assert "most recent call first" in log and "append_line" in log, log[-3000:]
        finally:
            d.kill()
