"""The daemon's side of the libvirt hook: the spool directory and the wake-up socket.

The hook (hooks/vmshare-qemu-hook) cannot act: it runs synchronously inside
libvirtd, and calling back into libvirt from there deadlocks. It leaves one
JSON entry per hook call in the spool directory and sends a datagram to the
wake-up socket; the daemon binds that socket, wakes on any datagram, and
calls :func:`drain`. The datagram only saves a polling delay: the spool is the
record, and a lost datagram (daemon down, buffer full) loses nothing.

Entry format (version 1), one JSON object per file
``<time_ns>-<pid>-<random>.json``, written as ``.tmp-<pid>-<random>`` and
renamed::

    {"v": 1, "domain": "vm1", "uuid": "4dea22b3-...", "operation": "start",
     "sub_operation": "begin", "extra": "-", "time": 1795671366.838,
     "seq": 292939250023, "boot_id": "4a6ac1e8-...", "pid": 13593, "xml": "ok"}

``seq`` is CLOCK_MONOTONIC in nanoseconds: one clock for every process since
boot, so it orders hook calls of one boot even when the wall clock steps;
``boot_id`` says which boot. ``uuid`` is null and ``xml`` is "unparsed" when
the domain XML was missing, malformed, oversized or carried a DTD; ``domain``
then is the name libvirt passed on the command line. The wake-up datagram
carries the same object plus ``"entry"``: the spool file name, or null when
the hook could not write the spool (then the event exists only there).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from vmshare.errors import AccessDenied, VmshareError

__all__ = [
    "BAD_DIR",
    "FORMAT_VERSION",
    "SPOOL_DIR",
    "TEMP_GRACE_S",
    "WAKEUP_SOCKET",
    "SpoolEntryError",
    "SpoolError",
    "SpoolEvent",
    "bind_wakeup_socket",
    "drain",
    "drain_wakeups",
    "ensure_spool_dir",
    "parse_event",
]

log = logging.getLogger("vmshare.daemon.spool")

FORMAT_VERSION = 1
SPOOL_DIR = Path("/run/vmshare/spool")
WAKEUP_SOCKET = Path("/run/vmshare/wakeup.sock")
BAD_DIR = "bad"
ENTRY_SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
TEMP_GRACE_S = 60.0  # a hook that has not renamed its temp file by now is dead
MAX_ENTRY_BYTES = 1 << 20  # the hook writes a few hundred bytes; refuse to slurp more
MAX_DATAGRAM_BYTES = 1 << 16


class SpoolError(VmshareError):
    """The spool directory or the wake-up socket cannot be used."""


class SpoolEntryError(SpoolError):
    """One spool entry (or datagram) is not a valid version-1 hook event."""


@dataclass(frozen=True)
class SpoolEvent:
    """One libvirt qemu hook call, as the hook recorded it.

    ``time`` is wall-clock seconds since the epoch; ``seq`` is CLOCK_MONOTONIC
    nanoseconds at the hook, comparable only within one ``boot_id``.
    ``uuid`` is None when the hook could not read it from the domain XML.
    ``entry`` is the spool file name ("" for an event read from a datagram
    whose spool write failed).
    """

    domain: str
    uuid: str | None
    operation: str
    sub_operation: str
    extra: str
    time: float
    seq: int
    boot_id: str = ""
    entry: str = ""


def _text(obj: dict[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise SpoolEntryError(f"field {key!r} is not a string")
    return value


def parse_event(data: bytes, entry: str = "") -> SpoolEvent:
    """Parse one spool entry or wake-up datagram.

    Raises SpoolEntryError if it is not a version-1 hook event.
    """
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpoolEntryError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise SpoolEntryError("not a JSON object")
    if obj.get("v") != FORMAT_VERSION:
        raise SpoolEntryError(f"unknown format version {obj.get('v')!r}")
    uuid = obj.get("uuid")
    if uuid is not None and not isinstance(uuid, str):
        raise SpoolEntryError("field 'uuid' is neither a string nor null")
    when = obj.get("time")
    seq = obj.get("seq")
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise SpoolEntryError("field 'time' is not a number")
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise SpoolEntryError("field 'seq' is not an integer")
    boot_id = obj.get("boot_id", "")
    if not isinstance(boot_id, str):
        raise SpoolEntryError("field 'boot_id' is not a string")
    if not entry:
        named = obj.get("entry")
        entry = named if isinstance(named, str) else ""
    domain = _text(obj, "domain")
    if not domain:
        raise SpoolEntryError("empty domain name")
    return SpoolEvent(
        domain=domain,
        uuid=uuid,
        operation=_text(obj, "operation"),
        sub_operation=_text(obj, "sub_operation"),
        extra=_text(obj, "extra"),
        time=float(when),
        seq=seq,
        boot_id=boot_id,
        entry=entry,
    )


def _order(events: list[SpoolEvent]) -> list[SpoolEvent]:
    """Hook-call order: boots by their earliest wall time, then seq within a boot."""
    boot_start: dict[str, float] = {}
    for event in events:
        boot_start[event.boot_id] = min(boot_start.get(event.boot_id, event.time), event.time)
    return sorted(events, key=lambda e: (boot_start[e.boot_id], e.boot_id, e.seq, e.entry))


def _read_entry(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpoolEntryError("not a regular file")
        data = os.read(fd, MAX_ENTRY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_ENTRY_BYTES:
        raise SpoolEntryError(f"larger than {MAX_ENTRY_BYTES} bytes")
    return data


def _set_aside(dir_fd: int, name: str, reason: str) -> None:
    """Move a corrupt entry to bad/ so that it is kept for a human, out of the way."""
    log.warning("spool entry %s is corrupt (%s); moved to %s/", name, reason, BAD_DIR)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(BAD_DIR, 0o700, dir_fd=dir_fd)
        os.rename(name, f"{BAD_DIR}/{name}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        log.warning("cannot move %s to %s/ (%s); deleting it", name, BAD_DIR, exc)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)


def drain(spool_dir: Path = SPOOL_DIR, *, temp_grace: float = TEMP_GRACE_S) -> list[SpoolEvent]:
    """Take every complete entry out of the spool, in hook-call order.

    Each entry is deleted only after it parsed; a corrupt one is moved to
    ``<spool>/bad/`` with one warning. Temp files of a hook still writing are
    left alone; those older than ``temp_grace`` seconds (a hook that died
    mid-write) are deleted. A missing spool directory holds no events.

    Raises AccessDenied if the spool cannot be read for lack of privilege and
    SpoolError if it cannot be read otherwise.
    """
    try:
        dir_fd = os.open(spool_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except PermissionError as exc:
        raise AccessDenied(f"cannot read spool {spool_dir}: {exc.strerror}") from exc
    except OSError as exc:
        raise SpoolError(f"cannot read spool {spool_dir}: {exc.strerror}") from exc
    try:
        names = sorted(os.listdir(dir_fd))
        now = time.time()
        events: list[SpoolEvent] = []
        for name in names:
            if name.startswith(TEMP_PREFIX):
                _expire_temp(dir_fd, name, now, temp_grace)
                continue
            if name.startswith(".") or not name.endswith(ENTRY_SUFFIX):
                continue
            try:
                event = parse_event(_read_entry(dir_fd, name), entry=name)
            except FileNotFoundError:
                continue  # another drainer took it
            except (OSError, SpoolEntryError) as exc:
                _set_aside(dir_fd, name, str(exc))
                continue
            events.append(event)
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                events.pop()  # another drainer already returned it
            except OSError as exc:
                raise SpoolError(f"cannot delete spool entry {name}: {exc.strerror}") from exc
        return _order(events)
    finally:
        os.close(dir_fd)


def _expire_temp(dir_fd: int, name: str, now: float, grace: float) -> None:
    try:
        age = now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
        if age > grace:
            os.unlink(name, dir_fd=dir_fd)
            log.warning("removed %s left half-written by a hook %.0f s ago", name, age)
    except FileNotFoundError:
        pass  # the hook just renamed it
    except OSError as exc:
        log.warning("cannot remove stale spool temp file %s: %s", name, exc)


def _private_dir(path: Path) -> None:
    """Create path (and parents) as root-only 0700 directories; refuse anything else."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except PermissionError as exc:
        raise AccessDenied(f"cannot create {path}: {exc.strerror}") from exc
    except OSError as exc:
        raise SpoolError(f"cannot create {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolError(f"{path} exists and is not a directory")
    euid = os.geteuid()
    try:
        if st.st_uid != euid or st.st_gid != os.getegid():
            if euid != 0:
                raise AccessDenied(f"{path} belongs to uid {st.st_uid}, not to us (uid {euid})")
            os.chown(path, 0, 0, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700, follow_symlinks=False)
    except PermissionError as exc:
        raise AccessDenied(f"cannot make {path} private: {exc.strerror}") from exc
    except OSError as exc:
        raise SpoolError(f"cannot make {path} private: {exc.strerror}") from exc


def ensure_spool_dir(path: Path = SPOOL_DIR) -> Path:
    """Create the spool directory 0700, owned by root (by us when not root).

    Raises AccessDenied or SpoolError if it cannot be created or made private,
    or if the path exists and is not a directory (a symlink counts as not).
    """
    _private_dir(path)
    return path


def bind_wakeup_socket(path: Path = WAKEUP_SOCKET) -> socket.socket:
    """Bind the non-blocking datagram socket the hook pokes after each entry.

    A stale socket file (nobody bound to it) is replaced; a live one means
    another daemon is running and is an error. The parent directory is made
    0700 and the socket 0600: only root may wake the daemon.

    Raises SpoolError (AccessDenied for privilege problems) if the socket
    cannot be bound.
    """
    _private_dir(path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SpoolError(f"cannot inspect {path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SpoolError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left by a daemon that died
        except OSError as exc:
            raise SpoolError(f"cannot probe {path}: {exc.strerror}") from exc
        else:
            raise SpoolError(f"{path} is in use: another vmshare daemon is running")
        finally:
            probe.close()
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


def drain_wakeups(sock: socket.socket) -> list[SpoolEvent]:
    """Read every pending datagram without blocking; return the events they carry.

    The daemon still drains the spool afterwards: a datagram is a wake-up, and
    those whose ``entry`` is "" report events the hook could not spool. A
    malformed datagram is logged and skipped.
    """
    events: list[SpoolEvent] = []
    while True:
        try:
            data = sock.recv(MAX_DATAGRAM_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return events
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return events
            raise SpoolError(f"cannot read wake-up socket: {exc.strerror}") from exc
        try:
            events.append(parse_event(data))
        except SpoolEntryError as exc:
            log.warning("ignoring malformed wake-up datagram (%s)", exc)
