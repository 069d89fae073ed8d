"""Whole-or-nothing file replacement: the daemon's state file, ``report --html``,
the hook installer.

A temp file in the target's directory is written, fsync'd, given its mode
(and owner, when asked), renamed over the target, and the directory is
fsync'd: a reader sees the old file or the new one, never half of one.

What it refuses, and why: a target that exists and is not a regular file
(a device, a FIFO, a socket, a directory, a symlink). Renaming over
/dev/null would replace the device with a 0600 regular file; writing
through a device as the shell's ``>`` does would give neither of the two
promises this writer makes (atomic, mode 0600) and would say "wrote
/dev/full" for bytes that went nowhere. A caller that wants a stream
writes to stdout. A regular target that belongs to another user is
refused too: replacing it would be a chown of something we did not
create. Directories: only missing ones are created (0700); an existing
one is never chmod'ed or chown'ed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from vmshare.errors import AccessDenied, VmshareError

log = logging.getLogger("vmshare.records.atomic")

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


class AtomicWriteError(VmshareError):
    """A file cannot be replaced atomically (or must not be: not a regular file)."""


def file_kind(mode: int) -> str:
    """'a character device', 'a FIFO', ... for an lstat mode; 'a regular file' otherwise."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def check_target(path: Path, owner: tuple[int, int] | None = None) -> None:
    """Refuse a target that exists and is not a regular file we may replace.

    ``owner``: the (uid, gid) the caller will give the new file; without it,
    an existing file must belong to the effective user.

    Raises AtomicWriteError.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AtomicWriteError(f"cannot inspect {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise AtomicWriteError(f"refusing to write {path}: it is {file_kind(st.st_mode)}, "
                               "not a regular file")
    if owner is None and st.st_uid != os.geteuid():
        raise AtomicWriteError(f"refusing to replace {path}: it belongs to uid {st.st_uid}, "
                               f"not to us (uid {os.geteuid()})")


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *,
                 tmp_dir: Path | None = None, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, rename, dir fsync).

    The temp file is made in ``tmp_dir`` (default: ``path``'s directory, created
    0700 if missing; it must be on the same filesystem) and given ``mode`` and,
    when set, ``owner`` (uid, gid) before the rename.

    Raises AtomicWriteError (see check_target for what is refused) or
    AccessDenied; the old file is intact on any failure.
    """
    check_target(path, owner)
    try:
        if tmp_dir is None and not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                   dir=tmp_dir or path.parent)
    except PermissionError as exc:
        raise AccessDenied(f"cannot write {path}: permission denied") from exc
    except OSError as exc:
        raise AtomicWriteError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Checked again just before the rename: a device made meanwhile is not replaced.
        check_target(path, owner)
        os.replace(tmp, path)
    except (OSError, AtomicWriteError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, AtomicWriteError):
            raise
        if isinstance(exc, PermissionError):
            raise AccessDenied(f"cannot write {path}: {exc.strerror}") from exc
        raise AtomicWriteError(f"cannot write {path}: {exc.strerror}") from exc
    _sync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:   # the rename happened; durability is best effort here
        log.debug("fsync of %s: %s", directory, exc)


def keep_copy(path: Path, suffix: str) -> Path | None:
    """Copy ``path`` to ``<path>.<suffix>`` (0600, never over an existing file), so
    that a corrupt file is kept for a human before it is replaced.

    Returns the copy's path, or None when ``path`` does not exist. Raises
    AtomicWriteError if the copy cannot be made.
    """
    copy = path.with_name(f"{path.name}.{suffix}")
    try:
        src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AtomicWriteError(f"cannot keep a copy of {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise AtomicWriteError(f"cannot keep a copy of {path}: not a regular file")
        dst = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(src, 1 << 20):
                _write_all(dst, chunk)
            os.fsync(dst)
        finally:
            os.close(dst)
    except OSError as exc:
        raise AtomicWriteError(f"cannot keep a copy of {path} as {copy}: "
                               f"{exc.strerror}") from exc
    finally:
        os.close(src)
    return copy
