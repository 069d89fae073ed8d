"""One full engine scan over page sources, through one bounded read buffer.

Every source (live ``/proc/<pid>/mem``, ELF, kdump and raw dumps) is read
into a ring of a few reused buffers (``ReadRing``, in
vmshare.prediction.readring: ``buffer_bytes`` in all, whatever the size of
the guest) by helper threads (``_read_sources``), which also hash each run
and check its pages with the zero page's checksum (``KsmEngine.checksums``
and ``zeros_hold``) while its bytes are in their core's cache: system calls
and C loops that release the GIL, on every core. The runs of each chunk are
queued as one item for the engine (``_feed``), which only keeps the books
and compares. A first scan needs no bytes (``KsmEngine.needs_bytes``): its
readers hand over checksums alone and reuse each chunk at once, no longer
waiting for the engine. The engine keeps no reference to what it was fed
(``retain=False``): only per-page metadata survives a run. At ``end_scan``
the engine asks for the pages it must compare byte for byte, in position
order and in bounded batches, and ``source_fetch`` reads them again from
their sources (``PageSource.read_pages``: each stretch of consecutive pages
in one system call) into one reused batch buffer. The engine compares what
it can while a run is fed (against the zero page and a store of group
representatives as large as the ring: ``begin_scan(store_pages=...)``), so
it asks again for the representatives and the groups beyond the store only.
A page the engine asks for again is compared by its bytes then; one it
compared when fed, by its bytes then, as ksmd compares a page when it
reaches it.

Memory: the ring, the store (at most the ring's size), one batch of at most
``FETCH_PAGES`` pages and the engine's per-page state (13 bytes a page;
vmshare.engine.state); nothing else grows with the guest.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmshare.engine import KsmEngine
from vmshare.errors import UsageError
from vmshare.model import PAGE_SIZE, PageRun, Region
from vmshare.prediction.readring import MIN_BUFFER_BYTES as MIN_BUFFER_BYTES  # re-exported
from vmshare.prediction.readring import (
    RING_CHUNKS,
    ReadRing,
    check_buffer_bytes,
    new_ring,
)
from vmshare.sources import PageSource
from vmshare.sources.base import Part, masked_runs
from vmshare.sources.live import LivePageRun
from vmshare.sources.visible import zero_rows

_DONE = object()
#: the read ring's default size in all (the ``--buffer-mib`` setting)
DEFAULT_BUFFER_BYTES = 32 * 2**20
@dataclass(frozen=True)
class ScanStats:
    pages_fed: int
    seconds: float
    zero_content: dict[str, int]     # pages whose bytes were all zero, per source


def source_fetch(sources: Sequence[PageSource], base: dict[tuple[str, str], int],
                 pool: tuple[ThreadPoolExecutor, int] | None = None
                 ) -> Callable[[npt.NDArray[np.int64]], memoryview]:
    """A fetch for KsmEngine.end_scan: ascending global positions -> those pages
    read again now from their sources (``read_pages``), into one buffer reused
    by every call (the engine is done with a batch when it asks for the next).
    With a ``pool`` (an executor and its workers) the batch is cut into one
    slice per worker, read at once."""
    by_name = {s.name: s for s in sources}
    spans = sorted((start, name, key) for (name, key), start in base.items())
    starts = np.array([sp[0] for sp in spans], dtype=np.int64)
    held: list[memoryview] = [memoryview(bytearray(0))]

    def read(pos: npt.NDArray[np.int64], out: memoryview) -> None:
        which = np.searchsorted(starts, pos, side="right") - 1
        cut = np.flatnonzero(np.diff(which, prepend=np.int64(-1)) != 0)   # pos ascending
        ends = np.append(cut[1:], pos.size)
        for a, b in zip(cut.tolist(), ends.tolist(), strict=True):
            start, name, key = spans[int(which[a])]
            by_name[name].read_pages(key, pos[a:b] - start,
                                     out[a * PAGE_SIZE:b * PAGE_SIZE])

    def fetch(pos: npt.NDArray[np.int64]) -> memoryview:
        n = pos.size * PAGE_SIZE
        if len(held[0]) < n:
            held[0] = memoryview(bytearray(n))
        out = held[0][:n]
        if pool is None or pool[1] < 2 or pos.size < 64:
            read(pos, out)
            return out
        cuts = np.linspace(0, pos.size, pool[1] + 1).astype(np.int64).tolist()
        jobs = [pool[0].submit(read, pos[a:b], out[a * PAGE_SIZE:b * PAGE_SIZE])
                for a, b in itertools.pairwise(cuts) if b > a]
        for job in jobs:
            job.result()
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


@dataclass(frozen=True)
class _Read:
    """One run as a reader hands it over: its checksums and all-zero pages
    counted in the reader thread, and the run itself (its bytes in the ring)
    only when the engine compares pages as they are fed (``keep``)."""

    source: str
    region: str
    first_page: int
    checksums: npt.NDArray[np.uint64]
    zero: int
    zeros_checked: bool        # KsmEngine.zeros_hold
    present: npt.NDArray[np.bool_] | None     # the pages fed (None: all)
    run: PageRun | None

    @property
    def pages(self) -> int:
        return self.checksums.size if self.present is None else \
            int(np.count_nonzero(self.present))


#: queue items at most: the ring bounds the items holding its chunks; this
#: bounds those holding checksums alone (a first scan), 16 KiB each for 8 MiB
QUEUED = 16


class _Handoff:
    """The queue from the reader threads to the engine: each item is the runs
    one reader read into one chunk (a read of live memory is one run with a
    mask of its pages, ``masked_runs``), bounded by the ring while the runs
    keep their bytes, else by QUEUED. ``keep``: whether the engine
    wants the bytes (``KsmEngine.needs_bytes``). Once the scan stops (done or
    failed), ``put`` gives up instead of blocking."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self._q: queue.Queue[object] = queue.Queue(QUEUED)
        self.stop = threading.Event()
        self._mine = threading.local()

    def put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def add(self, run: PageRun, checksums: npt.NDArray[np.uint64], zero: int,
            zeros_checked: bool, present: npt.NDArray[np.bool_] | None) -> None:
        """Queue ``run`` with the other runs of its chunk (``flush``)."""
        batch: list[_Read] | None = getattr(self._mine, "batch", None)
        if batch is None:
            batch = self._mine.batch = []
        batch.append(_Read(run.source, run.region, run.first_page, checksums, zero,
                           zeros_checked, present, run if self.keep else None))

    def flush(self, ring: ReadRing) -> bool:
        """Queue the runs this thread added since its last flush, as one item
        (holding their chunks of ``ring`` when they keep their bytes); False
        once the scan has stopped."""
        batch: list[_Read] | None = getattr(self._mine, "batch", None)
        self._mine.batch = None
        if not batch:
            return not self.stop.is_set()
        runs = [r.run for r in batch if r.run is not None]
        ring.hold(runs)
        if self.put(batch):
            return True
        ring.release(runs)
        return False

    def get(self) -> list[_Read] | None:
        """The next runs; None once a reader is done. Raises what a reader raised."""
        item = self._q.get()
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, list)
        return item


