"""One full engine scan over page sources, and the memory it needs.

``scan_sources`` reads the sources in a helper thread (system calls release
the GIL) one bounded queue ahead of the engine's hashing. The engine keeps
references to fed bytes until ``end_scan``, so every page read is held until
the scan ends: ``ScanArena`` provides those buffers (reused by the next scan;
live memory is read straight into them), and ``check_scan_memory`` refuses a
scan whose copies would not fit in available memory before anything is read.
With soft-dirty tracking (``ScanArena(soft_dirty=True)`` on a kernel that
tracks it) live sources keep their copies between scans and re-read only the
pages written since (``vmshare.dumps.live.SoftDirtyMirror``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vmshare.dumps import DEFAULT_CHUNK_PAGES, LiveProcessSource, PageSource
from vmshare.dumps.live import SoftDirtyMirror, TrackedPageRun, anon_buffer, soft_dirty_supported
from vmshare.dumps.visible import KernelVisiblePages, zero_rows
from vmshare.engine import KsmEngine
from vmshare.errors import MemoryRefused
from vmshare.ksm.procfs import ProcFs, headroom
from vmshare.model import PAGE_SIZE, PageRun


@dataclass(frozen=True)
class ScanStats:
    pages_fed: int
    seconds: float
    zero_content: dict[str, int]     # pages whose bytes were all zero, per source


class ScanArena:
    """Buffers for one scan's page copies, reused by the next scan.

    The engine keeps references to fed bytes until ``end_scan`` and sources
    reuse their read buffer, so each run is copied; copying into buffers that
    were already faulted in by the previous scan costs a memcpy, not a page
    fault per page. Runs are packed, so many small runs do not waste chunks.
    """

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_PAGES * PAGE_SIZE, *,
                 soft_dirty: bool = False) -> None:
        self.chunk_bytes = chunk_bytes
        self._buffers: list[Any] = []
        #: with soft_dirty (on a kernel that tracks it), live process sources keep
        #: their pages here between scans and read only what was written since
        #: (vmshare.dumps.live); without tracking a mirror would save nothing
        self.mirror: SoftDirtyMirror | None = \
            SoftDirtyMirror() if soft_dirty and soft_dirty_supported() else None
        self._index = 0
        self._used = 0

    def reset(self) -> None:
        """Start a new scan: the previous scan's end_scan has released its views."""
        self._index = 0
        self._used = 0

    def reserve(self, nbytes: int) -> None:
        """Room for ``nbytes`` of copies, populated now in one mapping (one kernel
        loop, before reading starts) rather than chunk by chunk while reading."""
        have = self.buffer_bytes
        if nbytes > have:
            self._buffers.append(anon_buffer(-(-(nbytes - have) // self.chunk_bytes)
                                             * self.chunk_bytes))

    def take(self, n: int) -> memoryview:
        """A writable view of ``n`` bytes, valid until the next ``reset``."""
        if n > self.chunk_bytes:
            return memoryview(bytearray(n))
        while self._index < len(self._buffers) and \
                self._used + n > len(self._buffers[self._index]):
            self._index += 1
            self._used = 0
        if self._index == len(self._buffers):
            self._buffers.append(anon_buffer(self.chunk_bytes))   # populated: no faults
        view = memoryview(self._buffers[self._index])[self._used:self._used + n]
        self._used += n
        return view

    @property
    def buffer_bytes(self) -> int:
        return sum(len(b) for b in self._buffers)

    def copy(self, data: memoryview) -> memoryview:
        view = self.take(len(data))
        view[:] = data
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of page copies held: the arena's buffers and the mirror's pages."""
        return self.buffer_bytes + (self.mirror.held_bytes if self.mirror is not None else 0)


_DONE = object()
_QUEUE_RUNS = 4
#: engine state and scan temporaries per page of every region scanned (measured
#: peak 22-23 bytes: benchmarks/engine_memory.py), with room to spare
ENGINE_BYTES_PER_PAGE = 32


def check_scan_memory(sources: Sequence[PageSource], arena: ScanArena,
                      procfs: ProcFs | None = None) -> int:
    """Refuse a scan whose page copies would not fit in available memory; returns
    the bytes of copies the arena will hold (for ``ScanArena.reserve``).

    A scan holds a copy of every page it reads until its end (the engine's byte
    comparisons need them): the resident pages of live sources (read from
    pagemap now), every page a dump's regions span, and the engine's per-page
    state. What the arena already holds from an earlier scan is reused. The
    need is compared with MemAvailable, keeping the larger of 256 MiB and 5% of
    RAM free (vmshare.ksm.procfs.headroom). Raises MemoryRefused naming both
    figures, ProcfsError.
    """
    spans = [sum(r.size for r in s.regions()) for s in sources]
    pages = sum(spans) // PAGE_SIZE
    data = in_arena = 0
    if arena.mirror is None and arena.buffer_bytes >= sum(spans):
        data = in_arena = sum(spans)    # the arena holds even the whole spans: no need to count
    else:
        for s, span in zip(sources, spans, strict=True):
            if isinstance(s, (LiveProcessSource, KernelVisiblePages)):
                resident = s.resident_bytes()
                data += resident
                if arena.mirror is None:       # else the mirror keeps them
                    in_arena += resident
            else:
                data += span
                in_arena += span
    need = max(0, data - arena.nbytes) + pages * ENGINE_BYTES_PER_PAGE
    room = headroom(procfs or ProcFs(), need)
    if not room.ok:
        mib = 2**20
        raise MemoryRefused(
            f"scanning {', '.join(s.name for s in sources)} would hold about "
            f"{need // mib:,} MiB (a copy of the {data // mib:,} MiB of pages read, and the "
            f"engine's state) but {room.available_bytes // mib:,} MiB is available "
            f"(MemAvailable) and {room.margin_bytes // mib:,} MiB must stay free; "
            "scan fewer at once (trust groups are scanned one after another) or free memory")
    return in_arena


def scan_sources(engine: KsmEngine, sources: Sequence[PageSource], *,
                 progress: Callable[[float], None] | None = None,
                 arena: ScanArena | None = None) -> ScanStats:
    """One full engine scan over ``sources`` (scan order: as given).

    Reading (a system call that releases the GIL) runs in a helper thread
    ahead of the engine's hashing, one bounded queue apart. Live process
    memory is read straight into the arena; other sources' runs are copied
    there (their read buffers are reused). Raises what the
    sources raise (DumpError, ProcessGone, AccessDenied, ProcfsError); the
    engine is then left mid-scan and must be discarded.
    """
    t0 = time.perf_counter()
    arena = arena if arena is not None else ScanArena()
    arena.reset()
    regions = {s.name: s.regions() for s in sources}
    base: dict[tuple[str, str], int] = {}
    total = 0
    for name, regs in regions.items():
        for r in regs:
            base[(name, r.key)] = total
            total += r.size // PAGE_SIZE
    zero: dict[str, int] = {s.name: 0 for s in sources}
    q: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_RUNS)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for s in sources:
                live = s.inner if isinstance(s, KernelVisiblePages) else s
                direct = isinstance(live, LiveProcessSource)
                if isinstance(live, LiveProcessSource):
                    live.mirror = arena.mirror
                    live.read_into = arena.take     # read straight into the arena
                for run in s.runs():
                    if direct or isinstance(run, TrackedPageRun):
                        item: PageRun = run      # arena or mirror bytes: outlive the scan
                    else:
                        item = PageRun(s.name, run.region, run.first_page,
                                       arena.copy(run.data))
                    if not put(item):
                        return
            put(_DONE)
        except BaseException as exc:   # handed to the scanning thread
            put(exc)

    fed = 0
    engine.begin_scan(regions)
    thread = threading.Thread(target=reader, name="vmshare-scan-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, PageRun)
            engine.feed(item, item.unchanged if isinstance(item, TrackedPageRun) else None)
            zero[item.source] += zero_rows(item.data).size   # here: the reader is the bottleneck
            fed += item.npages
            if progress is not None and total:
                progress((base[(item.source, item.region)] + item.first_page + item.npages)
                         / total)
    finally:
        stop.set()
        thread.join()
    engine.end_scan()
    return ScanStats(fed, time.perf_counter() - t0, zero)
