"""Byte comparisons made while a run is fed, so that ``end_scan`` need not read
those pages again (``KsmEngine.begin_scan(store_pages=N)``; see "Trust and
verification" in the package overview).

A page of a run is compared while its bytes are at hand, as ksmd compares a
page when its cursor reaches it:

* an arrival whose checksum is the all-zero page's is compared with the zero
  page (a constant: it cannot change);
* an arrival whose checksum repeated at the previous scan (a *candidate*; at
  most ``store_pages`` of them, the most repeated first) is copied into a
  bounded store of representatives if it is the first of its checksum this
  scan, and otherwise compared with that copy byte for byte.

``end_scan`` then decides a group of equal checksums from these results: the
zero group needs no read at all; a candidate group whose members all equalled
the copy needs its representative read once more, to confirm it still holds
the copied bytes (it may have been written since). Anything else (a mismatch,
a representative that changed, a group with no slot because the store was
full) goes the way of pages never compared: read again and compared then.
"""

from __future__ import annotations

import numpy as np

from vmshare.engine._pages import PageSet
from vmshare.engine.state import (
    BOOL,
    HAS_CK,
    I64,
    LONE,
    U64,
    ZERO,
    PageAtlas,
    RegionState,
    fingerprint_bytes,
    small_pages,
)
from vmshare.model import PAGE_SIZE

_CHUNK = 1 << 13      # pages per vectorised step
_NB = 64              # checksum buckets (each page's kept in its flags)
_PER_GROUP = 1 << 16  # pages counted at once, about (buckets grouped to that)
_GATHER = 1 << 16     # pages searched per step for a bucket's pages


