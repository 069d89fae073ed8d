"""Per-page state arrays, the stable node table and the scan's page atlas (no merge logic).

Per page, 13 bytes: the checksum of its last scan (uint64), the stable node it
is mapped to (int32, -1 for none) and flags (uint8). Per stable node, 24 bytes:
its mapping count (int32), its chain (int32, -1 for a plain stable node) and the
xxh3_128 fingerprint of the bytes it was created from (2 x uint64). Node ids are
allocated in creation order (the id is the kernel's "oldest dup" order) and
compacted, order kept, when dead ids outnumber live ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmshare.model import PAGE_SIZE

HAS_CK = 1       # the page has an rmap item with a recorded checksum
SEEN = 2         # fed in the current scan
STABLE_CK = 4    # fed this scan with the checksum recorded at the previous scan
ZERO = 8         # mapped to the zero page by use_zero_pages (no rmap item once passed)
ZERO_NEW = 16    # zero-mapped during this scan: its rmap item still exists
UNSTABLE = 32    # in this scan's unstable tree

ROW = PAGE_SIZE // 8   # uint64 words in a page
_PAIRS = 4096          # pages located at once by PageAtlas.equal / is_zero

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
BOOL = npt.NDArray[np.bool_]


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
            self._grow(first + k)
        self._count[first:first + k] = counts
        self._chain[first:first + k] = chains
        self._fp[first:first + k] = fps
        self.n = first + k
        return first

    def _grow(self, need: int) -> None:
        """Room for ``need`` nodes, growing by half: in place (realloc, no second
        copy alive at once) when nothing else references the arrays, else copied."""
        cap = max(1024, need + need // 2)
        for name in ("_count", "_chain", "_fp"):
            shape = (cap, 2) if name == "_fp" else (cap,)
            try:   # no local reference to the array, or refcheck refuses
                getattr(self, name).resize(shape, refcheck=True)   # zero-fills the tail
            except ValueError:                       # a view is alive: copy instead
                old = getattr(self, name)
                new = np.zeros(shape, dtype=old.dtype)
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
        ch = self.chain[self.chain >= 0]
        return int(np.unique(ch).size), int(ch.size)

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


class PageAtlas:
    """Rows of the current scan's fed runs, addressed by global page position.

    To gather rows of many runs with one numpy ``take``, runs whose addresses are
    congruent modulo PAGE_SIZE share one read-only strided view that starts at
    the lowest of them and spans to the highest end. Only rows inside fed runs
    are ever indexed, and the engine holds every run's buffer until the scan ends.
    """

    def __init__(self, runs: list[RunRef], starts: I64) -> None:
        self.starts = starts
        self._arrays = [np.frombuffer(r.data, dtype=np.uint64) for r in runs]
        addrs = [int(a.__array_interface__["data"][0]) for a in self._arrays]
        classes: dict[int, list[int]] = {}
        for i, ad in enumerate(addrs):
            classes.setdefault(ad % PAGE_SIZE, []).append(i)
        self.views: list[U64] = []
        self.run_class = np.zeros(len(runs), dtype=np.int64)
        self.run_row0 = np.zeros(len(runs), dtype=np.int64)
        for c, members in enumerate(classes.values()):
            base_i = min(members, key=lambda i: addrs[i])
            base = addrs[base_i]
            end = max(addrs[i] + runs[i].npages * PAGE_SIZE for i in members)
            self.views.append(np.lib.stride_tricks.as_strided(
                self._arrays[base_i], shape=((end - base) // PAGE_SIZE, ROW),
                strides=(PAGE_SIZE, 8), writeable=False))
            for i in members:
                self.run_class[i] = c
                self.run_row0[i] = (addrs[i] - base) // PAGE_SIZE

    def locate(self, pos: I64) -> tuple[I64, I64]:
        r = np.searchsorted(self.starts, pos, side="right") - 1
        return self.run_class[r], self.run_row0[r] + (pos - self.starts[r])

    def row(self, pos: int) -> U64:
        c, rw = self.locate(np.array([pos], dtype=np.int64))
        row: U64 = self.views[int(c[0])][int(rw[0])]
        return row

    def equal(self, pa: I64, pb: I64, block: int = 32) -> BOOL:
        """Byte-for-byte: is page ``pa[i]`` identical to page ``pb[i]``, for each i.

        Works through the pairs ``_PAIRS`` at a time with two ``block``-row
        buffers, so its temporaries are bounded whatever the number of pairs.
        """
        out = np.ones(pa.size, dtype=np.bool_)
        buf_a = np.empty((block, ROW), dtype=np.uint64)
        buf_b = np.empty((block, ROW), dtype=np.uint64)
        eq = np.empty((block, ROW), dtype=np.bool_)
        for p0 in range(0, pa.size, _PAIRS):
            out[p0:p0 + _PAIRS] = self._equal(pa[p0:p0 + _PAIRS], pb[p0:p0 + _PAIRS],
                                              buf_a, buf_b, eq)
        return out

    def _equal(self, pa: I64, pb: I64, buf_a: U64, buf_b: U64,
               eq: npt.NDArray[np.bool_]) -> BOOL:
        out = np.ones(pa.size, dtype=np.bool_)
        block = buf_a.shape[0]
        ca, ra = self.locate(pa)
        cb, rb = self.locate(pb)
        single = len(self.views) == 1
        combos = [(0, 0)] if single else \
            sorted(set(zip(ca.tolist(), cb.tolist(), strict=True)))
        for a, b in combos:
            sel = np.arange(pa.size) if single else np.flatnonzero((ca == a) & (cb == b))
            sel = sel[np.argsort(ra[sel], kind="stable")]     # sequential reads on one side
            va, vb = self.views[a], self.views[b]
            for s in range(0, sel.size, block):
                ix = sel[s:s + block]
                m = ix.size
                np.take(va, ra[ix], axis=0, out=buf_a[:m])
                rbi = rb[ix]
                if rbi[0] == rbi[-1] and (rbi == rbi[0]).all():
                    np.equal(buf_a[:m], vb[int(rbi[0])], out=eq[:m])   # one reference row
                else:
                    np.take(vb, rbi, axis=0, out=buf_b[:m])
                    np.equal(buf_a[:m], buf_b[:m], out=eq[:m])
                out[ix] = eq[:m].all(axis=1)
        return out

    def is_zero(self, pos: I64, block: int = 32) -> BOOL:
        out = np.ones(pos.size, dtype=np.bool_)
        buf = np.empty((block, ROW), dtype=np.uint64)
        for p0 in range(0, pos.size, _PAIRS):
            c, r = self.locate(pos[p0:p0 + _PAIRS])
            for cl in np.unique(c).tolist():
                sel = np.flatnonzero(c == cl)
                for s in range(0, sel.size, block):
                    ix = sel[s:s + block]
                    np.take(self.views[cl], r[ix], axis=0, out=buf[:ix.size])
                    out[p0 + ix] = ~buf[:ix.size].any(axis=1)
        return out
