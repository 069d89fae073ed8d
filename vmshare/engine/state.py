"""Per-page state arrays, the stable node table and the scan's page atlas (no merge logic).

Per page, 13 bytes: the checksum of its last scan (uint64), the stable node it
is mapped to (int32, -1 for none) and flags (uint8). Per stable node, 24 bytes:
its mapping count (int32), its chain (int32, -1 for a plain stable node) and the
xxh3_128 fingerprint of the bytes it was created from (2 x uint64). Node ids are
allocated in creation order (the id is the kernel's "oldest dup" order) and
compacted, order kept, when dead ids outnumber live ones.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vmshare.engine._pages import PageSet, hash128
from vmshare.errors import UsageError
from vmshare.model import PAGE_SIZE

HAS_CK = 1       # the page has an rmap item with a recorded checksum
SEEN = 2         # fed in the current scan
STABLE_CK = 4    # fed this scan with the checksum recorded at the previous scan
ZERO = 8         # mapped to the zero page by use_zero_pages (no rmap item once passed)
ZERO_NEW = 16    # zero-mapped during this scan: its rmap item still exists
UNSTABLE = 32    # in this scan's unstable tree
LONE = 128       # no other page had its checksum at the last scan, nor a stable node


U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
BOOL = npt.NDArray[np.bool_]


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL(None).malloc_trim   # glibc only
    except (OSError, AttributeError):
        return None
    return fn


_TRIM = _malloc_trim()
_LIBC = ctypes.CDLL(None) if _TRIM is not None else None
_MADV_NOHUGEPAGE = 15     # Linux


def distinct(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The sorted distinct values of ``a`` (np.unique's answer): without
    np.unique, whose plain form imports numpy.ma (6-9 ms of a command's
    start, measured)."""
    s = np.sort(a, axis=None)
    return s[run_starts(s)]


