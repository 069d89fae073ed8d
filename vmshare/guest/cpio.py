"""A writer (and a reader, for checking) of the "newc" cpio format the kernel unpacks.

The initramfs format is documented in the kernel's
Documentation/driver-api/early-userspace/buffer-format.rst: each member is a
110-byte ASCII header ("070701" then 13 eight-digit hex fields), the NUL
terminated name padded to a multiple of 4 bytes, then the data padded to a
multiple of 4 bytes; the archive ends with a member named "TRAILER!!!".

Archives are deterministic: inode numbers are assigned in order, mtimes are 0.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from vmshare.errors import ImageBuildError

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
_FIELDS = 13


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``data`` is the file content, or the target of a symlink."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> CpioEntry:
        return CpioEntry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return CpioEntry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> CpioEntry:
        return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return CpioEntry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: CpioEntry, name: bytes) -> bytes:
    fields = (
        ino, entry.mode, entry.uid, entry.gid,
        2 if stat.S_ISDIR(entry.mode) else 1,
        entry.mtime, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor,
        len(name) + 1, 0,
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ImageBuildError(f"cpio: field value {value} of {entry.name!r} out of range")
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _member(ino: int, entry: CpioEntry) -> bytes:
    name = entry.name.encode()
    if b"\0" in name or not name:
        raise ImageBuildError(f"cpio: invalid member name {entry.name!r}")
    if entry.data and not (stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode)):
        raise ImageBuildError(f"cpio: {entry.name!r} has data but is not a file or symlink")
    head = _header(ino, entry, name) + name + b"\0"
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` (in order, parents before children) plus the trailer.

    Raises ImageBuildError for a name that is empty or has a NUL, duplicate
    names, data on a member that is not a file or symlink, or a field too big.
    """
    parts: list[bytes] = []
    seen: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        if entry.name in seen or entry.name == TRAILER:
            raise ImageBuildError(f"cpio: duplicate or reserved member name {entry.name!r}")
        seen.add(entry.name)
        parts.append(_member(ino, entry))
    parts.append(_member(0, CpioEntry(TRAILER, 0)))
    return b"".join(parts)


def read_newc(archive: bytes) -> list[CpioEntry]:
    """Parse a newc archive up to its trailer (the trailer is not returned).

    Raises ImageBuildError on a bad magic, a malformed header, a member that
    runs past the end, or a missing trailer.
    """
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        header = archive[offset:offset + HEADER_SIZE]
        if len(header) < HEADER_SIZE:
            raise ImageBuildError(f"cpio: truncated header at offset {offset} (no trailer)")
        if header[:6] != NEWC_MAGIC:
            raise ImageBuildError(f"cpio: bad magic {header[:6]!r} at offset {offset}")
        try:
            fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(_FIELDS)]
        except ValueError as exc:
            raise ImageBuildError(f"cpio: malformed header at offset {offset}") from exc
        (_ino, mode, uid, gid, _nlink, mtime, filesize,
         _dev_major, _dev_minor, rdev_major, rdev_minor, namesize, _check) = fields
        name_start = offset + HEADER_SIZE
        data_start = name_start + namesize + (-(HEADER_SIZE + namesize) % 4)
        data_end = data_start + filesize
        if namesize < 1 or data_end > len(archive):
            raise ImageBuildError(f"cpio: member at offset {offset} runs past the end")
        raw_name = archive[name_start:name_start + namesize]
        if raw_name[-1:] != b"\0":
            raise ImageBuildError(f"cpio: name at offset {offset} is not NUL-terminated")
        name = raw_name[:-1].decode()
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, archive[data_start:data_end], uid, gid, mtime,
                                 rdev_major, rdev_minor))
        offset = data_end + (-filesize % 4)