class FeedCheck:
    """One scan's feed-time comparisons (the engine's memory only: no I/O).
    ``candidates``: sorted checksums (``candidates()``), each given a slot
    of the store when its first arrival is fed."""

    def __init__(self, zero_hash: int, candidates: U64) -> None:
        self.zero_hash = np.uint64(zero_hash)
        #: every arrival with the zero page's checksum fed so far was all zero
        self.zero_ok = True
        self.cand = candidates
        self.slot_of = np.full(candidates.size, -1, dtype=np.int32)
        cap = candidates.size         # at most the store's pages (see candidates)
        self.store = small_pages(np.empty((cap, PAGE_SIZE), dtype=np.uint8))   # touched as used
        self.used = 0
        self.rep_pos = np.zeros(cap, dtype=np.int64)   # each slot's representative
        self.members = np.zeros(cap, dtype=np.int64)   # arrivals compared (rep included)
        self.same = np.ones(cap, dtype=np.bool_)       # all of them equalled the copy
        self.confirmed = np.zeros(0, dtype=np.bool_)   # set by confirm()
        self.fps = np.zeros((0, 2), dtype=np.uint64)

    def feed(self, data: memoryview, base: int, h: U64, arrival: BOOL,
             zeros_checked: bool = False) -> None:
        """One run at global position ``base``: ``h`` its checksums, ``arrival``
        the pages that will be arrivals at end_scan (checksum unchanged, not kept
        on a stable node or the zero page, not known alone). ``zeros_checked``:
        every page of the run with the zero page's checksum was found all zero
        already (``KsmEngine.zeros_hold``)."""
        if not arrival.any():
            return
        z = np.flatnonzero(arrival & (h == self.zero_hash))
        if z.size and self.zero_ok and not zeros_checked:
            out = np.empty(z.size, dtype=np.bool_)
            pages = PageSet([data], [0])
            try:
                pages.is_zero(z.astype(np.int64), out)
            finally:
                pages.close()
            self.zero_ok = bool(out.all())
        if self.cand.size:
            ai = np.flatnonzero(arrival & (h != self.zero_hash))
            k = np.minimum(np.searchsorted(self.cand, h[ai]), self.cand.size - 1)
            hit = self.cand[k] == h[ai]
            if hit.any():
                self._compare(data, base, ai[hit].astype(np.int64), k[hit].astype(np.int64))

    def _compare(self, data: memoryview, base: int, idx: I64, ck: I64) -> None:
        """Candidate pages ``idx`` of a run (``ck``: their candidate index), in
        position order: the first of a checksum with no slot takes one; every
        other one is compared with its slot's copy (memcmp, in C)."""
        n = len(data) // PAGE_SIZE
        slot = self.slot_of[ck]
        new = np.flatnonzero(slot < 0)
        if new.size:
            nk, first = np.unique(ck[new], return_index=True)
            s = np.arange(self.used, self.used + nk.size, dtype=np.int32)
            self.slot_of[nk] = s
            src = idx[new[first]]
            np.take(np.frombuffer(data, dtype=np.uint8).reshape(n, PAGE_SIZE), src, axis=0,
                    out=self.store[self.used:self.used + nk.size], mode="clip")   # unbuffered
            self.used += nk.size
            self.rep_pos[s] = src + base
            self.members[s] = 1
            rest = np.ones(idx.size, dtype=np.bool_)
            rest[new[first]] = False
            idx, slot = idx[rest], self.slot_of[ck[rest]]
        if not idx.size:
            return
        eq = np.empty(idx.size, dtype=np.bool_)
        pages = PageSet([data, self.store[:self.used]], [0, n])
        try:
            pages.equal(idx, slot.astype(np.int64) + n, eq)
        finally:
            pages.close()
        self.members[:self.used] += np.bincount(slot, minlength=self.used)
        self.same[slot[~eq]] = False

    def confirm(self, atlas: PageAtlas) -> None:
        """Read again the representatives whose group all equalled them: does
        each still hold the copied bytes (xxh3_128 of both, as a node's
        representative is checked)? Also fingerprints every copy (xxh3_128:
        the fingerprint of a node made from it)."""
        self.fps = fingerprint_bytes(self.store[:self.used].reshape(-1))   # type: ignore[arg-type]
        self.confirmed = np.zeros(self.used, dtype=np.bool_)
        want = np.flatnonzero(self.same[:self.used] & (self.members[:self.used] >= 2))
        if want.size:
            want = want[np.argsort(self.rep_pos[want])]    # read in position order
            now = atlas.fingerprints(self.rep_pos[want])
            self.confirmed[want] = (now == self.fps[want]).all(axis=1)

    def verify(self, atlas: PageAtlas, pos: I64, gck: U64, first: I64, size: I64
               ) -> tuple[BOOL, U64]:
        """As ``PageAtlas.verify_groups`` (group k is ``pos[first[k]:][:size[k]]``,
        ``gck[k]`` its checksum): a group whose every arrival equalled its
        confirmed slot's copy is decided without reading it again; the others
        are read again."""
        slot = np.full(gck.size, -1, dtype=np.int64)
        if self.used:
            k = np.minimum(np.searchsorted(self.cand, gck), self.cand.size - 1)
            found = self.cand[k] == gck
            slot[found] = self.slot_of[k[found]]
        ok = slot >= 0
        ok[ok] = self.confirmed[slot[ok]] & (self.members[slot[ok]] == size[ok])
        same = np.ones(gck.size, dtype=np.bool_)
        fps = np.empty((gck.size, 2), dtype=np.uint64)
        fps[ok] = self.fps[slot[ok]]
        rest = np.flatnonzero(~ok)
        if rest.size:
            same[rest], fps[rest] = atlas.verify_groups(pos, first[rest], size[rest])
        return same, fps


#: the flags of a page counted in candidates' bucket v: bit 64 (set on no
#: other page then) and v in the bits such a page has alike (HAS_CK set, the
#: rest clear); restored after
_MARK = 64
_CODES = np.array([_MARK | sum(bit for i, bit in enumerate((2, 4, 16, 32, 8, 1)) if v >> i & 1)
                   for v in range(_NB)], dtype=np.uint8)


