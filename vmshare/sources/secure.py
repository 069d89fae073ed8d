"""Dump hygiene: a dump holds the guest's secrets.

* Dumps live in a root-only directory (created 0700; refused when it is a
  symlink, not a directory, not owned by root, or group/world-writable).
* Each dump file is created 0600 with O_CREAT|O_EXCL|O_NOFOLLOW and removed
  when its ``with`` block ends, whether by success or by an exception.
* Producing a dump may pause the guest: ``paused_guard`` (and its asyncio
  twin) resume it in ``finally``, on every failure path. The callable that
  produces the dump owns its timeout and QMP ``detach``.

Nothing here ever logs page contents; only paths and error texts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmshare.errors import AccessDenied, DumpError

log = logging.getLogger(__name__)

DEFAULT_DUMP_DIR = Path("/var/lib/vmshare/dumps")


def ensure_dump_dir(path: str | os.PathLike[str] = DEFAULT_DUMP_DIR, *,
                    owner_uid: int = 0) -> Path:
    """Create (0700) or check the dump directory; return it.

    Raises DumpError if it is a symlink or not a directory, is not owned by
    ``owner_uid`` (root), or is group- or world-writable; AccessDenied if it
    cannot be created for lack of privileges.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir(mode=0o700)
        os.chmod(p, 0o700, follow_symlinks=False)   # the umask may have cleared bits only
    except FileExistsError:
        pass
    except PermissionError as exc:
        raise AccessDenied(f"cannot create dump directory {p}: permission denied") from exc
    except OSError as exc:
        raise DumpError(f"cannot create dump directory {p}: {exc.strerror}") from exc
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise DumpError(f"dump directory {p} is a symlink; refusing to write guest memory there")
    if not stat.S_ISDIR(st.st_mode):
        raise DumpError(f"dump directory {p} is not a directory")
    if st.st_uid != owner_uid:
        raise DumpError(f"dump directory {p} is owned by uid {st.st_uid}, not root; "
                        f"refusing to write guest memory there")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DumpError(f"dump directory {p} is group- or world-writable "
                        f"(mode {stat.S_IMODE(st.st_mode):04o}); make it 0700")
    return p


@dataclass(frozen=True)
class DumpFile:
    """A freshly created, empty, 0600 dump file; ``fd`` is open for writing
    (hand it to QEMU with QMP ``getfd`` + ``fd:<name>``, or use ``path``)."""

    path: Path
    fd: int


@contextlib.contextmanager
def dump_file(directory: str | os.PathLike[str] = DEFAULT_DUMP_DIR, prefix: str = "dump",
              *, owner_uid: int = 0) -> Iterator[DumpFile]:
    """Create a new 0600 dump file in the checked directory; remove it on exit.

    Raises what ensure_dump_dir raises, and DumpError if the file cannot be
    created.
    """
    d = ensure_dump_dir(directory, owner_uid=owner_uid)
    if "/" in prefix or prefix.startswith("."):
        raise ValueError(f"bad dump file prefix {prefix!r}")
    path = d / f"{prefix}-{secrets.token_hex(8)}.dump"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise DumpError(f"cannot create dump file {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)
        yield DumpFile(path, fd)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def paused_guard(pause_fn: Callable[[], object], resume_fn: Callable[[], object],
                 was_running: bool) -> Iterator[None]:
    """Pause a running guest for the block; resume it in ``finally``.

    If ``was_running`` is false nothing is paused or resumed. If pausing
    fails, resuming is still attempted (the guest may be half-stopped) and
    the pause error propagates. A failure to resume propagates (chained to
    any error of the block) and is logged.
    """
    if not was_running:
        yield
        return
    try:
        pause_fn()
        yield
    finally:
        try:
            resume_fn()
        except BaseException:
            log.error("failed to resume the guest after a dump; it is still paused")
            raise


@contextlib.asynccontextmanager
async def async_paused_guard(pause_fn: Callable[[], Awaitable[object]],
                             resume_fn: Callable[[], Awaitable[object]],
                             was_running: bool) -> AsyncIterator[None]:
    """``paused_guard`` for coroutine functions (QMP ``stop`` / ``cont``)."""
    if not was_running:
        yield
        return
    try:
        await pause_fn()
        yield
    finally:
        try:
            await resume_fn()
        except BaseException:
            log.error("failed to resume the guest after a dump; it is still paused")
            raise


@contextlib.contextmanager
def taken_dump(produce: Callable[[DumpFile], object], *, pause_fn: Callable[[], object],
               resume_fn: Callable[[], object], was_running: bool,
               directory: str | os.PathLike[str] = DEFAULT_DUMP_DIR, prefix: str = "dump",
               owner_uid: int = 0) -> Iterator[Path]:
    """Take a dump with ``produce`` while the guest is paused; yield its path.

    The guest is resumed as soon as ``produce`` returns or raises; the file
    is removed when the ``with`` block ends, also on exceptions.
    """
    with dump_file(directory, prefix, owner_uid=owner_uid) as f:
        with paused_guard(pause_fn, resume_fn, was_running):
            produce(f)
        yield f.path