def _zero_count(run: PageRun) -> int:
    """All-zero pages of ``run`` (counted already by a live source's wrapper)."""
    counted = run.zero_pages if isinstance(run, LivePageRun) else None
    return counted if counted is not None else int(zero_rows(run.data).size)


def _read_sources(sources: Sequence[PageSource], ring: ReadRing, handoff: _Handoff,
                  part: Part, engine: KsmEngine) -> None:
    """A reader thread: its share ``part`` of every source's runs, read straight
    into the ring (``_taker``), hashed, their zero pages counted and those
    with the zero page's checksum checked here (the engine's ``checksums``
    and ``zeros_hold``; in C, the GIL released) while the pages are still in
    this core's cache, and queued a chunk at a time, then _DONE, or what
    failed. Runs come with the mask of their pages to feed (``masked_runs``:
    one run a read, not hundreds, from live THP memory)."""
    try:
        chunk_pages = ring.chunk_bytes // PAGE_SIZE
        for s in sources:
            for run, present in masked_runs(s, chunk_pages, part):
                h = engine.checksums(run.data)
                handoff.add(run, h, _zero_count(run),
                            handoff.keep and engine.zeros_hold(run.data, h), present)
            if not handoff.flush(ring):
                return
            ring.done_reading()
        handoff.put(_DONE)
    except BaseException as exc:   # handed to the scanning thread
        handoff.flush(ring)
        handoff.put(exc)


