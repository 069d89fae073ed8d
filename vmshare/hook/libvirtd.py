"""libvirtd as a process, for hosts without systemd: find it, reload it, restart it.

libvirtd reads its hooks when it starts (and on SIGHUP); `vmshare hook
install --restart-libvirtd` uses these. Nothing here prints; every function
returns a result or raises a vmshare.errors.VmshareError.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmshare.errors import AccessDenied, DeadlineExceeded, HypervisorError, VmshareError
from vmshare.ksm.procfs import PROC_ROOT, ProcFs

LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
PROC = Path(PROC_ROOT)


@dataclass(frozen=True)
class LibvirtdState:
    """Whether libvirtd runs, its pid, and when it started (epoch seconds)."""

    running: bool
    pid: int | None = None
    started_at: float | None = None


@dataclass(frozen=True)
class RestartResult:
    old_pid: int | None
    new_pid: int | None
    seconds: float


def _started_at(procfs: ProcFs, pid: int, comm: str) -> float | None:
    """Epoch seconds at which ``pid`` started, if it is a live process named ``comm``.

    None for no such process, another name, or a zombie (which a daemon killed
    while its parent does not reap stays): a zombie's memory, and with it its
    command line, is gone, while every live libvirtd has one.
    """
    try:
        if procfs.comm(pid) != comm or not procfs.cmdline(pid):
            return None
        ticks = procfs.start_time(pid)
        boot = procfs.boot_time()
    except VmshareError:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def libvirtd_state(pidfile: Path = LIBVIRTD_PIDFILE, proc: Path = PROC, *,
                   scan_proc: bool = True, comm: str = "libvirtd") -> LibvirtdState:
    """Find the running libvirtd: the pidfile's pid if its comm is ``comm``, else
    (with ``scan_proc``) the lowest such pid in ``proc``."""
    procfs = ProcFs(proc)
    candidates: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        candidates.append(int(pidfile.read_text().strip()))
    if scan_proc:
        with contextlib.suppress(OSError):
            candidates += procfs.pids_named(comm)
    for pid in candidates:
        started = _started_at(procfs, pid, comm)
        if started is not None:
            return LibvirtdState(True, pid, started)
    return LibvirtdState(False)


def reload_libvirtd(pidfile: Path = LIBVIRTD_PIDFILE, proc: Path = PROC, *,
                    scan_proc: bool = True, comm: str = "libvirtd") -> int:
    """Send SIGHUP to libvirtd, which makes it look for hooks again; return its pid.

    Raises HypervisorError if libvirtd is not running; AccessDenied without
    the privilege to signal it.
    """
    daemon = libvirtd_state(pidfile, proc, scan_proc=scan_proc, comm=comm)
    if daemon.pid is None:
        raise HypervisorError("libvirtd is not running")
    try:
        os.kill(daemon.pid, signal.SIGHUP)
    except PermissionError as exc:
        raise AccessDenied(f"cannot signal libvirtd (pid {daemon.pid})") from exc
    except ProcessLookupError as exc:
        raise HypervisorError(f"libvirtd (pid {daemon.pid}) exited") from exc
    return daemon.pid


def restart_libvirtd(*, pidfile: Path = LIBVIRTD_PIDFILE, proc: Path = PROC,
                     scan_proc: bool = True, comm: str = "libvirtd",
                     start_cmd: Sequence[str] = ("libvirtd", "-d"),
                     probe_cmd: Sequence[str] = ("virsh", "-c", "qemu:///system", "version"),
                     stop_timeout: float = 30.0, start_timeout: float = 30.0) -> RestartResult:
    """Stop libvirtd (SIGTERM, wait), start ``libvirtd -d``, wait until it answers.

    For hosts without systemd, where libvirtd was started by hand. Running
    domains keep running: libvirtd reconnects to them (and calls the hook
    with ``reconnect begin``).

    Raises DeadlineExceeded if libvirtd does not stop or answer in time,
    HypervisorError if it cannot be started, AccessDenied without privilege.
    """
    began = time.monotonic()
    old = libvirtd_state(pidfile, proc, scan_proc=scan_proc, comm=comm)
    if old.pid is not None:
        try:
            os.kill(old.pid, signal.SIGTERM)
        except PermissionError as exc:
            raise AccessDenied(f"cannot signal libvirtd (pid {old.pid})") from exc
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + stop_timeout
        procfs = ProcFs(proc)
        while _started_at(procfs, old.pid, comm) is not None:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"libvirtd (pid {old.pid}) did not stop within {stop_timeout:.0f} s")
            time.sleep(0.05)
    _run_start(start_cmd, start_timeout)
    deadline = time.monotonic() + start_timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"libvirtd did not answer within {start_timeout:.0f} s "
                                   f"of starting ({' '.join(probe_cmd)})")
        try:
            answered = subprocess.run(list(probe_cmd), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      timeout=min(left, 10.0), check=False).returncode == 0
        except subprocess.TimeoutExpired:
            answered = False
        except OSError as exc:
            raise HypervisorError(f"cannot run {probe_cmd[0]}: {exc.strerror}") from exc
        if answered:
            break
        time.sleep(0.1)
    new = libvirtd_state(pidfile, proc, scan_proc=scan_proc, comm=comm)
    return RestartResult(old.pid, new.pid, time.monotonic() - began)


def _run_start(start_cmd: Sequence[str], timeout: float) -> None:
    # stdout/stderr go to a file, not a pipe: the daemonized child may keep a
    # pipe open forever and make us wait for an EOF that never comes.
    with tempfile.TemporaryFile() as errors:
        try:
            done = subprocess.run(list(start_cmd), stdin=subprocess.DEVNULL,
                                  stdout=errors, stderr=errors, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DeadlineExceeded(f"{' '.join(start_cmd)} did not return within "
                                   f"{timeout:.0f} s") from exc
        except OSError as exc:
            raise HypervisorError(f"cannot run {start_cmd[0]}: {exc.strerror}") from exc
        if done.returncode != 0:
            errors.seek(0)
            tail = errors.read(4096).decode("utf-8", "replace").strip().splitlines()
            reason = tail[-1] if tail else f"exit status {done.returncode}"
            raise HypervisorError(f"{' '.join(start_cmd)} failed: {reason}")
