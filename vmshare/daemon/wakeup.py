"""The daemon's wake-up socket: the hook's datagram after each spool entry.

The daemon binds a non-blocking unix datagram socket (0600, in a directory
only root may write: vmshare.daemon.spool.check_private_dir, which never
chmods a directory it did not create) and drains it on every wake-up. A
datagram only saves a polling delay; those whose ``entry`` is null carry an
event the hook could not spool. A malformed datagram is counted and logged
at a bounded rate (vmshare.daemon.rejects), never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

from vmshare.daemon.rejects import Rejects
from vmshare.daemon.spool import (
    SpoolEntryError,
    SpoolError,
    SpoolEvent,
    check_private_dir,
    parse_event,
)
from vmshare.errors import AccessDenied
from vmshare.records.atomic import file_kind

__all__ = ["WAKEUP_SOCKET", "DaemonRunning", "bind_wakeup_socket", "daemon_running",
           "drain_wakeups"]

log = logging.getLogger("vmshare.daemon.wakeup")

WAKEUP_SOCKET = Path("/run/vmshare/wakeup.sock")
MAX_DATAGRAM_BYTES = 1 << 16
MAX_DATAGRAMS_PER_DRAIN = 4096   # then back to the event loop; the rest wait a turn


class DaemonRunning(SpoolError):
    """Another vmshare daemon is bound to the wake-up socket."""


def daemon_running(path: Path) -> bool:
    """True when a process is bound to the wake-up socket at ``path`` (a daemon runs).

    Raises SpoolError if ``path`` exists and is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SpoolError(f"cannot inspect {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise SpoolError(f"{path} is {file_kind(st.st_mode)}, not a socket; refusing to "
                         "replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise SpoolError(f"cannot probe {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    return True


def bind_wakeup_socket(path: Path = WAKEUP_SOCKET) -> socket.socket:
    """Bind the non-blocking datagram socket the hook pokes after each entry.

    A stale socket file (nobody bound to it) is replaced; a live one means
    another daemon is running and is an error. The parent directory must be
    ours and writable by no one else (created 0700 if missing); the socket is
    0600: only root may wake the daemon.

    Raises SpoolError (AccessDenied for privilege problems) if the socket
    cannot be bound.
    """
    check_private_dir(path.parent, "socket directory")
    if daemon_running(path):
        raise DaemonRunning(f"{path} is in use: another vmshare daemon is running")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)   # stale: left by a daemon that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.setblocking(False)
    except PermissionError as exc:
        sock.close()
        raise AccessDenied(f"cannot bind {path}: {exc.strerror}") from exc
    except OSError as exc:
        sock.close()
        raise SpoolError(f"cannot bind {path}: {exc.strerror}") from exc
    return sock


def drain_wakeups(sock: socket.socket, rejects: Rejects | None = None) -> list[SpoolEvent]:
    """Read pending datagrams without blocking (at most MAX_DATAGRAMS_PER_DRAIN);
    return the events they carry.

    The daemon still drains the spool afterwards: a datagram is a wake-up, and
    those whose ``entry`` is "" report events the hook could not spool. A
    malformed datagram is counted in ``rejects`` and skipped.

    Raises SpoolError if the socket cannot be read.
    """
    rejects = rejects if rejects is not None else Rejects(log)
    events: list[SpoolEvent] = []
    for _ in range(MAX_DATAGRAMS_PER_DRAIN):
        try:
            data = sock.recv(MAX_DATAGRAM_BYTES + 1, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return events
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return events
            raise SpoolError(f"cannot read wake-up socket: {exc.strerror}") from exc
        try:
            if len(data) > MAX_DATAGRAM_BYTES:
                raise SpoolEntryError(f"wake-up datagram: larger than {MAX_DATAGRAM_BYTES} "
                                      "bytes")
            events.append(parse_event(data))
        except SpoolEntryError as exc:
            rejects.reject("datagram", str(exc))
    return events
