"""One full engine scan over page sources, and its buffers.

``scan_sources`` reads the sources in a helper thread (``_read_sources``;
system calls release the GIL) one bounded queue (``_Handoff``) ahead of the
engine's hashing (``_feed``). The engine keeps references to fed bytes until
``end_scan``, so every page read is held until the scan ends: ``ScanArena``
provides those buffers (reused by the next scan; live memory is read straight
into them). Where that would not fit in available memory
(vmshare.prediction.planning chooses before anything is read), live memory
goes through a few reused buffers (``ReadRing``) and the engine re-reads at
the end only the pages to compare (``live_fetch``).
With soft-dirty tracking (``ScanArena(soft_dirty=True)`` on a kernel that
tracks it) live sources keep their copies between scans and re-read only the
pages written since (``vmshare.sources.softdirty.SoftDirtyMirror``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vmshare.engine import KsmEngine
from vmshare.model import PAGE_SIZE, PageRun, Region
from vmshare.sources import DEFAULT_CHUNK_PAGES, LiveProcessSource, PageSource
from vmshare.sources.live import LivePageRun, TrackedPageRun
from vmshare.sources.softdirty import SoftDirtyMirror, anon_buffer, soft_dirty_supported
from vmshare.sources.visible import KernelVisiblePages, zero_rows

_DONE = object()
_QUEUE_RUNS = 4
#: read buffers of a scan that keeps no copy of live memory (ReadRing)
RING_CHUNKS = 6


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
        #: (vmshare.sources.live); without tracking a mirror would save nothing
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


class ReadRing:
    """A few populated read buffers, reused while a scan reads live memory it
    does not keep (the engine re-reads what it compares at the end).

    The reader takes a chunk per run (``take``); each item queued from it adds
    a hold (``hold``) and the consumer drops it after feeding (``release``).
    A chunk is free again once its reader has moved on and no item holds it.
    """

    def __init__(self, chunk_bytes: int, chunks: int = RING_CHUNKS) -> None:
        self.chunk_bytes = chunk_bytes
        self.limit = chunks
        self._bufs: list[Any] = []
        self._holds: list[int] = []
        self._free: list[int] = []
        self._by_obj: dict[int, int] = {}
        self._reading: int | None = None
        self._closed = False
        self._cond = threading.Condition()

    def close(self) -> None:
        """Wake a reader waiting for a chunk: the scan is over (or failed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, n: int) -> memoryview:
        if n > self.chunk_bytes:
            return memoryview(bytearray(n))
        with self._cond:
            if self._reading is not None:
                self._drop(self._reading)         # the reader has moved on
            while not self._free and len(self._bufs) >= self.limit:
                if self._closed:
                    raise RuntimeError("scan ended while reading")
                self._cond.wait()
            if self._free:
                k = self._free.pop()
            else:
                k = len(self._bufs)
                self._bufs.append(anon_buffer(self.chunk_bytes))   # populated: no faults
                self._holds.append(0)
                self._by_obj[id(self._bufs[k])] = k
            self._holds[k] = 1
            self._reading = k
            return memoryview(self._bufs[k])[:n]

    def _chunk(self, data: memoryview) -> int | None:
        return self._by_obj.get(id(data.obj))

    def hold(self, data: memoryview) -> None:
        with self._cond:
            k = self._chunk(data)
            if k is not None:
                self._holds[k] += 1

    def release(self, data: memoryview) -> None:
        with self._cond:
            k = self._chunk(data)
            if k is not None:
                self._drop(k)

    def done_reading(self) -> None:
        with self._cond:
            if self._reading is not None:
                self._drop(self._reading)
                self._reading = None

    def _drop(self, k: int) -> None:
        self._holds[k] -= 1
        if k == self._reading and self._holds[k] == 0:
            self._reading = None
        if self._holds[k] == 0:
            self._free.append(k)
            self._cond.notify_all()


def live_fetch(sources: Sequence[PageSource], base: dict[tuple[str, str], int]
               ) -> Callable[[Any], memoryview]:
    """A fetch for KsmEngine.end_scan: global positions of live sources' pages
    -> those pages read again now (``LiveProcessSource.read_pages``)."""
    spans = sorted((start, s, key) for s in sources
                   if isinstance(s, (LiveProcessSource, KernelVisiblePages))
                   for (name, key), start in base.items() if name == s.name)
    starts = np.array([sp[0] for sp in spans], dtype=np.int64)

    def fetch(pos: Any) -> memoryview:
        which = np.searchsorted(starts, pos, side="right") - 1
        out = memoryview(bytearray(pos.size * PAGE_SIZE))
        done = 0
        for w in np.unique(which).tolist():      # ascending: the order of pos
            start, src, key = spans[w]
            local = pos[which == w] - start
            src.read_pages(key, local, out[done:done + local.size * PAGE_SIZE])
            done += local.size * PAGE_SIZE
        return out

    return fetch