def _taker(ring: ReadRing, handoff: _Handoff) -> Callable[[int], memoryview]:
    """The sources' ``read_into``: before a reader takes its next chunk, the runs
    it read into the last one are queued (or, the scan stopped, it stops)."""
    def take(n: int) -> memoryview:
        if not handoff.flush(ring):
            raise RuntimeError("scan ended while reading")
        return ring.take(n)
    return take


def default_workers() -> int:
    """Reader threads (and threads reading pages again): one per idle core (the
    cores this process may run on less the 1-minute load average), 1 to 4.
    A reader on a core that other work keeps busy only adds memory: measured
    on 2 cores at load 3-5, two readers were no faster than one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(1, min(4, cores - int(os.getloadavg()[0])))


def _feed(engine: KsmEngine, items: list[_Read], ring: ReadRing, zero: dict[str, int]
          ) -> int:
    """Feed the runs of one queue item with their checksums (the engine keeps
    no reference), count their zero pages into ``zero`` and hand their chunks
    back to the ring; the pages fed."""
    fed = 0
    try:
        for r in items:
            if r.run is not None:
                engine.feed(r.run, retain=False, checksums=r.checksums,
                            zeros_checked=r.zeros_checked, present=r.present)
            else:
                engine.feed_checksums(r.source, r.region, r.first_page, r.checksums,
                                      r.present)
            zero[r.source] += r.zero
            fed += r.pages
    finally:
        ring.release([r.run for r in items if r.run is not None])
    return fed


def scan_sources(engine: KsmEngine, sources: Sequence[PageSource], *,
                 progress: Callable[[float], None] | None = None,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 workers: int | None = None, ring: ReadRing | None = None) -> ScanStats:
    """One full engine scan over ``sources`` (scan order: as given), reading
    through a ring of ``buffer_bytes`` (see the module docstring) with
    ``workers`` reader threads (default: default_workers()), each reading
    every n-th chunk of each source, and as many reading pages again.
    ``ring``: a ring of ``buffer_bytes`` (``new_ring``) left by an earlier
    scan, reused (run_until_converged: one per command), else a new one cut
    for the readers; a ring serves at most half as many readers as it has
    buffers (the default is cut down to that).

    Raises UsageError for a buffer below MIN_BUFFER_BYTES or an engine in
    verify mode (it needs every merged page kept), and what the sources raise
    (DumpError, ProcessGone, AccessDenied, ProcfsError), reading or reading
    again at the end; the engine is then left with the counters of its last
    completed scan and must be discarded.
    """
    check_buffer_bytes(buffer_bytes)
    if engine.verify_merged:
        raise UsageError("an engine in verify mode keeps every merged page: "
                         "feed it runs directly")
    n = workers if workers is not None else default_workers()
    if not 1 <= n <= RING_CHUNKS // 2:
        raise UsageError(f"workers must be 1 to {RING_CHUNKS // 2}, not {n}")
    if ring is not None and n > ring.limit // 2:
        if workers is not None:
            raise UsageError(f"a ring of {ring.limit} buffers serves at most "
                             f"{ring.limit // 2} readers, not {n}")
        n = ring.limit // 2
    t0 = time.perf_counter()
    regions, base, total = _layout(sources)
    if ring is None:
        ring = new_ring(buffer_bytes, n)
    else:
        ring.reopen()
    ring.fill(-(-total * PAGE_SIZE // ring.chunk_bytes))   # what the sources can use
    zero: dict[str, int] = {s.name: 0 for s in sources}
    engine.begin_scan(regions, store_pages=buffer_bytes // PAGE_SIZE)
    handoff = _Handoff(engine.needs_bytes)
    take = _taker(ring, handoff)
    for s in sources:
        s.read_into = take
    threads = [threading.Thread(target=_read_sources,
                                args=(sources, ring, handoff, (k, n), engine),
                                name=f"vmshare-scan-reader-{k}", daemon=True)
               for k in range(n)]
    for t in threads:
        t.start()
    fed = done = 0
    try:
        while done < n:
            items = handoff.get()
            if items is None:
                done += 1
                continue
            fed += _feed(engine, items, ring, zero)
            if progress is not None and total:
                progress(fed / total)
    except BaseException:
        engine.abort_scan()
        raise
    finally:
        handoff.stop.set()
        ring.close()
        for t in threads:
            t.join()
    with ThreadPoolExecutor(n, thread_name_prefix="vmshare-scan-fetch") as pool:
        engine.end_scan(source_fetch(sources, base, (pool, n)))
    return ScanStats(fed, time.perf_counter() - t0, zero)
