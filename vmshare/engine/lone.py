"""Bookkeeping that spares ``end_scan`` work: pages known to be alone in the
unstable tree (the LONE flag), and the zero group's closed form.

A page is LONE when, at the end of the last scan, it went to the unstable
tree with no other arrival of its checksum, no stable node of it, and no page
written during that scan took that checksum (checked here, ``Volatile``).
If its checksum is unchanged at the next scan it is still alone (any page of
that checksum then had it at the end of the last scan too, and would have been
seen), so it goes to the unstable tree without a sort. Not for the zero page's
checksum (with use_zero_pages a lone zero page is zero-mapped).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmshare.engine.state import (
    I32,
    I64,
    LONE,
    U64,
    UNSTABLE,
    ZERO,
    ZERO_NEW,
    RegionState,
    distinct,
    fingerprint_bytes,
)
from vmshare.model import PAGE_SIZE

_CHUNK = 1 << 15


class Volatile:
    """The checksums pages took this scan (volatile pages), at most a sixteenth
    of the pages' count (8 bytes each); beyond that, every LONE flag is dropped."""

    def __init__(self, pages: int) -> None:
        self.limit = max(4096, pages // 16)
        self.parts: list[U64] = []
        self.held = 0
        self.over = False

    def add(self, cks: U64) -> None:
        if self.over or not cks.size:
            return
        self.held += cks.size
        if self.held > self.limit:
            self.over, self.parts = True, []
        else:
            self.parts.append(cks.copy())

    def clear_lone(self, order: list[RegionState]) -> None:
        """Drop LONE from pages whose checksum a volatile page took this scan."""
        if self.over:
            for rs in order:
                np.bitwise_and(rs.flags, np.uint8(~LONE & 0xFF), out=rs.flags)
            return
        if not self.parts:
            return
        taken = distinct(np.concatenate(self.parts))
        self.parts = []
        for rs in order:
            for s in range(0, rs.npages, _CHUNK):
                fl = rs.flags[s:s + _CHUNK]
                li = np.flatnonzero(fl & LONE)
                if li.size:
                    k = np.minimum(np.searchsorted(taken, rs.ck[s + li]), taken.size - 1)
                    hit = li[taken[k] == rs.ck[s + li]]
                    fl[hit] &= np.uint8(~LONE & 0xFF)


def zero_fingerprint() -> U64:
    return fingerprint_bytes(bytes(PAGE_SIZE))


def zero_rows(rank: I64, form: tuple[I64, I64, I64] | None, mps: int, uzp: bool
              ) -> tuple[I32, npt.NDArray[np.uint8]]:
    """The zero group's pages of rank ``rank`` (position order within the group):
    their node and flags. ``form``: the closed form of the group (first node,
    full dups, remainder: ``_Scan._closed_form``); None for a lone page or with
    use_zero_pages."""
    node_of = np.full(rank.size, -1, dtype=np.int32)
    if uzp:
        return node_of, np.full(rank.size, ZERO | ZERO_NEW, dtype=np.uint8)
    if form is None:
        return node_of, np.full(rank.size, UNSTABLE, dtype=np.uint8)
    first, nfull, rem = int(form[0][0]), int(form[1][0]), int(form[2][0])
    blk = rank // mps
    single = (blk == nfull) & (rem == 1)
    node_of[~single] = (first + blk[~single]).astype(np.int32)
    return node_of, np.where(single, UNSTABLE, 0).astype(np.uint8)
