"""Page sources: guest memory dumps (ELF core, kdump-compressed, raw) and
live process memory, all behind the ``PageSource`` protocol.

``open_dump(path)`` picks the reader from the file's first bytes.

May import ksm (procfs, for live memory), model and errors.
"""

from __future__ import annotations

import os

from vmshare.errors import DumpError
from vmshare.sources.base import DEFAULT_CHUNK_PAGES, PageSource
from vmshare.sources.elf import ELF_MAGIC, ElfCoreSource
from vmshare.sources.kdump import KdumpSource, looks_like_kdump
from vmshare.sources.live import LiveProcessSource, private_anonymous_vmas
from vmshare.sources.raw import RawImageSource

__all__ = [
    "DEFAULT_CHUNK_PAGES",
    "ElfCoreSource",
    "KdumpSource",
    "LiveProcessSource",
    "PageSource",
    "RawImageSource",
    "open_dump",
    "private_anonymous_vmas",
]


def open_dump(path: str | os.PathLike[str], name: str | None = None, *,
              raw_ok: bool = True) -> ElfCoreSource | KdumpSource | RawImageSource:
    """Open a dump by content: ELF core, kdump (plain or flattened), else raw.

    With ``raw_ok=False`` a file that is neither ELF nor kdump raises
    DumpError instead of being read as a raw image. Raises DumpError for any
    malformed or unreadable dump.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise DumpError(f"{os.fspath(path)}: cannot open dump: {exc.strerror}") from exc
    if head.startswith(ELF_MAGIC):
        return ElfCoreSource(path, name)
    if looks_like_kdump(head):
        return KdumpSource(path, name)
    if not raw_ok:
        raise DumpError(f"{os.fspath(path)}: neither an ELF core nor a kdump dump "
                        f"(first bytes {head[:8]!r})")
    return RawImageSource(path, name)