def candidates(order: list[RegionState], zero_hash: int, limit: int) -> U64:
    """The checksums that may form groups of two arrivals or more at the next
    scan (sorted): those held by two pages or more of the ones that can be
    arrivals (a checksum, no stable node, not zero-mapped, not known alone),
    at most ``limit``, the most repeated first. A page whose checksum no other
    page holds (a stable node's pages included) is marked LONE on the way
    (``vmshare.engine.lone``). Counted in checksum buckets (each page's bucket
    kept in its flags, ``_CODES``), as many buckets at a time as hold about
    _PER_GROUP pages (each count's temporaries bounded, and few numpy passes
    over the flags for a small guest)."""
    zh = np.uint64(zero_hash)
    total = 0
    try:
        for rs in order:
            for s in range(0, rs.npages, _CHUNK):
                e = min(rs.npages, s + _CHUNK)
                fl, ck = rs.flags[s:e], rs.ck[s:e]
                ok = np.flatnonzero(((fl & (HAS_CK | ZERO | LONE)) == HAS_CK) & (ck != zh))
                fl[ok] = _CODES[(ck[ok] >> np.uint64(56)).astype(np.uint8) % np.uint8(_NB)]
                total += int(np.count_nonzero(rs.node[s:e][ok] < 0))
        keys: list[U64] = []
        counts: list[I64] = []
        groups = min(_NB, -(-total // _PER_GROUP))
        for g in range(groups):
            table = np.zeros(256, dtype=np.bool_)      # the flags of this group's pages
            table[_CODES[g::groups]] = True
            u, c = _count_bucket(order, table)
            keys.append(u[c >= 2])
            counts.append(c[c >= 2])
            if sum(x.size for x in keys) > 4 * limit:     # bound what is held
                _top(keys, counts, limit)
        _top(keys, counts, limit)
    finally:
        for rs in order:          # the flags as they were, and LONE where marked
            for s in range(0, rs.npages, _CHUNK):
                fl = rs.flags[s:s + _CHUNK]
                m = np.flatnonzero(fl & _MARK)
                fl[m] = np.uint8(HAS_CK) | (fl[m] & np.uint8(LONE))
    return np.sort(keys[0]) if keys else np.zeros(0, dtype=np.uint64)


def _count_bucket(order: list[RegionState], table: BOOL) -> tuple[U64, I64]:
    """The checksums of the pages that may arrive in the buckets whose flags
    ``table`` marks (sorted) and how many pages hold each; marks LONE the
    pages whose checksum no other page holds."""
    parts: list[tuple[RegionState, I64]] = []
    mem: list[U64] = []
    for rs in order:
        for s in range(0, rs.npages, _GATHER):
            idx = np.flatnonzero(table[rs.flags[s:s + _GATHER]]) + s
            on_node = rs.node[idx] >= 0
            if on_node.any():                     # on a stable node: never arrive
                mem.append(rs.ck[idx[on_node]])
                idx = idx[~on_node]
            if idx.size:
                parts.append((rs, idx))
    if not parts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    u, inv, c = np.unique(np.concatenate([rs.ck[idx] for rs, idx in parts]),
                          return_inverse=True, return_counts=True)
    alone = c == 1
    if mem:
        alone &= ~np.isin(u, np.concatenate(mem))
    at = 0
    for rs, idx in parts:
        rs.flags[idx[alone[inv[at:at + idx.size]]]] |= np.uint8(LONE)
        at += idx.size
    return u, c


def _top(keys: list[U64], counts: list[I64], limit: int) -> None:
    """Keep the ``limit`` most repeated checksums of ``keys`` (in place, as one part)."""
    if not keys:
        return
    k, c = np.concatenate(keys), np.concatenate(counts)
    if k.size > limit:
        best = np.argsort(-c, kind="stable")[:limit]
        k, c = k[best], c[best]
    keys[:] = [k]
    counts[:] = [c]