def _layout(sources: Sequence[PageSource]
            ) -> tuple[dict[str, list[Region]], dict[tuple[str, str], int], int]:
    """Each source's regions, the scan-wide position of each region's first page
    (keyed by source name and region key) in scan order, and the pages in all."""
    regions = {s.name: s.regions() for s in sources}
    base: dict[tuple[str, str], int] = {}
    total = 0
    for name, regs in regions.items():
        for r in regs:
            base[(name, r.key)] = total
            total += r.size // PAGE_SIZE
    return regions, base, total


class _Handoff:
    """The bounded queue from the reader thread to the engine. Once the scan
    stops (done or failed), ``put`` gives up instead of blocking forever."""

    def __init__(self) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_RUNS)
        self.stop = threading.Event()

    def put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> PageRun | None:
        """The next run; None once the reader is done. Raises what the reader raised."""
        item = self._q.get()
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, PageRun)
        return item


def _read_sources(sources: Sequence[PageSource], arena: ScanArena, ring: ReadRing | None,
                  handoff: _Handoff) -> None:
    """The reader thread: every source's runs in order, then _DONE, or what failed.

    Live process memory is read straight into the ring (reread) or the arena
    (or comes from the soft-dirty mirror); other sources' runs are copied
    into the arena, as they reuse their read buffer.
    """
    try:
        for s in sources:
            live = s.inner if isinstance(s, KernelVisiblePages) else s
            direct = isinstance(live, LiveProcessSource)
            if isinstance(live, LiveProcessSource):
                live.mirror = arena.mirror
                live.read_into = ring.take if ring is not None else arena.take
            for run in s.runs():
                if direct or isinstance(run, TrackedPageRun):
                    item: PageRun = run      # ring, arena or mirror bytes
                    if ring is not None:
                        ring.hold(item.data)
                else:
                    item = PageRun(s.name, run.region, run.first_page, arena.copy(run.data))
                if not handoff.put(item):
                    return
            if ring is not None:
                ring.done_reading()
        handoff.put(_DONE)
    except BaseException as exc:   # handed to the scanning thread
        handoff.put(exc)


def _feed(engine: KsmEngine, item: PageRun, ring: ReadRing | None,
          zero: dict[str, int]) -> bool:
    """Feed one run to the engine and count its zero pages into ``zero``.
    Returns whether it came from the read ring (the engine then keeps no
    reference, and reads the pages it compares again at end_scan)."""
    from_ring = ring is not None and isinstance(item, LivePageRun) \
        and not isinstance(item, TrackedPageRun)
    engine.feed(item, item.unchanged if isinstance(item, TrackedPageRun) else None,
                retain=not from_ring)
    counted = item.zero_pages if isinstance(item, LivePageRun) else None
    zero[item.source] += counted if counted is not None else \
        zero_rows(item.data).size         # here: the reader is the bottleneck
    if from_ring:
        assert ring is not None
        ring.release(item.data)
    return from_ring


def scan_sources(engine: KsmEngine, sources: Sequence[PageSource], *,
                 progress: Callable[[float], None] | None = None,
                 arena: ScanArena | None = None, reread: bool = False) -> ScanStats:
    """One full engine scan over ``sources`` (scan order: as given).

    Reading (a system call that releases the GIL) runs in a helper thread
    (``_read_sources``) ahead of the engine's hashing (``_feed``), one bounded
    queue apart. Live process memory is read straight into the arena, or with
    ``reread`` (vmshare.prediction.planning.plan_scan) into a few reused
    buffers, the engine reading again at the end the pages it compares; other
    sources' runs are copied into the arena. Raises what the sources raise
    (DumpError, ProcessGone, AccessDenied, ProcfsError); the engine is then
    left mid-scan and must be discarded.
    """
    t0 = time.perf_counter()
    arena = arena if arena is not None else ScanArena()
    arena.reset()
    regions, base, total = _layout(sources)
    ring = ReadRing(DEFAULT_CHUNK_PAGES * PAGE_SIZE) \
        if reread and arena.mirror is None else None
    handoff = _Handoff()
    zero: dict[str, int] = {s.name: 0 for s in sources}
    fed = 0
    live_fed = False
    engine.begin_scan(regions)
    thread = threading.Thread(target=_read_sources, args=(sources, arena, ring, handoff),
                              name="vmshare-scan-reader", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not None:
            live_fed |= _feed(engine, item, ring, zero)
            fed += item.npages
            if progress is not None and total:
                progress((base[(item.source, item.region)] + item.first_page + item.npages)
                         / total)
    finally:
        handoff.stop.set()
        if ring is not None:
            ring.close()
        thread.join()
    engine.end_scan(live_fetch(sources, base) if live_fed else None)
    return ScanStats(fed, time.perf_counter() - t0, zero)
