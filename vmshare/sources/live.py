"""Live memory of a running process (a QEMU guest's RAM mappings, or any
process's private anonymous memory), read from /proc/<pid>/mem.

Only resident pages are read: /proc/<pid>/pagemap is consulted first for
each chunk and runs are yielded only over pages whose present bit (63) is
set, so reading never faults non-resident memory in (a swapped page, bit
62, is skipped as well). In a file mapping (private file or memfd guest
RAM) only the pages the process wrote are read: the page-cache pages it only
read (bit 61) are never merged by KSM (``scannable``). /proc/<pid>/mem and
pagemap are opened once, at construction: both descriptors stay bound to
that process's address space, so a pid reused later cannot be read by mistake.

Both descriptors come from procfs.ProcFs.open_fd (ksm/ alone opens /proc),
and pagemap is read here through the held one rather than by ProcFs.pagemap,
which opens the file anew, for that reason; mappings (smaps), the process
start time and liveness come from ProcFs, the entry bits from its PM_*
constants. Each run carries the pagemap entries of its pages as read in that
pass (``LivePageRun.pagemap``), so a consumer needing PFNs
(``vmshare.sources.visible.KernelVisiblePages``) reads pagemap no second time.

Why /proc/<pid>/mem and not process_vm_readv(2), which reads 1 GiB in
0.13-0.16 s against 0.21 s into a populated buffer (measured here): the latter
pins the pages it reads (FOLL_PIN), and since Linux 5.19 a read-only pin of an
anonymous page that is not exclusive unshares it first. A KSM page is never
exclusive, so process_vm_readv breaks every merge it reads: measured on 4,096
merged pages of a process, all of their PFNs changed and its smaps_rollup
"KSM:" fell from 16384 kB to 0, each page now a private copy. Reading
/proc/<pid>/mem takes plain references (FOLL_GET) and changed none. A tool
that must not cost the host memory reads /proc/<pid>/mem.

Where runs are read: one buffer reused for every run, or with ``read_into``
set the view it gives for each run (the scan's read ring). ``read_pages``
reads given pages again, each stretch of consecutive pages in one read.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmshare.errors import AccessDenied, ProcessGone, ProcfsError, VmshareError
from vmshare.ksm.procfs import PM_FILE_BIT, PM_PRESENT_BIT, ProcFs
from vmshare.model import PAGE_SIZE, PageRun, Region, Vma
from vmshare.sources.base import (
    DEFAULT_CHUNK_PAGES,
    WHOLE,
    Closing,
    Part,
    ReadInto,
    check_chunk_pages,
    check_into,
    check_part,
    mine,
    pread_pages,
)

PM_PRESENT = np.uint64(1 << PM_PRESENT_BIT)
PM_FILE = np.uint64(1 << PM_FILE_BIT)
U64 = npt.NDArray[np.uint64]
_DENIED = (errno.EPERM, errno.EACCES)
_GONE = (errno.ESRCH, errno.ENOENT)


def scannable(entries: U64, vma: Vma) -> npt.NDArray[np.bool_]:
    """Which pages of ``vma`` (its pagemap ``entries``) KSM could ever merge: the
    present ones, and in a file mapping (a private file or memfd guest RAM
    backend) only those the process wrote, its private anonymous copies: a
    page still in the page cache (pagemap bit 61) is never merged."""
    ok: npt.NDArray[np.bool_] = (entries & PM_PRESENT) != 0
    if not vma.anonymous_private:
        ok &= (entries & PM_FILE) == 0
    return ok


def private_anonymous_vmas(pid: int, procfs: ProcFs | None = None) -> list[Vma]:
    """The private anonymous mappings of ``pid`` (heap included), from smaps.

    Raises ProcessGone, AccessDenied or ProcfsError (from procfs.ProcFs).
    """
    return [v for v in (procfs or ProcFs()).smaps(pid) if v.anonymous_private and v.size > 0]


def _access_denied(pid: int, what: str) -> AccessDenied:
    return AccessDenied(
        f"cannot read {what} of process {pid}: permission denied. Reading another "
        "process's memory needs root (CAP_SYS_PTRACE) and is also refused by "
        "kernel.yama.ptrace_scope=3 and by sVirt/SELinux/AppArmor confinement of the "
        "guest; vmshare weakens none of these")


@dataclass(frozen=True)
class LivePageRun(PageRun):
    """A run of live memory with ``pagemap[i]``, the /proc/<pid>/pagemap entry of
    page i read in the same pass (PFN, flags). Like ``data`` it may point into a
    buffer reused for the next run. ``zero_pages``: how many of its pages are
    all zero, when a wrapper already counted them (else None)."""

    pagemap: U64
    zero_pages: int | None = field(default=None, kw_only=True)


class LiveProcessSource(Closing):
    """Resident pages of the given mappings of process ``pid``.

    Regions: one per mapping, keyed ``backend_ids[vma.start]`` when given
    (a QEMU RAM backend id such as "pc.ram"), else "vma@0x<start>"; the
    generation is "<pid>:<start hex>:<size>:<process start time>", so a
    reused pid, a moved or resized mapping is a new generation.

    Raises (at construction and while streaming) AccessDenied on EPERM/EACCES,
    ProcessGone when the process vanished (ESRCH/ENOENT, or EIO/end of file
    once it has exited), ProcfsError when a mapping is no longer readable in a
    process that is still alive (it was unmapped or changed).
    """

    def __init__(self, pid: int, vmas: Sequence[Vma], name: str | None = None, *,
                 backend_ids: Mapping[int, str] | None = None,
                 procfs: ProcFs | None = None) -> None:
        self.pid = pid
        #: where each run is read (a writable view of the size asked for, valid
        #: beyond the next yield), else one buffer reused for every run
        self.read_into: ReadInto | None = None
        self.name = name if name is not None else f"pid:{pid}"
        self._procfs = procfs or ProcFs()
        self.vmas = sorted(vmas, key=lambda v: v.start)
        for v in self.vmas:
            if v.start % PAGE_SIZE or v.end % PAGE_SIZE or v.end <= v.start:
                raise ValueError(f"mapping {v.start:#x}-{v.end:#x} is not page aligned")
        self._closed = True
        self.start_time = self._procfs.start_time(pid)     # ProcessGone/AccessDenied
        self._mem_fd = self._open("mem")
        try:
            self._pagemap_fd = self._open("pagemap")
        except BaseException:
            os.close(self._mem_fd)
            raise
        self._closed = False
        # The descriptors are bound to whichever process had the pid when they
        # were opened: make sure that is still the one whose start time we read.
        if not self._same_process():
            self.close()
            raise ProcessGone(f"process {pid} exited (its pid was reused) while opening it")
        ids = backend_ids or {}
        self._regions = [
            Region(ids.get(v.start, f"vma@{v.start:#x}"), v.size,
                   f"{pid}:{v.start:x}:{v.size}:{self.start_time}")
            for v in self.vmas]

    def _open(self, what: str) -> int:
        try:
            return self._procfs.open_fd(self.pid, what)
        except AccessDenied as exc:
            raise _access_denied(self.pid, str(self._procfs.root / str(self.pid) / what)) from exc

    def _same_process(self) -> bool:
        try:
            return self._procfs.start_time(self.pid) == self.start_time
        except ProcessGone:
            return False

    def _alive(self) -> bool:
        try:   # a zombie has no memory left
            return self._procfs.alive(self.pid, self.start_time)
        except AccessDenied:
            return False

    def _alive_soon(self) -> bool:
        """Still alive 50 ms from now? A process being killed has released its
        memory (reads end early) a moment before it shows as exited."""
        for _ in range(10):
            if not self._alive():
                return False
            time.sleep(0.005)
        return True

    def _read_failed(self, what: str, addr: int, exc: OSError | None) -> VmshareError:
        if exc is not None and exc.errno in _DENIED:
            return _access_denied(self.pid, what)
        if (exc is not None and exc.errno in _GONE) or not self._alive_soon():
            return ProcessGone(f"process {self.pid} is gone (reading {what} at {addr:#x})")
        reason = exc.strerror if exc is not None else "end of file"
        return ProcfsError(f"process {self.pid}: {what} at {addr:#x} is no longer readable "
                           f"({reason}); the mapping was unmapped or changed")

    def _pread_full(self, fd: int, view: memoryview, offset: int, what: str) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise self._read_failed(what, offset + done, exc) from exc
            if n == 0:
                raise self._read_failed(what, offset + done, None)
            done += n

    def resident_bytes(self) -> int:
        """Bytes of the pages a scan would read now (present in pagemap)."""
        return sum(int(np.count_nonzero(scannable(self._pagemap(v), v)))
                   for v in self.vmas) * PAGE_SIZE

    # -- PageSource ----------------------------------------------------------
    def regions(self) -> list[Region]:
        return list(self._regions)

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
             ) -> Iterator[LivePageRun]:
        """Stream resident pages, ``chunk_pages`` at most per run (16 MiB by default).

        The yielded ``data`` and ``pagemap`` live in buffers reused for later
        runs: copy what must outlive the next iteration step. With ``read_into``
        set, ``data`` is read into the view it returns for each run instead, and
        ``pagemap`` is a copy: both outlive the iteration.
        """
        check_chunk_pages(chunk_pages)
        check_part(part)
        if self._closed:
            raise ProcfsError(f"live source for process {self.pid} is closed")
        take = self.read_into
        if take is None:
            whole = memoryview(bytearray(chunk_pages * PAGE_SIZE))
            take = lambda n: whole[:n]          # noqa: E731
        pm_buf = bytearray(chunk_pages * 8)
        pm_view = memoryview(pm_buf)
        index = 0
        for vma, region in zip(self.vmas, self._regions, strict=True):
            for addr in range(vma.start, vma.end, chunk_pages * PAGE_SIZE):
                index += 1
                if not mine(index, part):
                    continue
                npages = min(chunk_pages, (vma.end - addr) // PAGE_SIZE)
                self._pread_full(self._pagemap_fd, pm_view[:npages * 8],
                                 addr // PAGE_SIZE * 8, "pagemap")
                entries = np.frombuffer(pm_buf, dtype=np.uint64, count=npages)
                present = scannable(entries, vma)
                if present.all():           # the usual case: one run, no edges to find
                    starts, stops = [0], [npages]
                else:
                    edges = np.diff(present.astype(np.int8), prepend=np.int8(0),
                                    append=np.int8(0))
                    starts = np.nonzero(edges == 1)[0].tolist()
                    stops = np.nonzero(edges == -1)[0].tolist()
                first_page = (addr - vma.start) // PAGE_SIZE
                view = take(stops[-1] * PAGE_SIZE) if stops else None
                for s, e in zip(starts, stops, strict=True):   # one buffer, runs in place
                    assert view is not None
                    chunk = view[s * PAGE_SIZE:e * PAGE_SIZE]
                    self._pread_full(self._mem_fd, chunk, addr + s * PAGE_SIZE, "memory")
                    pm = entries[s:e] if self.read_into is None else entries[s:e].copy()
                    yield LivePageRun(self.name, region.key, first_page + s, chunk, pm)

    def read_pages(self, region: str, pages: npt.NDArray[np.int64],
                   into: memoryview) -> None:
        """Read the pages at indices ``pages`` (ascending) of ``region`` now into
        ``into``, in that order; consecutive pages in one read. For comparing
        pages at the end of a scan that did not keep them (``KsmEngine.end_scan``'s
        fetch). Raises what reading raises (ProcessGone, AccessDenied, ProcfsError).
        """
        k = next((i for i, r in enumerate(self._regions) if r.key == region), None)
        if k is None:
            raise ProcfsError(f"process {self.pid} has no region {region!r}")
        check_into(into, pages)
        pread_pages(self._mem_fd, self.vmas[k].start, pages, into,
                    lambda view, addr: self._pread_full(self._mem_fd, view, addr, "memory"))

    def _pagemap(self, vma: Vma) -> U64:
        """The pagemap entries of every page of ``vma`` (8 bytes a page)."""
        out = np.empty(vma.size // PAGE_SIZE, dtype=np.uint64)
        self._pread_full(self._pagemap_fd, memoryview(out.data).cast("B"),
                         vma.start // PAGE_SIZE * 8, "pagemap")
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._mem_fd)
            os.close(self._pagemap_fd)
