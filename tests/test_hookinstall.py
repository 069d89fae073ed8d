"""Installing the hook as a qemu.d drop-in, its status, and the libvirtd restart helper.

Everything runs in temporary directories. libvirtd is played by fake
processes named "fake-libvirtd" found through a temporary pidfile with the
/proc scan switched off, so the real libvirtd (which other tests use) is
never looked at, let alone signalled.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmshare.errors import AccessDenied, DeadlineExceeded, HypervisorError, VmshareError
from vmshare.hook import install as hookinstall
from vmshare.hook.install import HookInstallError

from .test_hook import HOOK

FAKE = "fake-libvirtd"


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "libvirt" / "hooks"


def test_install_into_a_fresh_host(hooks_dir: Path) -> None:
    old = os.umask(0o077)  # the directories must still be 0755
    try:
        result = hookinstall.install(hooks_dir, source=HOOK)
    finally:
        os.umask(old)
    target = hooks_dir / "qemu.d" / "vmshare"
    assert result.path == target and result.action == "installed"
    assert target.read_bytes() == HOOK.read_bytes()
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE((hooks_dir / "qemu.d").stat().st_mode) == 0o755
    assert stat.S_IMODE(hooks_dir.stat().st_mode) == 0o755
    assert sorted(p.name for p in hooks_dir.iterdir()) == ["qemu.d"]  # no temp file left
    assert result.status.state == "installed"
    assert hookinstall.install(hooks_dir, source=HOOK).action == "unchanged"


def test_install_keeps_other_hooks(hooks_dir: Path) -> None:
    qemu_d = hooks_dir / "qemu.d"
    qemu_d.mkdir(parents=True)
    other = qemu_d / "10-admin"
    other.write_text("#!/bin/sh\nexit 0\n")
    other.chmod(0o750)
    main = hooks_dir / "qemu"
    main.write_text("#!/bin/sh\n# the administrator's monolithic hook\n")
    main.chmod(0o700)
    before = {p: (p.read_bytes(), p.stat()) for p in (other, main)}
    result = hookinstall.install(hooks_dir, source=HOOK)
    for path, (content, st) in before.items():
        now = path.stat()
        assert path.read_bytes() == content
        assert (now.st_ino, now.st_mode, now.st_mtime_ns) == (st.st_ino, st.st_mode,
                                                              st.st_mtime_ns)
    assert result.status.other_scripts == ("10-admin",)
    assert result.status.monolithic_hook
    hookinstall.uninstall(hooks_dir)
    assert other.exists() and main.exists() and qemu_d.is_dir()


def test_outdated_copy_is_reported_and_updated(hooks_dir: Path) -> None:
    hookinstall.install(hooks_dir, source=HOOK)
    target = hooks_dir / "qemu.d" / "vmshare"
    target.write_bytes(HOOK.read_bytes() + b"# an older release\n")
    assert hookinstall.status(hooks_dir, HOOK, scan_proc=False,
                              pidfile=hooks_dir / "none.pid").state == "outdated"
    inode = target.stat().st_ino
    assert hookinstall.install(hooks_dir, source=HOOK).action == "updated"
    assert target.read_bytes() == HOOK.read_bytes()
    assert target.stat().st_ino != inode  # replaced by rename, never rewritten in place


def test_foreign_file_is_never_replaced_or_removed(hooks_dir: Path) -> None:
    qemu_d = hooks_dir / "qemu.d"
    qemu_d.mkdir(parents=True)
    foreign = qemu_d / "vmshare"
    foreign.write_text("#!/bin/sh\n# somebody else's script that happens to be called vmshare\n")
    with pytest.raises(HookInstallError, match="not installed by vmshare"):
        hookinstall.install(hooks_dir, source=HOOK)
    with pytest.raises(HookInstallError, match="refusing to remove"):
        hookinstall.uninstall(hooks_dir)
    assert "somebody else's" in foreign.read_text()
    assert hookinstall.status(hooks_dir, HOOK, scan_proc=False,
                              pidfile=hooks_dir / "none.pid").state == "foreign"


def test_uninstall_removes_only_ours(hooks_dir: Path) -> None:
    assert not hookinstall.uninstall(hooks_dir).removed  # nothing there: not an error
    hookinstall.install(hooks_dir, source=HOOK)
    result = hookinstall.uninstall(hooks_dir)
    assert result.removed and not result.path.exists()
    assert hookinstall.status(hooks_dir, HOOK, scan_proc=False,
                              pidfile=hooks_dir / "none.pid").state == "missing"


def test_source_must_be_the_vmshare_hook(tmp_path: Path, hooks_dir: Path) -> None:
    fake = tmp_path / "not-our-hook"
    fake.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(HookInstallError, match="not the vmshare hook"):
        hookinstall.install(hooks_dir, source=fake)
    with pytest.raises(HookInstallError, match="not found"):
        hookinstall.install(hooks_dir, source=tmp_path / "absent")
    assert not (hooks_dir / "qemu.d" / "vmshare").exists()


def test_shipped_hook_default_is_the_repository_copy() -> None:
    assert hookinstall.SHIPPED_HOOK == HOOK
    assert hookinstall.MARKER in HOOK.read_bytes().splitlines()[1]


def test_errors_are_vmshare_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "hooks"
    blocker.write_text("")
    with pytest.raises(VmshareError):
        hookinstall.install(blocker, source=HOOK)
    assert issubclass(HookInstallError, VmshareError)
    assert issubclass(AccessDenied, VmshareError)


# --- status against a fake /proc: deterministic start times --------------------------------

def _fake_proc(tmp_path: Path, started_ago: float | None, comm: str = "libvirtd",
               zombie: bool = False) -> Path:
    """A /proc booted 1000 s ago with, optionally, pid 4242 started started_ago seconds ago
    (a zombie, as the kernel shows one: state Z, an empty command line)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    boot = time.time() - 1000.0
    (proc / "boot-epoch").write_text(repr(boot))  # read back by _status to refresh uptime
    if started_ago is not None:
        ticks = int((1000.0 - started_ago) * os.sysconf("SC_CLK_TCK"))
        (proc / "4242").mkdir()
        (proc / "4242" / "comm").write_text(comm + "\n")
        (proc / "4242" / "cmdline").write_bytes(b"" if zombie else comm.encode() + b"\0-d\0")
        fields = ["Z" if zombie else "S", "1"] + ["0"] * 17 + [str(ticks)] + ["0"] * 30
        (proc / "4242" / "stat").write_text(f"4242 ({comm}) " + " ".join(fields) + "\n")
    (tmp_path / "libvirtd.pid").write_text("4242\n")
    return proc


