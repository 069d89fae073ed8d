"""The scan's read ring: a few populated buffers reused all scan long (and scan
after scan), into which reader threads read and from which the engine hashes
(vmshare.prediction.scanning). Split from scanning for size."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from typing import Any

from vmshare.errors import UsageError
from vmshare.model import PAGE_SIZE, PageRun

#: the most buffers a ring is cut into (``ring_chunks``)
RING_CHUNKS = 8
#: the smallest ring the scan accepts (16 pages a buffer at least)
MIN_BUFFER_BYTES = RING_CHUNKS * 16 * PAGE_SIZE


def ring_chunks(workers: int) -> int:
    """Buffers for ``workers`` reader threads: two each (a reader fills one
    while the engine takes the other), four at least, RING_CHUNKS at most.
    As few as that, so each is as large as the ring allows: the engine's
    books cost about the same per buffer whatever its size (measured on 1 GiB,
    2 readers: 4 buffers of 8 MiB fed in 0.10 s, 8 of 4 MiB in 0.19 s)."""
    return min(RING_CHUNKS, 2 * max(2, workers))


def anon_buffer(nbytes: int, *, populate: bool = True) -> mmap.mmap:
    """A private anonymous buffer, populated at once (MAP_POPULATE: one kernel loop
    instead of a fault per page) when it will be written in full.

    Not MADV_HUGEPAGE: with the usual THP defrag setting ("madvise") a huge page
    fault may compact memory synchronously, measured at 0.9-1.9 s for 1 GiB on
    a busy host against 0.29 s populated with small pages.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(nbytes, PAGE_SIZE), flags=flags)


def check_buffer_bytes(nbytes: int) -> int:
    if nbytes < MIN_BUFFER_BYTES:
        raise UsageError(f"the read buffer must be at least {MIN_BUFFER_BYTES // 1024} KiB, "
                         f"not {nbytes // 1024} KiB")
    return nbytes


class ReadRing:
    """``chunks`` populated read buffers of ``chunk_bytes``, reused all scan long.

    Each reader thread takes a chunk per read (``take``); each item queued
    from it adds a hold (``hold``) and the consumer drops it after feeding
    (``release``). A chunk is free again once the thread that read it has
    moved on (its next ``take`` or ``done_reading``) and no item holds it.
    """

    def __init__(self, chunk_bytes: int, chunks: int = RING_CHUNKS) -> None:
        self.chunk_bytes = chunk_bytes
        self.limit = chunks
        self._bufs: list[Any] = []
        self._holds: list[int] = []
        self._free: list[int] = []
        self._by_obj: dict[int, int] = {}
        self._reading: dict[int, int] = {}      # reader thread -> the chunk it fills
        self._closed = False
        self._cond = threading.Condition()

    def fill(self, chunks: int) -> None:
        """Allocate ``chunks`` chunks now (at most the ring's), so that the scan's
        memory does not depend on how far the reader gets ahead of the engine."""
        with self._cond:
            while len(self._bufs) < min(chunks, self.limit):
                self._free.append(self._add())

    def _add(self) -> int:
        """A new chunk (populated: no faults while reading); its index."""
        k = len(self._bufs)
        self._bufs.append(anon_buffer(self.chunk_bytes))
        self._holds.append(0)
        self._by_obj[id(self._bufs[k])] = k
        return k

    def reopen(self) -> None:
        """Ready for the next scan, its chunks kept (allocated and populated
        once per command, not once per scan). Only once the last scan's
        threads have ended: every chunk is then free."""
        with self._cond:
            self._closed = False
            self._reading.clear()
            self._holds = [0] * len(self._bufs)
            self._free = list(range(len(self._bufs)))

    def close(self) -> None:
        """Wake a reader waiting for a chunk: the scan is over (or failed)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, n: int) -> memoryview:
        if n > self.chunk_bytes:
            raise ValueError(f"a run of {n} bytes does not fit a {self.chunk_bytes}-byte chunk")
        me = threading.get_ident()
        with self._cond:
            if me in self._reading:
                self._drop(self._reading.pop(me))     # the reader has moved on
            while not self._free and len(self._bufs) >= self.limit:
                if self._closed:
                    raise RuntimeError("scan ended while reading")
                self._cond.wait()
            k = self._free.pop() if self._free else self._add()
            self._holds[k] = 1
            self._reading[me] = k
            return memoryview(self._bufs[k])[:n]

    def _chunk(self, data: memoryview) -> int | None:
        return self._by_obj.get(id(data.obj))

    def hold(self, runs: Sequence[PageRun]) -> None:
        """A hold on the chunk of each of ``runs`` (one lock taken for all)."""
        with self._cond:
            for run in runs:
                k = self._chunk(run.data)
                if k is not None:
                    self._holds[k] += 1

    def release(self, runs: Sequence[PageRun]) -> None:
        with self._cond:
            for run in runs:
                k = self._chunk(run.data)
                if k is not None:
                    self._drop(k)

    def done_reading(self) -> None:
        with self._cond:
            k = self._reading.pop(threading.get_ident(), None)
            if k is not None:
                self._drop(k)

    def _drop(self, k: int) -> None:
        self._holds[k] -= 1
        if self._holds[k] == 0:
            self._free.append(k)
            self._cond.notify_all()

    @property
    def nbytes(self) -> int:
        return len(self._bufs) * self.chunk_bytes


def new_ring(buffer_bytes: int, workers: int = 2) -> ReadRing:
    """A ring of ``buffer_bytes`` in all, cut for ``workers`` readers
    (``ring_chunks``), for scan_sources; one ring may serve scan after scan
    (``ReadRing.reopen``)."""
    chunks = ring_chunks(workers)
    return ReadRing(check_buffer_bytes(buffer_bytes) // chunks // PAGE_SIZE * PAGE_SIZE, chunks)
