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
the domain XML was missing, malformed, oversized or carried a DTD, or the
hook's timer stopped it before the parse finished; ``domain`` then is the
name libvirt passed on the command line. The wake-up datagram
carries the same object plus ``"entry"``: the spool file name, or null when
the hook could not write the spool (then the event exists only there).

The hook writes its entry before it parses the domain XML (a slow parse must
not lose the event), holding an exclusive flock on it; when the XML gives the
UUID it renames a completed entry over the first one and lets go. A drainer
skips an entry that is locked (the hook is still at it) or no longer linked
(it was just replaced), so it acts on each hook call once.

Every entry is validated by :func:`parse_event` (vmshare.records.schema): a
bad one is moved to ``bad/`` (at most MAX_BAD_ENTRIES are kept; past that
it is deleted), counted and logged at a bounded rate (vmshare.daemon.rejects).
A drainer with a domain scope leaves other domains' entries in place.
The wake-up socket lives in vmshare.daemon.wakeup.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmshare.daemon.rejects import Rejects
from vmshare.errors import AccessDenied, VmshareError
from vmshare.records.atomic import file_kind
from vmshare.records.schema import (
    RecordError,
    decode,
    get_int,
    get_number,
    get_opt_str,
    get_str,
    printable,
)

__all__ = [
    "BAD_DIR",
    "FORMAT_VERSION",
    "MAX_BAD_ENTRIES",
    "SPOOL_DIR",
    "TEMP_GRACE_S",
    "SpoolEntryError",
    "SpoolError",
    "SpoolEvent",
    "check_private_dir",
    "drain",
    "ensure_spool_dir",
    "parse_event",
]

log = logging.getLogger("vmshare.daemon.spool")

FORMAT_VERSION = 1
SPOOL_DIR = Path("/run/vmshare/spool")
BAD_DIR = "bad"
ENTRY_SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
TEMP_GRACE_S = 60.0  # a hook that has not renamed its temp file by now is dead
MAX_ENTRY_BYTES = 1 << 20  # the hook writes a few hundred bytes; refuse to slurp more
MAX_BAD_ENTRIES = 1000   # kept in bad/ for a human; a flood past this is deleted
MAX_FIELD_CHARS = 4096   # the hook cuts its fields to 1024 characters


class SpoolError(VmshareError):
    """The spool directory or the wake-up socket cannot be used."""


class SpoolEntryError(SpoolError, RecordError):
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


def parse_event(data: bytes, entry: str = "") -> SpoolEvent:
    """Parse one spool entry (named ``entry``) or wake-up datagram (``entry`` "").

    Raises SpoolEntryError, naming the entry and the problem, if it is not a
    version-1 hook event.
    """
    what = f"spool entry {entry}" if entry else "wake-up datagram"
    E = SpoolEntryError
    obj = decode(data, E, what, max_bytes=MAX_ENTRY_BYTES)
    if not isinstance(obj, dict):
        raise E(f"{what}: not a JSON object")
    if obj.get("v") != FORMAT_VERSION or isinstance(obj.get("v"), bool):
        raise E(f"{what}: unknown format version {printable(repr(obj.get('v')), 40)}")
    domain = get_str(obj, "domain", E, what, max_len=MAX_FIELD_CHARS)
    if not domain:
        raise E(f"{what}: empty domain name")
    if not entry:
        entry = get_opt_str(obj, "entry", E, what, max_len=MAX_FIELD_CHARS) or ""
    return SpoolEvent(
        domain=domain,
        uuid=get_opt_str(obj, "uuid", E, what, max_len=64),
        operation=get_str(obj, "operation", E, what, max_len=MAX_FIELD_CHARS),
        sub_operation=get_str(obj, "sub_operation", E, what, max_len=MAX_FIELD_CHARS),
        extra=get_str(obj, "extra", E, what, max_len=MAX_FIELD_CHARS),
        time=get_number(obj, "time", E, what, minimum=0.0),
        seq=get_int(obj, "seq", E, what, minimum=0),
        boot_id=get_str(obj, "boot_id", E, what, max_len=64, default=""),
        entry=entry,
    )


