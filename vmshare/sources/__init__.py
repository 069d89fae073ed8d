"""Page sources: guest memory dumps (ELF core, kdump-compressed, raw) and
live process memory, all behind the ``PageSource`` protocol.

``open_dump(path)`` picks the reader from the file's first bytes.

May import ksm (procfs, for live memory), model and errors.

The dump readers (elf, kdump and its codecs, raw) are imported when first
named: reading a live process (``vmshare predict --pid``) does not load them.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from vmshare.errors import DumpError
from vmshare.sources.base import DEFAULT_CHUNK_PAGES, PageSource, open_dump_file
from vmshare.sources.live import LiveProcessSource, private_anonymous_vmas

if TYPE_CHECKING:
    from vmshare.sources.elf import ElfCoreSource
    from vmshare.sources.kdump import KdumpSource
    from vmshare.sources.raw import RawImageSource

#: names this package gives from the module that defines them, imported when named
_LAZY = {"ElfCoreSource": "elf", "KdumpSource": "kdump", "RawImageSource": "raw"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"vmshare.sources.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    malformed or unreadable dump, and for a path that is neither a regular
    file nor a block device (named with its type; a FIFO is never opened
    in a way that could block).
    """
    from vmshare.sources.elf import ELF_MAGIC, ElfCoreSource
    from vmshare.sources.kdump import KdumpSource, looks_like_kdump
    from vmshare.sources.raw import RawImageSource

    fd, _, size = open_dump_file(os.fspath(path))   # refuses FIFOs and devices unopened
    try:
        head = os.pread(fd, min(32, size), 0)
    except OSError as exc:
        raise DumpError(f"{os.fspath(path)}: cannot read dump: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if head.startswith(ELF_MAGIC):
        return ElfCoreSource(path, name)
    if looks_like_kdump(head):
        return KdumpSource(path, name)
    if not raw_ok:
        raise DumpError(f"{os.fspath(path)}: neither an ELF core nor a kdump dump "
                        f"(first bytes {head[:8]!r})")
    return RawImageSource(path, name)
