"""Copies of live regions kept between scans, refreshed through soft-dirty bits.

Incremental rescans (opt-in): a ``SoftDirtyMirror`` keeps a copy of
each region's resident pages between scans. After reading the dirty bits of
a scan the live source writes "4" to /proc/<pid>/clear_refs (the kernel's soft-dirty
tracking, as CRIU uses it); at the next scan only pages whose pagemap bit 55
(soft-dirty) is set were written since, so only those are read again. The
others are yielded from the copy as ``TrackedPageRun`` with ``unchanged``
set, and the engine reuses their checksums (``KsmEngine.feed``). Costs and
limits: clear_refs write-protects the process's page tables, so the next
write to each page takes one extra minor fault in the guest; a write that
lands between reading the dirty bits and clearing them (the pagemap of all
regions is read just before the clear, a window of milliseconds) is missed
until the page is written again. A kernel without CONFIG_MEM_SOFT_DIRTY
tracks nothing (probed once: ``soft_dirty_supported``): every page is then
read each scan.

The mirror holds the copies; ``LiveProcessSource`` (sources/live.py) reads
through it when given one. ``anon_buffer`` also serves the scan's read ring
(prediction/scanning.py).
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from vmshare.errors import VmshareError
from vmshare.ksm.procfs import PM_PRESENT_BIT, ProcFs
from vmshare.model import PAGE_SIZE, Region

PM_SOFT_DIRTY_BIT = 55   # Documentation/admin-guide/mm/soft-dirty.rst
PM_SOFT_DIRTY = np.uint64(1 << PM_SOFT_DIRTY_BIT)


def anon_buffer(nbytes: int, *, populate: bool = True) -> mmap.mmap:
    """A private anonymous buffer, populated at once (MAP_POPULATE: one kernel loop
    instead of a fault per page) when it will be written in full; with
    ``populate=False`` only the pages written become memory.

    Not MADV_HUGEPAGE: with the usual THP defrag setting ("madvise") a huge page
    fault may compact memory synchronously, and on a host full of guests (or in
    a VM whose free memory is not backed yet) faulting in 1 GiB that way was
    measured at 0.9-1.9 s against 0.29 s populated with small pages.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(nbytes, PAGE_SIZE), flags=flags)


_SOFT_DIRTY_WORKS: bool | None = None


def soft_dirty_supported() -> bool:
    """Does this kernel track soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)?

    Without it clear_refs "4" is accepted and does nothing, and pagemap bit 55
    is always 0: every page would look unchanged forever. A page this process
    just mapped and wrote is always soft-dirty when tracking exists, so that is
    the probe (our own pagemap; nothing is cleared).
    """
    global _SOFT_DIRTY_WORKS
    if _SOFT_DIRTY_WORKS is None:
        probe = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            probe[0] = 1
            addr = int(np.frombuffer(probe, dtype=np.uint8).__array_interface__["data"][0])
            try:
                entry = int(ProcFs().pagemap(os.getpid(), addr, 1)[0])
            except VmshareError:
                entry = 0
            _SOFT_DIRTY_WORKS = bool(entry >> PM_PRESENT_BIT & 1 and entry >> PM_SOFT_DIRTY_BIT & 1)
        finally:
            probe.close()
    return _SOFT_DIRTY_WORKS


class RegionCopy:
    __slots__ = ("buf", "valid")

    def __init__(self, npages: int) -> None:
        # spans the region, but only the resident pages read into it become memory
        self.buf = anon_buffer(npages * PAGE_SIZE, populate=False)
        self.valid = np.zeros(npages, dtype=np.bool_)   # copy holds the page's bytes


class SoftDirtyMirror:
    """Copies of live regions kept between scans, refreshed through soft-dirty bits.

    One mirror serves any number of processes and scans; copies are keyed by
    region generation (pid, mapping, process start time), so a restarted guest
    or a moved mapping starts from scratch. Not thread-safe: one scan at a time.
    """

    def __init__(self) -> None:
        self._copies: dict[tuple[str, str], RegionCopy] = {}
        #: False without kernel soft-dirty tracking (or once clear_refs was refused):
        #: every page is then read each scan
        self.supported = soft_dirty_supported()
        self.pages_read = 0             # pages read from the process in the last scan
        self.pages_reused = 0           # pages served from the copy in the last scan

    def copy_for(self, region: Region, live: set[tuple[str, str]]) -> RegionCopy:
        key = (region.key, region.generation)
        live.add(key)
        cp = self._copies.get(key)
        if cp is None:
            cp = self._copies[key] = RegionCopy(region.size // PAGE_SIZE)
        return cp

    def forget(self, keys: set[tuple[str, str]]) -> None:
        for k in keys:
            cp = self._copies.pop(k, None)
            if cp is not None:
                cp.valid[:] = False

    def prune(self, generation_prefix: str, keep: set[tuple[str, str]]) -> None:
        """Drop copies of this process (generation prefix) not listed in ``keep``."""
        for k in [k for k in self._copies if k[1].startswith(generation_prefix)
                  and k not in keep]:
            del self._copies[k]

    @property
    def held_bytes(self) -> int:
        """Bytes of the pages the copies hold (the copies fault in page by page)."""
        return sum(int(np.count_nonzero(c.valid)) for c in self._copies.values()) * PAGE_SIZE