def _order(events: list[SpoolEvent]) -> list[SpoolEvent]:
    """Hook-call order: boots by their earliest wall time, then seq within a boot."""
    boot_start: dict[str, float] = {}
    for event in events:
        boot_start[event.boot_id] = min(boot_start.get(event.boot_id, event.time), event.time)
    return sorted(events, key=lambda e: (boot_start[e.boot_id], e.boot_id, e.seq, e.entry))


class _Busy(Exception):
    """The hook still holds this entry (or just replaced it): leave it for the next drain."""


def _read_entry(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpoolEntryError(f"spool entry {name}: {file_kind(st.st_mode)}, not a "
                                  "regular file")
        if st.st_uid != os.geteuid():
            # Only the hook (root, as libvirtd) writes here; anything else is forged.
            raise SpoolEntryError(f"spool entry {name}: owned by uid {st.st_uid}, not by us")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise _Busy(name) from exc
        if os.fstat(fd).st_nlink == 0:
            raise _Busy(name)
        data = os.read(fd, MAX_ENTRY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_ENTRY_BYTES:
        raise SpoolEntryError(f"spool entry {name}: larger than {MAX_ENTRY_BYTES} bytes")
    return data


class _BadDir:
    """``bad/`` with a cap: entries are moved there until it holds MAX_BAD_ENTRIES."""

    def __init__(self, dir_fd: int, rejects: Rejects) -> None:
        self.dir_fd = dir_fd
        self.rejects = rejects
        self.count: int | None = None

    def _held(self) -> int:
        if self.count is None:
            self.count = 0
            with contextlib.suppress(OSError):
                fd = os.open(BAD_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                             dir_fd=self.dir_fd)
                try:
                    self.count = len(os.listdir(fd))
                finally:
                    os.close(fd)
        return self.count

    def set_aside(self, name: str, reason: str) -> None:
        """Count and log the bad entry, then move it to bad/ (or delete it, bad/ full)."""
        full = self._held() >= MAX_BAD_ENTRIES
        self.rejects.reject("spool_entry", f"{reason}; " + (
            f"deleted ({BAD_DIR}/ holds {MAX_BAD_ENTRIES} entries)" if full
            else f"moved to {BAD_DIR}/"))
        try:
            if full:
                self._delete(name)
                return
            with contextlib.suppress(FileExistsError):
                os.mkdir(BAD_DIR, 0o700, dir_fd=self.dir_fd)
            os.rename(name, f"{BAD_DIR}/{name}", src_dir_fd=self.dir_fd,
                      dst_dir_fd=self.dir_fd)
            self.count = self._held() + 1
        except FileNotFoundError:
            pass    # another drainer took it
        except OSError as exc:
            self.rejects.reject("spool_dropped", f"spool entry {name}: cannot move it to "
                                f"{BAD_DIR}/ ({exc.strerror}); deleting it")
            self._delete(name)

    def _delete(self, name: str) -> None:
        """Delete a bad entry; one that cannot be deleted (a directory with content)
        is remembered and skipped from now on, so that it is refused once."""
        try:
            try:
                os.unlink(name, dir_fd=self.dir_fd)
            except IsADirectoryError:
                os.rmdir(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.rejects.reject("spool_dropped", f"spool entry {name}: cannot delete it "
                                f"({exc.strerror}); left in place and skipped")
            self.rejects.skip(name)


def drain(spool_dir: Path = SPOOL_DIR, *, temp_grace: float = TEMP_GRACE_S,
          scope: Callable[[str], bool] | None = None,
          rejects: Rejects | None = None) -> list[SpoolEvent]:
    """Take every complete entry out of the spool, in hook-call order.

    Each entry is deleted only after it parsed; a corrupt one is moved to
    ``<spool>/bad/`` and counted in ``rejects`` (logged at a bounded rate).
    With ``scope``, an entry whose domain it rejects is left in place for
    the drainer that manages that domain. Entries a hook still holds, and
    temp files of a hook still writing, are left alone; temp files older
    than ``temp_grace`` seconds (a hook that died mid-write) are deleted. A
    missing spool directory holds no events.

    Raises AccessDenied if the spool cannot be read for lack of privilege and
    SpoolError if it cannot be read otherwise; never for one bad entry.
    """
    rejects = rejects if rejects is not None else Rejects(log)
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
        bad = _BadDir(dir_fd, rejects)
        events: list[SpoolEvent] = []
        for name in names:
            if name.startswith(TEMP_PREFIX):
                _expire_temp(dir_fd, name, now, temp_grace)
                continue
            if name.startswith(".") or not name.endswith(ENTRY_SUFFIX) \
                    or rejects.skipped(name):
                continue
            event = _take(dir_fd, name, scope, bad)
            if event is not None:
                events.append(event)
        return _order(events)
    finally:
        os.close(dir_fd)


def _take(dir_fd: int, name: str, scope: Callable[[str], bool] | None,
          bad: _BadDir) -> SpoolEvent | None:
    """Read, validate and delete one entry; None when it is not ours to act on."""
    try:
        event = parse_event(_read_entry(dir_fd, name), entry=name)
    except (FileNotFoundError, _Busy):
        return None     # another drainer took it, or the hook still holds it
    except SpoolEntryError as exc:
        bad.set_aside(name, str(exc))
        return None
    except OSError as exc:
        bad.set_aside(name, f"spool entry {name}: unreadable ({exc.strerror})")
        return None
    if scope is not None and not scope(event.domain):
        return None
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None     # another drainer already returned it
    except OSError as exc:
        raise SpoolError(f"cannot delete spool entry {name}: {exc.strerror}") from exc
    return event


def _expire_temp(dir_fd: int, name: str, now: float, grace: float) -> None:
    try:
        age = now - os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
        if age > grace:
            os.unlink(name, dir_fd=dir_fd)
            log.warning("removed %s left half-written by a hook %.0f s ago",
                        printable(name), age)
    except FileNotFoundError:
        pass  # the hook just renamed it
    except OSError as exc:
        log.warning("cannot remove stale spool temp file %s: %s", printable(name), exc)


def check_private_dir(path: Path, what: str) -> Path:
    """Create ``path`` 0700 if missing; accept an existing one only if it is a real
    directory of ours (root's, or the effective user's) that no one else may
    write to. An existing directory is never chmod'ed or chown'ed: a socket
    or spool pointed at /tmp must not turn /tmp into root's 0700.

    Raises AccessDenied or SpoolError naming ``what``, the path and the problem.
    """
    try:
        if not os.path.lexists(path):
            path.mkdir(mode=0o700, parents=True)
        st = os.lstat(path)
    except FileExistsError:
        st = os.lstat(path)
    except PermissionError as exc:
        raise AccessDenied(f"cannot create the {what} {path}: {exc.strerror}") from exc
    except OSError as exc:
        raise SpoolError(f"cannot create the {what} {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolError(f"the {what} {path} is {file_kind(st.st_mode)}, not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        raise SpoolError(f"the {what} {path} belongs to uid {st.st_uid}, not to us (uid "
                         f"{os.geteuid()}); refusing it: anyone who owns it can forge events")
    if mode & 0o022:
        raise SpoolError(f"the {what} {path} is writable by others (mode {mode:04o}); "
                         "refusing it: use a directory only root can write (e.g. "
                         f"{SPOOL_DIR.parent}, mode 0700)")
    return path


def ensure_spool_dir(path: Path = SPOOL_DIR) -> Path:
    """The spool directory, checked (check_private_dir) and created 0700 if missing.

    Raises AccessDenied or SpoolError.
    """
    return check_private_dir(path, "spool directory")
