"""Live memory of a running process (a QEMU guest's RAM mappings, or any
process's private anonymous memory), read from /proc/<pid>/mem.

Only resident pages are read: /proc/<pid>/pagemap is consulted first for
each chunk and runs are yielded only over pages whose present bit (63) is
set, so reading never faults non-resident memory in (a swapped page, bit
62, is skipped as well). /proc/<pid>/mem and pagemap are opened once, at
construction: both descriptors stay bound to that process's address space,
so a pid reused later cannot be read by mistake.

Unlike the rest of vmshare/ksm/procfs.py's /proc readers, pagemap is read
here through the held descriptor, for that reason; mappings (smaps) and the
process start time come from procfs.ProcFs.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Self

import numpy as np

from vmshare.dumps.base import DEFAULT_CHUNK_PAGES, check_chunk_pages
from vmshare.errors import AccessDenied, ProcessGone, ProcfsError, VmshareError
from vmshare.ksm.procfs import ProcFs
from vmshare.model import PAGE_SIZE, PageRun, Region, Vma

PM_PRESENT = np.uint64(1 << 63)
_DENIED = (errno.EPERM, errno.EACCES)
_GONE = (errno.ESRCH, errno.ENOENT)


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


class LiveProcessSource:
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
        path = f"/proc/{self.pid}/{what}"
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in _DENIED:
                raise _access_denied(self.pid, path) from exc
            if exc.errno in _GONE:
                raise ProcessGone(f"process {self.pid} is gone ({path})") from exc
            raise ProcfsError(f"cannot open {path}: {exc.strerror}") from exc

    def _same_process(self) -> bool:
        try:
            return self._procfs.start_time(self.pid) == self.start_time
        except ProcessGone:
            return False

    def _alive(self) -> bool:
        if not self._same_process():
            return False
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in (b"Z", b"X")   # a zombie has no memory left

    def _read_failed(self, what: str, addr: int, exc: OSError | None) -> VmshareError:
        if exc is not None and exc.errno in _DENIED:
            return _access_denied(self.pid, what)
        if (exc is not None and exc.errno in _GONE) or not self._alive():
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

    # -- PageSource ----------------------------------------------------------
    def regions(self) -> list[Region]:
        return list(self._regions)

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES) -> Iterator[PageRun]:
        """Stream resident pages, ``chunk_pages`` at most per run (16 MiB by default).

        The yielded ``data`` lives in one buffer reused for later runs: copy
        what must outlive the next iteration step.
        """
        check_chunk_pages(chunk_pages)
        if self._closed:
            raise ProcfsError(f"live source for process {self.pid} is closed")
        buf = bytearray(chunk_pages * PAGE_SIZE)
        view = memoryview(buf)
        pm_buf = bytearray(chunk_pages * 8)
        pm_view = memoryview(pm_buf)
        for vma, region in zip(self.vmas, self._regions, strict=True):
            for addr in range(vma.start, vma.end, chunk_pages * PAGE_SIZE):
                npages = min(chunk_pages, (vma.end - addr) // PAGE_SIZE)
                self._pread_full(self._pagemap_fd, pm_view[:npages * 8],
                                 addr // PAGE_SIZE * 8, "pagemap")
                entries = np.frombuffer(pm_buf, dtype=np.uint64, count=npages)
                present = ((entries & PM_PRESENT) != 0).astype(np.int8)
                edges = np.diff(present, prepend=np.int8(0), append=np.int8(0))
                starts = np.nonzero(edges == 1)[0].tolist()
                stops = np.nonzero(edges == -1)[0].tolist()
                first_page = (addr - vma.start) // PAGE_SIZE
                for s, e in zip(starts, stops, strict=True):
                    chunk = view[s * PAGE_SIZE:e * PAGE_SIZE]
                    self._pread_full(self._mem_fd, chunk, addr + s * PAGE_SIZE, "memory")
                    yield PageRun(self.name, region.key, first_page + s, chunk)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._mem_fd)
            os.close(self._pagemap_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