def _status(hooks_dir: Path, proc: Path) -> hookinstall.HookStatus:
    uptime = time.time() - float((proc / "boot-epoch").read_text())
    (proc / "uptime").write_text(f"{uptime:.2f} 0.00\n")
    return hookinstall.status(hooks_dir, HOOK, pidfile=proc.parent / "libvirtd.pid", proc=proc)


def test_status_when_libvirtd_started_before_the_hook(tmp_path: Path, hooks_dir: Path) -> None:
    hookinstall.install(hooks_dir, source=HOOK)
    proc = _fake_proc(tmp_path, started_ago=600)
    st = _status(hooks_dir, proc)
    assert st.libvirtd.running and st.libvirtd.pid == 4242
    assert st.libvirtd.started_at == pytest.approx(time.time() - 600, abs=2)
    assert st.restart_needed
    assert any(hookinstall.RESTART_MESSAGE in m for m in st.messages)


def test_status_when_libvirtd_started_after_the_hook(tmp_path: Path, hooks_dir: Path) -> None:
    hookinstall.install(hooks_dir, source=HOOK)
    hour_ago = time.time() - 3600
    os.utime(hooks_dir / "qemu.d" / "vmshare", (hour_ago, hour_ago))
    # ctime cannot be set back; so start libvirtd "in the future" relative to the file
    proc = _fake_proc(tmp_path, started_ago=-5)
    st = _status(hooks_dir, proc)
    assert st.libvirtd.running and not st.restart_needed
    assert not any(hookinstall.RESTART_MESSAGE in m for m in st.messages)


def test_status_when_another_qemu_hook_was_loaded_at_start(tmp_path: Path,
                                                           hooks_dir: Path) -> None:
    # libvirtd found a qemu hook when it started, so it re-reads qemu.d on every call
    qemu_d = hooks_dir / "qemu.d"
    qemu_d.mkdir(parents=True)
    (qemu_d / "10-admin").write_text("#!/bin/sh\n")
    (qemu_d / "10-admin").chmod(0o755)
    proc = _fake_proc(tmp_path, started_ago=-0.6)  # started just after 10-admin was written
    time.sleep(1.3)
    hookinstall.install(hooks_dir, source=HOOK)
    assert not _status(hooks_dir, proc).restart_needed
    (qemu_d / "10-admin").chmod(0o644)  # not executable: libvirt would not have seen it
    assert _status(hooks_dir, proc).restart_needed


def test_status_when_libvirtd_is_not_running(tmp_path: Path, hooks_dir: Path) -> None:
    hookinstall.install(hooks_dir, source=HOOK)
    for sub in "abc":
        (tmp_path / sub).mkdir()
    no_process = _fake_proc(tmp_path / "a", started_ago=None)
    pid_reused = _fake_proc(tmp_path / "b", started_ago=60, comm="bash")
    zombie = _fake_proc(tmp_path / "c", started_ago=60, zombie=True)
    for proc in (no_process, pid_reused, zombie):
        st = _status(hooks_dir, proc)
        assert not st.libvirtd.running and not st.restart_needed
        assert any("not running" in m for m in st.messages)


# --- restart and reload against real fake daemons ----------------------------------------

