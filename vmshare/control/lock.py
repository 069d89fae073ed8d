"""One lock per host around every act on KSM state: `enable`, `disable`,
`policy set`, `ksm start|stop|unmerge|set`, each step of `tune`, and the
daemon's reconcile of each VM.

Two acts at once (two shells, or a shell beside the daemon) would each read
"before", act, verify and audit with the other's change in between: a
knob set back by a stale rollback, a verification that sees the other's
state, an audit record whose "before" never existed. Under the lock the
outcome is one of the serial orders, each act audited once, the knobs ending
as the last act left them.

The lock is an exclusive flock(2) on /run/vmshare/control.lock ($VMSHARE_
CONTROL_LOCK for tests or a second instance), so the kernel drops it when
its holder dies, however it dies. The holder writes its pid and what it does
into the file and unlinks the file as it lets go (waiters then re-open the
path and lock the new file, the usual flock-and-unlink pattern), so nothing
is left behind. A waiter gives up after a bounded wait with an error naming
the holder. Within one process the lock is re-entrant for the thread that holds it
and other threads wait their turn, so an act may call another act's code.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vmshare.errors import AccessDenied, VmshareError

CONTROL_LOCK = Path("/run/vmshare/control.lock")
CONTROL_LOCK_ENV = "VMSHARE_CONTROL_LOCK"
DEFAULT_WAIT = 30.0        # seconds: several acts' worth of libvirt/QMP deadlines
_POLL_SECONDS = 0.02


class ControlLockError(VmshareError):
    """The host's control lock cannot be made or taken."""


class ControlBusy(ControlLockError):
    """Another act held the host's control lock for longer than the wait."""

    exit_code = 75         # EX_TEMPFAIL: the same command may well work in a moment


def control_lock_path() -> Path:
    return Path(os.environ.get(CONTROL_LOCK_ENV, str(CONTROL_LOCK)))


_threads = threading.RLock()              # one thread of this process at a time
_held: dict[Path, list[int]] = {}         # path -> [fd, depth], under _threads


@contextlib.contextmanager
def control_lock(what: str, *, path: Path | None = None,
                 wait: float = DEFAULT_WAIT) -> Iterator[None]:
    """Hold the host's control lock for the block; ``what`` (e.g. "vmshare
    enable web-1") is written beside the pid for whoever waits.

    Waits at most ``wait`` seconds. Raises ControlBusy naming the holder's pid
    and act when it is still held then, AccessDenied when the lock file cannot
    be opened for lack of privilege, ControlLockError when the path is not a
    regular file or cannot be locked.
    """
    path = path or control_lock_path()
    deadline = time.monotonic() + max(wait, 0.0)
    if not _threads.acquire(timeout=max(wait, 0.0)):
        raise ControlBusy(f"another thread of this process (pid {os.getpid()}) held the "
                          f"control lock {path} for more than {wait:g} s")
    try:
        entry = _held.get(path)
        if entry is None:
            entry = _held[path] = [_take(path, what, deadline, wait), 0]
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                _release(path, entry[0])
    finally:
        _threads.release()


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        # NOFOLLOW: the pid is written into the file, never through a planted
        # symlink; NONBLOCK: a FIFO planted there cannot hang the open.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise AccessDenied(f"cannot open the control lock {path}: permission denied "
                               "(vmshare acts as root)") from exc
        raise ControlLockError(f"cannot open the control lock {path}: "
                               f"{exc.strerror or exc}") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ControlLockError(f"the control lock {path} is not a regular file; remove it")
    return fd


def _take(path: Path, what: str, deadline: float, wait: float) -> int:
    while True:
        fd = _open(path)
        try:
            _flock(fd, path, deadline, wait)
            # The holder we waited for unlinks the file as it lets go: a lock on
            # that old inode guards nothing, so open the path again.
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {what}\n".encode(errors="replace"), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _flock(fd: int, path: Path, deadline: float, wait: float) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ControlLockError(f"cannot lock {path}: {exc.strerror}") from exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControlBusy(f"{holder_text(fd)} has held the control lock {path} for "
                              f"more than {wait:g} s; try again when it is done")
        time.sleep(min(_POLL_SECONDS, left))


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _release(path: Path, fd: int) -> None:
    # Unlink while still holding the flock, so no lock file outlives its act
    # (a test run or a host leaves nothing in /run); waiters re-open the path.
    with contextlib.suppress(OSError):
        if _same_file(fd, path):
            os.unlink(path)
    os.close(fd)


def holder_text(fd: int) -> str:
    """Who holds the lock, from what its holder wrote: "pid N (what)"."""
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, act = text.partition(" ")
    if not pid.isdigit():
        return "another vmshare process (pid unknown: it is just starting)"
    return f"pid {pid} ({act or 'vmshare'})"
