"""The page-source protocol and what every file-backed reader shares.

A page source streams guest (or process) memory as ``PageRun`` objects and
lists the ``Region`` objects those runs belong to. Sources do I/O and format
validation only: no hashing, no merge logic (that is the engine's job).

Buffer reuse: ``runs()`` yields runs whose ``data`` memoryview points into a
buffer the source reuses for the next run. A consumer that needs the bytes
after advancing the iterator must copy them (``bytes(run.data)``), or set the
source's ``read_into`` (a function giving a writable view of the size asked
for): each run is then read straight into the view it returns.

Reading again: ``read_pages(region, pages, into)`` reads given pages of a
region (ascending page indices) once more, consecutive ones in one system
call each: the scan compares pages it did not keep this way
(vmshare.prediction.scanning).

Reading in place: a file source whose pages are stored plainly (raw, ELF)
lists where they lie (``stored_extents``), and ``mapped_runs()`` gives them
as runs over the file mapped read-only, nothing copied: a content sketch
reads a few words of every page and whole pages only for some
(vmshare.prediction.sketch). Touching a mapped page of a file that shrank
since raises SIGBUS: such runs go only to the C loops that catch it
(vmshare.engine._pages).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt

from vmshare.errors import DumpError
from vmshare.model import PAGE_SIZE, PageRun, Region
from vmshare.sources._readpages import pread_ranges

#: Default number of pages per yielded run (16 MiB), the size of the reused buffer.
DEFAULT_CHUNK_PAGES = 4096
#: where a source reads each run: a writable view of the size asked for
ReadInto = Callable[[int], memoryview]
#: (k, n): the k-th of n interleaved shares of a source's chunks (runs)
Part = tuple[int, int]
WHOLE: Part = (0, 1)


@runtime_checkable
class PageSource(Protocol):
    """Something that yields pages: a dump file, a raw image, a live process."""

    name: str
    #: where ``runs`` reads each run (None: one buffer the source reuses)
    read_into: ReadInto | None

    def regions(self) -> list[Region]:
        """The regions runs are keyed by, in address order."""
        ...

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
             ) -> Iterator[PageRun]:
        """Stream present pages; holes are skipped. ``data`` may be reused between
        yields. ``part=(k, n)``: only the k-th of n interleaved shares of the
        chunks (a source that cannot split gives everything to k=0), so n
        readers can read one source at once; the shares are disjoint and
        cover every page."""
        ...

    def read_pages(self, region: str, pages: npt.NDArray[np.int64], into: memoryview) -> None:
        """Read pages ``pages`` (ascending indices, each yielded by ``runs``) of
        ``region`` again, now, into ``into`` in that order."""
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> Self:
        ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        ...


Mask = npt.NDArray[np.bool_]


def masked_runs(source: PageSource, chunk_pages: int = DEFAULT_CHUNK_PAGES,
                part: Part = WHOLE) -> Iterator[tuple[PageRun, Mask | None]]:
    """The source's runs, each with the mask of its pages to take (None: all):
    a source that drops pages inside what it read (live memory less the zero
    pages KSM never sees: ``KernelVisiblePages.masked_runs``) gives each read
    whole with a mask, where ``runs`` cuts it (hundreds of runs a read on THP
    memory); any other source, its runs, unmasked."""
    masked: Callable[[int, Part], Iterator[tuple[PageRun, Mask | None]]] | None = \
        getattr(source, "masked_runs", None)
    if masked is not None:
        return masked(chunk_pages, part)
    return ((run, None) for run in source.runs(chunk_pages, part))


def file_type(mode: int) -> str:
    """What ``stat``'s mode says a path is, in words for an error message."""
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return words
    return f"of unknown type {stat.S_IFMT(mode):#o}"