def small_pages(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``a`` (fresh, untouched) backed by 4 KiB pages: numpy asks transparent
    huge pages for every array of 4 MiB or more, and on a host whose memory is
    fragmented each 2 MiB page's first touch waits for the kernel to compact
    memory (measured: 8,192 pages copied into a fresh 32 MiB store took 75 ms,
    5 ms with small pages). For scratch that is written once, piece by piece.
    A no-op without glibc. Returns ``a``."""
    if _LIBC is not None and a.nbytes >= 1 << 21:
        addr = a.ctypes.data
        lo = -(-addr // 4096) * 4096
        hi = (addr + a.nbytes) // 4096 * 4096
        if hi > lo:
            _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_NOHUGEPAGE)
    return a


def release_freed_memory() -> None:
    """Hand the heap memory numpy freed back to the kernel (glibc ``malloc_trim``).

    A scan allocates and frees many mid-sized temporaries; glibc keeps the freed
    ones mapped (its mmap threshold rises after each large free), which measured
    8.8 bytes a page of RSS kept after a merging scan. A no-op without glibc.
    """
    if _TRIM is not None:
        _TRIM(0)


def run_starts(a: npt.NDArray[np.generic]) -> I64:
    """Indices where a run of equal values starts in ``a`` (0 first, if any)."""
    brk = np.empty(a.size, dtype=np.bool_)
    brk[:1] = True
    np.not_equal(a[1:], a[:-1], out=brk[1:])
    return np.flatnonzero(brk)


class RegionState:
    """What the engine remembers of one (source, region) across scans."""

    __slots__ = ("ck", "flags", "generation", "key", "node", "npages", "source")

    def __init__(self, source: str, key: str, generation: str, npages: int) -> None:
        self.source = source
        self.key = key
        self.generation = generation
        self.npages = npages
        self.ck: U64 = np.zeros(npages, dtype=np.uint64)
        self.node: I32 = np.full(npages, -1, dtype=np.int32)
        self.flags: npt.NDArray[np.uint8] = np.zeros(npages, dtype=np.uint8)


@dataclass(frozen=True)
class RunRef:
    """A fed run: the engine's reference to the caller's bytes for this scan only."""

    region: RegionState
    first: int
    npages: int
    data: memoryview


class NodeTable:
    """Stable nodes (the kernel's stable_node / stable_node dup) and their chains.

    A node is live while its count is positive; ids grow in creation order.
    """

    def __init__(self) -> None:
        self.n = 0
        self._count: I32 = np.zeros(0, dtype=np.int32)
        self._chain: I32 = np.zeros(0, dtype=np.int32)
        self._fp: U64 = np.zeros((0, 2), dtype=np.uint64)
        self._next_chain = 0

    @property
    def count(self) -> I32:
        return self._count[:self.n]

    @property
    def chain(self) -> I32:
        return self._chain[:self.n]

    @property
    def fp(self) -> U64:
        return self._fp[:self.n]

    def new_chain(self) -> int:
        return self.new_chains(1)

    def new_chains(self, k: int) -> int:
        """Allocate ``k`` chain ids; returns the first."""
        self._next_chain += k
        return self._next_chain - k

    def add(self, counts: I64, chains: I64, fps: U64) -> int:
        """Append nodes (in creation order); returns the first new id."""
        k = int(counts.size)
        first = self.n
        if first + k > self._count.size:
            self.reserve(max(k, first // 2))
        self._count[first:first + k] = counts
        self._chain[first:first + k] = chains
        self._fp[first:first + k] = fps
        self.n = first + k
        return first

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more nodes. The new arrays are left uninitialised
        (np.empty): the room not yet used is address space, not resident memory,
        so reserving for a scan's worst case costs only what the scan creates.
        Only the used part is copied."""
        need = self.n + extra
        if need <= self._count.size:
            return
        cap = max(1024, need)
        for name in ("_count", "_chain", "_fp"):
            old = getattr(self, name)
            new = np.empty((cap, *old.shape[1:]), dtype=old.dtype)
            new[:self.n] = old[:self.n]
            setattr(self, name, new)

    def unmap(self, members: I32) -> None:
        if members.size:
            self.count[:] -= np.bincount(members, minlength=self.n).astype(np.int32)

    def free_empty(self) -> None:
        c = self.count
        self.chain[c <= 0] = -1
        c[c < 0] = 0

    def prune_chains(self, max_page_sharing: int) -> None:
        """Free empty dups; drop chains left with one dup that has room."""
        self.free_empty()
        ch = self.chain
        live = np.flatnonzero(ch >= 0)
        if not live.size:
            return
        ids, first, cnt = np.unique(ch[live], return_index=True, return_counts=True)
        lone = live[first[cnt == 1]]
        ch[lone[self.count[lone] < max_page_sharing]] = -1
        del ids

    def shared_sharing(self) -> tuple[int, int]:
        c = self.count
        live = c[c > 0]
        return int(live.size), int(live.sum() - live.size)

    def chain_counts(self) -> tuple[int, int]:
        """(chains, dups): the distinct chain ids of live dups, and those dups."""
        ch = self.chain[self.chain >= 0]
        return int(distinct(ch).size), int(ch.size)

    def count_array(self) -> npt.NDArray[np.int64]:
        return self.count.astype(np.int64)

    def compact(self) -> I32 | None:
        """Drop dead ids if they outnumber live ones; returns old id -> new id (or None)."""
        live = self.count > 0
        nlive = int(np.count_nonzero(live))
        if self.n - nlive <= max(4096, nlive):
            return None
        remap = (np.cumsum(live, dtype=np.int64) - 1).astype(np.int32)
        remap[~live] = -1
        keep = np.flatnonzero(live)
        self._count[:nlive] = self._count[keep]
        self._chain[:nlive] = self._chain[keep]
        self._fp[:nlive] = self._fp[keep]
        self.n = nlive
        return remap


#: fetch(positions) -> the bytes of those pages, in order (KsmEngine.end_scan)
Fetch = Callable[[I64], memoryview]
#: pages asked of a fetch at once: bounds the memory re-read pages take
FETCH_PAGES = 1 << 12


class PageAtlas:
    """Pages of the current scan, addressed by global page position.

    The per-page work (memcmp, zero test, xxh3_128) is done by the C ``PageSet``
    of ``vmshare.engine._pages``, which holds a buffer export of every run until
    ``close``: the engine references a scan's retained runs until the scan
    ends, never copies them and keeps none afterwards. Pages fed without
    retaining them are read again through ``fetch`` when a method needs them,
    at most ``FETCH_PAGES`` at a time (``load`` takes what its caller asks);
    each batch replaces the previous one.
    """

    def __init__(self, runs: list[RunRef], starts: I64, fetch: Fetch | None = None) -> None:
        self._held = [r.data for r in runs]
        self._starts = starts
        self._ends = starts + np.array([r.npages for r in runs], dtype=np.int64)
        self._fetch = fetch
        self._batch_pos: I64 = np.zeros(0, dtype=np.int64)   # fetched pages addressable now
        #: with no held runs, the batch is one buffer: page k is at _batch_pos[k]
        self._local = False
        self._set = PageSet(self._held, starts.tolist())

    def load(self, pos: I64) -> None:
        """Make every page at ``pos`` addressable: with a fetch, the pages neither
        held nor in the current batch are fetched, and they (with the ones of
        the current batch that ``pos`` names) become the new batch."""
        if self._fetch is None:
            return
        need = distinct(pos)
        r = np.searchsorted(self._starts, need, side="right") - 1
        held = (r >= 0) & (need < self._ends[np.maximum(r, 0)]) if self._starts.size else \
            np.zeros(need.size, dtype=np.bool_)
        need = need[~held]
        if not need.size or np.isin(need, self._batch_pos, assume_unique=True).all():
            return
        data = memoryview(self._fetch(need)).cast("B")
        if len(data) != need.size * PAGE_SIZE:
            raise UsageError(f"fetch returned {len(data)} bytes for {need.size} pages")
        self._batch_pos = need
        self._set.close()
        self._local = not self._held
        if self._local:           # one buffer, addressed by rank (``_at``)
            self._set = PageSet([data], [0])
            return
        cut = run_starts(need - np.arange(need.size))   # consecutive stretches
        ends = np.append(cut[1:], need.size) * PAGE_SIZE
        fetched = [data[a:b] for a, b in zip((cut * PAGE_SIZE).tolist(), ends.tolist(),
                                             strict=True)]
        firsts = need[cut].tolist()
        # held runs and fetched stretches, by position
        bufs, starts = [*self._held, *fetched], [*self._starts.tolist(), *firsts]
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self._set = PageSet([bufs[k] for k in order], [starts[k] for k in order])

    def _at(self, pos: npt.NDArray[np.integer]) -> I64:
        """Positions as the current PageSet addresses them: global positions, or
        with a one-buffer batch their rank in it (-1, which no page has, for a
        position not in the batch: the PageSet then raises IndexError)."""
        if not self._local:
            return _positions(pos)
        k = np.searchsorted(self._batch_pos, pos)
        k[(k >= self._batch_pos.size) | (self._batch_pos[np.minimum(
            k, self._batch_pos.size - 1)] != pos)] = -1
        return k.astype(np.int64, copy=False)

    def _each(self, pos: I64, out: npt.NDArray[Any],
              fn: Callable[[I64, npt.NDArray[Any]], None]) -> None:
        """``fn(positions, out rows)`` over ``pos``, in slices a fetch can serve
        (``fn`` reaches ``self._set`` when called: ``load`` may replace it)."""
        step = max(1, pos.size if self._fetch is None else FETCH_PAGES)
        for k in range(0, pos.size, step):
            part = _positions(pos[k:k + step])
            self.load(part)
            fn(part, out[k:k + part.size])

    def equal(self, pa: I64, pb: I64) -> BOOL:
        """Byte-for-byte: is page ``pa[i]`` identical to page ``pb[i]``, for each i."""
        out = np.empty(pa.size, dtype=np.bool_)
        step = max(1, pa.size if self._fetch is None else FETCH_PAGES // 2)
        for k in range(0, pa.size, step):
            a, b = pa[k:k + step], pb[k:k + step]
            self.load(np.concatenate([a, b]))
            self._set.equal(self._at(a), self._at(b), out[k:k + a.size])
        return out

    def is_zero(self, pos: I64) -> BOOL:
        out = np.empty(pos.size, dtype=np.bool_)
        self._each(pos, out, lambda part, rows: self._set.is_zero(self._at(part), rows))
        return out

    def fingerprints(self, pos: I64) -> U64:
        """xxh3_128 of each page at ``pos``, as an (n, 2) uint64 array."""
        out = np.empty((pos.size, 2), dtype=np.uint64)
        self._each(pos, out, lambda part, rows: self._set.hash128(self._at(part), rows))
        return out

    def verify_groups(self, pos: I64, first: I64, size: I64) -> tuple[BOOL, U64]:
        """Group k is ``pos[first[k]:first[k] + size[k]]``: is every page of it
        byte-identical to its first, and the xxh3_128 of that first page (n, 2).

        With a fetch, groups are served in batches of at most FETCH_PAGES pages,
        a bigger group in slices that each start with its first page."""
        same = np.ones(first.size, dtype=np.bool_)
        fps = np.empty((first.size, 2), dtype=np.uint64)
        if self._fetch is None:
            self._set.verify_groups(_positions(pos), _positions(first), _positions(size),
                                    same, fps)
            return same, fps
        k = 0
        while k < first.size:
            if size[k] > FETCH_PAGES:                 # one group, in slices
                g = pos[int(first[k]):int(first[k] + size[k])]
                step = max(1, FETCH_PAGES - 1)
                for m in range(1, g.size, step):
                    part = np.concatenate([g[:1], g[m:m + step]])
                    self.load(part)
                    s1, f1 = np.ones(1, np.bool_), np.empty((1, 2), np.uint64)
                    one = np.array([0, part.size], dtype=np.int64)
                    self._set.verify_groups(self._at(part), one[:1], one[1:], s1, f1)
                    same[k] &= bool(s1[0])
                    fps[k] = f1[0]
                k += 1
                continue
            # the groups from k whose pages add up to FETCH_PAGES at most (each of
            # them is that small: a bigger one was taken above)
            total = np.cumsum(size[k:])
            j = k + max(1, int(np.searchsorted(total, FETCH_PAGES, side="right")))
            f, z = first[k:j], size[k:j]
            at = np.cumsum(z) - z                 # each group's first, in ``members``
            members = pos[np.repeat(f - at, z) + np.arange(int(z.sum()))]
            self.load(members)
            self._set.verify_groups(self._at(members), _positions(at), _positions(z),
                                    same[k:j], fps[k:j])
            k = j
        return same, fps

    def page(self, pos: int) -> bytes:
        """A copy of the page at ``pos``."""
        self.load(np.array([pos], dtype=np.int64))
        return self._set.page(int(self._at(np.array([pos]))[0]))

    def close(self) -> None:
        self._set.close()


def fingerprint_bytes(pages: bytes) -> U64:
    """xxh3_128 of each page of ``pages`` (whole pages), as PageAtlas.fingerprints."""
    out = np.empty((len(pages) // PAGE_SIZE, 2), dtype=np.uint64)
    hash128(pages, out)
    return out


def _positions(pos: npt.NDArray[np.integer]) -> I64:
    return np.ascontiguousarray(pos, dtype=np.int64)