FAKE_DAEMON = r"""
import ctypes, os, signal, sys, time
pidfile, log, ignore_term = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if os.fork():        # like libvirtd -d: the command returns once the daemon is set up
    time.sleep(0.3)
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
ctypes.CDLL(None).prctl(15, b"fake-libvirtd", 0, 0, 0)  # PR_SET_NAME
def note(what):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {what}\n")
def on_term(signum, frame):
    note("TERM")
    os._exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else on_term)
signal.signal(signal.SIGHUP, lambda s, f: note("HUP"))
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.rename(pidfile + ".tmp", pidfile)
note("START")
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


class FakeLibvirtd:
    def __init__(self, tmp: Path, ignore_term: bool = False) -> None:
        self.script = tmp / "fake_libvirtd.py"
        self.script.write_text(FAKE_DAEMON)
        self.pidfile = tmp / "fake-libvirtd.pid"
        self.log = tmp / "fake-libvirtd.log"
        self.ignore_term = ignore_term

    @property
    def start_cmd(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.pidfile), str(self.log),
                "1" if self.ignore_term else "0"]

    def start(self) -> int:
        subprocess.run(self.start_cmd, check=True, timeout=10)
        return int(self.pidfile.read_text())

    def notes(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def kill_all(self) -> None:
        for line in self.notes():
            pid = int(line.split()[0])
            if (Path("/proc") / str(pid) / "comm").exists():
                try:
                    if (Path("/proc") / str(pid) / "comm").read_text().strip() == FAKE:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeLibvirtd]:
    daemon = FakeLibvirtd(tmp_path)
    yield daemon
    daemon.kill_all()


def test_restart_stops_starts_and_waits_for_an_answer(tmp_path: Path,
                                                      fake: FakeLibvirtd) -> None:
    old_pid = fake.start()
    # the probe answers only once the new daemon has written its pidfile
    probe = [sys.executable, "-c",
             f"import os,sys; p=int(open({str(fake.pidfile)!r}).read());"
             f"sys.exit(0 if p != {old_pid} and os.path.exists(f'/proc/{{p}}') else 1)"]
    result = hookinstall.restart_libvirtd(pidfile=fake.pidfile, scan_proc=False, comm=FAKE,
                                          start_cmd=fake.start_cmd, probe_cmd=probe,
                                          stop_timeout=5, start_timeout=10)
    assert result.old_pid == old_pid
    assert result.new_pid is not None and result.new_pid != old_pid
    assert f"{old_pid} TERM" in fake.notes()
    assert f"{result.new_pid} START" in fake.notes()
    assert not Path(f"/proc/{old_pid}/comm").exists() or \
        Path(f"/proc/{old_pid}/comm").read_text().strip() != FAKE or \
        Path(f"/proc/{old_pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"


def test_restart_gives_up_on_a_daemon_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = FakeLibvirtd(tmp_path, ignore_term=True)
    try:
        pid = stubborn.start()
        with pytest.raises(DeadlineExceeded, match="did not stop"):
            hookinstall.restart_libvirtd(pidfile=stubborn.pidfile, scan_proc=False, comm=FAKE,
                                         start_cmd=stubborn.start_cmd, probe_cmd=["true"],
                                         stop_timeout=0.5)
        assert Path(f"/proc/{pid}").exists()
    finally:
        stubborn.kill_all()


def test_restart_reports_a_daemon_that_never_answers(tmp_path: Path, fake: FakeLibvirtd) -> None:
    with pytest.raises(DeadlineExceeded, match="did not answer"):
        hookinstall.restart_libvirtd(pidfile=fake.pidfile, scan_proc=False, comm=FAKE,
                                     start_cmd=fake.start_cmd, probe_cmd=["false"],
                                     start_timeout=0.5)


def test_restart_reports_a_failing_start(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="no such option"):
        hookinstall.restart_libvirtd(pidfile=tmp_path / "none.pid", scan_proc=False, comm=FAKE,
                                     start_cmd=["sh", "-c", "echo 'no such option' >&2; exit 3"],
                                     probe_cmd=["true"])
    with pytest.raises(HypervisorError, match="cannot run"):
        hookinstall.restart_libvirtd(pidfile=tmp_path / "none.pid", scan_proc=False, comm=FAKE,
                                     start_cmd=[str(tmp_path / "no-libvirtd")],
                                     probe_cmd=["true"])


def test_reload_sends_sighup(fake: FakeLibvirtd) -> None:
    pid = fake.start()
    assert hookinstall.reload_libvirtd(fake.pidfile, scan_proc=False, comm=FAKE) == pid
    deadline = time.monotonic() + 5
    while f"{pid} HUP" not in fake.notes():
        assert time.monotonic() < deadline, fake.notes()
        time.sleep(0.02)
    assert Path(f"/proc/{pid}").exists()  # reloaded, not stopped


def test_reload_without_libvirtd(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="not running"):
        hookinstall.reload_libvirtd(tmp_path / "none.pid", scan_proc=False, comm=FAKE)