def open_dump_file(path: str) -> tuple[int, os.stat_result, int]:
    """Open a dump read-only, refusing what is neither a regular file nor a
    block device (a FIFO would block the open and every read forever; a
    character device such as /dev/zero never ends). Returns (fd, stat, size);
    a block device's size is where it ends, its st_size being 0.

    The type is checked with stat before the open, and again on the open
    descriptor: the open is non-blocking, so a FIFO swapped in between cannot
    block it. Raises DumpError naming the path and its type, or the OS error.
    """
    try:
        before = os.stat(path)
    except OSError as exc:
        raise DumpError(f"{path}: cannot open dump: {exc.strerror}") from exc
    _check_dump_type(path, before.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise DumpError(f"{path}: cannot open dump: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        _check_dump_type(path, st.st_mode)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise DumpError(f"{path}: replaced while being opened; try again")
        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        os.set_blocking(fd, True)
    except OSError as exc:
        os.close(fd)
        raise DumpError(f"{path}: cannot stat dump: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd, st, size


def _check_dump_type(path: str, mode: int) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise DumpError(f"{path}: is {file_type(mode)}, not a dump: give a regular file "
                        "or a block device")


def check_part(part: Part) -> Part:
    k, n = part
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k < n):
        raise ValueError(f"part must be (k, n) with 0 <= k < n, not {part!r}")
    return part


def mine(index: int, part: Part) -> bool:
    """Is chunk ``index`` in share ``part``?"""
    return index % part[1] == part[0]


def check_chunk_pages(chunk_pages: int) -> int:
    if not isinstance(chunk_pages, int) or chunk_pages < 1:
        raise ValueError(f"chunk_pages must be a positive int, not {chunk_pages!r}")
    return chunk_pages


class Closing:
    """``with`` support and a best-effort close on garbage collection, for
    sources that set ``_closed`` and define ``close()``."""

    _closed: bool

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort only; callers are expected to close() or use ``with``.
        if not getattr(self, "_closed", True):
            self.close()


class FileSource(Closing):
    """Shared plumbing for sources backed by one regular file (or block device)
    opened read-only; anything else is refused at open (see open_dump_file).

    Subclasses parse in ``__init__`` (after this constructor ran) and close the
    file themselves if parsing fails, via ``_fail_closed``.
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = os.fspath(path)
        self.name = name if name is not None else self.path
        self.read_into: ReadInto | None = None
        self._fd, st, self.file_size = open_dump_file(self.path)
        # Region.generation for every region of this file: a new dump written
        # under the same name is a different file (inode, mtime, size).
        self.file_generation = f"{st.st_dev:x}:{st.st_ino}:{st.st_mtime_ns}:{self.file_size}"
        self._closed = False

    # -- reading -----------------------------------------------------------
    def pread_exact(self, buf: memoryview, offset: int, what: str) -> None:
        """Fill ``buf`` from ``offset`` or raise DumpError naming ``what`` as truncated."""
        want = len(buf)
        if offset < 0 or offset + want > self.file_size:
            raise DumpError(f"{self.path}: {what} at offset {offset:#x} (+{want:#x}) is past "
                            f"the end of the file ({self.file_size:#x} bytes)")
        done = 0
        while done < want:
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise DumpError(f"{self.path}: reading {what} failed: "
                                f"{exc.strerror or errno.errorcode.get(exc.errno or 0)}") from exc
            if n == 0:
                raise DumpError(f"{self.path}: file truncated while reading {what} at "
                                f"offset {offset + done:#x}")
            done += n

    def run_buffer(self, chunk_pages: int) -> Callable[[int], memoryview]:
        """Where ``runs`` reads each run of up to ``chunk_pages`` pages:
        ``read_into`` when set, else one buffer reused for every run."""
        if self.read_into is not None:
            return self.read_into
        view = memoryview(bytearray(chunk_pages * PAGE_SIZE))
        return lambda n: view[:n]

    def read_stored(self, into: memoryview, offset: int, stored: int, what: str) -> None:
        """Fill ``into`` from ``offset``: ``stored`` bytes of the file (at most
        len(into)), the rest zero (a dump's last partial page)."""
        self.pread_exact(into[:stored], offset, what)
        if stored < len(into):
            into[stored:] = bytes(len(into) - stored)

    def read_bytes(self, offset: int, size: int, what: str) -> bytes:
        """Read a small, already bounds-checked structure."""
        buf = bytearray(size)
        self.pread_exact(memoryview(buf), offset, what)
        return bytes(buf)

    # -- reading in place ----------------------------------------------------
    def stored_extents(self) -> list[tuple[str, int, int, int]] | None:
        """Where the pages lie in the file: (region key, first page, file offset,
        bytes stored) per stretch stored plainly, or None when they are not
        (compressed)."""
        return None

    @contextmanager
    def mapped_runs(self) -> Iterator[list[PageRun]]:
        """The pages of ``stored_extents`` as runs whose ``data`` is the file
        mapped read-only (a stretch's partial last page is read and zero-filled
        apart); valid inside the ``with`` only. Raises DumpError (not stored
        plainly, cannot map)."""
        self._check_open()
        extents = self.stored_extents()
        if extents is None:
            raise DumpError(f"{self.path}: pages are not stored plainly; cannot map them")
        mm = None
        views: list[memoryview] = []
        try:
            if self.file_size:
                try:
                    if os.fstat(self._fd).st_size < self.file_size and stat.S_ISREG(
                            os.fstat(self._fd).st_mode):
                        raise DumpError(f"{self.path}: the file shrank since it was opened")
                    # populated at once: one call instead of a fault per 64 KiB
                    mm = mmap.mmap(self._fd, self.file_size, prot=mmap.PROT_READ,
                                   flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
                except (OSError, ValueError) as exc:
                    raise DumpError(f"{self.path}: cannot map the dump: {exc}") from exc
                views.append(memoryview(mm))
            yield [run for ext in extents for run in self._extent_runs(views, ext)]
        finally:
            for v in reversed(views):
                v.release()
            if mm is not None:
                mm.close()

    def _extent_runs(self, views: list[memoryview], ext: tuple[str, int, int, int]
                     ) -> list[PageRun]:
        key, first, offset, stored = ext
        whole = stored // PAGE_SIZE * PAGE_SIZE
        if offset < 0 or offset + stored > self.file_size:
            raise DumpError(f"{self.path}: pages at offset {offset:#x} (+{stored:#x}) are "
                            "past the end of the file")
        out = []
        if whole:
            views.append(views[0][offset:offset + whole])
            out.append(PageRun(self.name, key, first, views[-1]))
        if stored > whole:
            tail = memoryview(bytearray(PAGE_SIZE))
            self.read_stored(tail, offset + whole, stored - whole, "last page")
            out.append(PageRun(self.name, key, first + whole // PAGE_SIZE, tail))
        return out

    # -- lifetime ----------------------------------------------------------
    def _fail_closed(self) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def _check_open(self) -> None:
        if self._closed:
            raise DumpError(f"{self.path}: page source is closed")



def pages_for(nbytes: int) -> int:
    """Pages needed to cover ``nbytes`` (a partial last page counts as one)."""
    return (nbytes + PAGE_SIZE - 1) // PAGE_SIZE


def page_ranges(pages: npt.NDArray[np.int64]) -> list[tuple[int, int, int]]:
    """Stretches of consecutive page indices in ``pages`` (ascending):
    (index into ``pages`` of the first, its page, pages in the stretch)."""
    if not pages.size:
        return []
    cut = np.flatnonzero(np.diff(pages, prepend=pages[:1] - 2) != 1)
    counts = np.diff(np.append(cut, pages.size))
    return list(zip(cut.tolist(), pages[cut].tolist(), counts.tolist(), strict=True))


def pread_pages(fd: int, page0: int, pages: npt.NDArray[np.int64], into: memoryview,
                slow: Callable[[memoryview, int], None]) -> None:
    """Fill ``into`` with pages ``pages`` (ascending) of ``fd``, page p at file
    offset ``page0 + p * PAGE_SIZE``: each stretch of consecutive pages in one
    pread, all of them in C without the GIL (``_readpages.pread_ranges``). A
    stretch that fails there is read again by ``slow(view, offset)``, which
    raises the source's own error (or, if the failure passed, reads it)."""
    if not pages.size:
        return
    cut = np.flatnonzero(np.diff(pages, prepend=pages[:1] - 2) != 1)
    counts = np.diff(np.append(cut, pages.size))
    offsets = page0 + pages[cut] * PAGE_SIZE
    sizes = counts * PAGE_SIZE
    at = (cut * PAGE_SIZE).tolist()
    i = 0
    while i < cut.size:
        i = pread_ranges(fd, offsets, sizes, into[at[i]:], i)
        if i < cut.size:
            slow(into[at[i]:at[i] + int(sizes[i])], int(offsets[i]))
            i += 1


def check_into(into: memoryview, pages: npt.NDArray[np.int64]) -> None:
    if len(into) != pages.size * PAGE_SIZE:
        raise ValueError(f"{len(into)} bytes for {pages.size} pages")
