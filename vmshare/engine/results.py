"""Per-source figures read from the engine's state after a scan: each source's
fair share of the savings (``SourceSavings``, the rule of ``vmshare status``)
and which sources share stable pages. Read-only views of what
``vmshare.engine.core`` keeps; the counters themselves are made there.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from vmshare.engine.state import SEEN, UNSTABLE, ZERO, NodeTable, RegionState, run_starts


@dataclass(frozen=True)
class SourceSavings:
    """Per-source figures; ``saved`` uses the fair-share rule of ``vmshare status``.

    Each stable page mapped k times credits each of its mappings (k-1)/k of a
    page, so ``saved`` summed over all sources is exactly pages_sharing.
    """

    pages_seen: int          # pages fed in the last scan
    ksm_pages: int           # pages mapped to a stable node
    saved: Fraction          # exact fair share, in pages
    zero_pages: int          # pages mapped to the zero page by use_zero_pages
    unshared_pages: int      # pages in the unstable tree

    @property
    def saved_pages(self) -> float:
        return float(self.saved)


_CHUNK = 1 << 16     # pages counted per step


def per_source(order: list[RegionState], nodes: NodeTable) -> dict[str, SourceSavings]:
    """Per-source figures of the last completed scan (fair share, see SourceSavings)."""
    counts = nodes.count_array()
    acc: dict[str, list[int]] = {}
    saved: dict[str, Fraction] = {}
    for rs in order:
        fl = rs.flags
        a = acc.setdefault(rs.source, [0, 0, 0, 0])
        # this region's pages per node (per node, not per page: no sort of pages),
        # in chunks of pages (small temporaries)
        mine = np.zeros(counts.size, dtype=np.int64)
        for c in range(0, rs.npages, _CHUNK):
            f, nd = fl[c:c + _CHUNK], rs.node[c:c + _CHUNK]
            a[0] += int(np.count_nonzero(f & SEEN))
            if counts.size:
                mine += np.bincount(nd[nd >= 0], minlength=counts.size)
            a[2] += int(np.count_nonzero(f & ZERO))
            a[3] += int(np.count_nonzero(f & UNSTABLE))
        a[1] += int(mine.sum())
        s = saved.get(rs.source, Fraction(0))
        used = np.flatnonzero(mine)
        if used.size:     # m pages on k-way nodes save m * (k - 1) / k
            per_k = np.bincount(counts[used], weights=mine[used]).astype(np.int64)
            for k in np.flatnonzero(per_k).tolist():
                s += Fraction(int(per_k[k]) * (k - 1), k)
        saved[rs.source] = s
    return {src: SourceSavings(a[0], a[1], saved[src], a[2], a[3])
            for src, a in acc.items()}

def shares_with(order: list[RegionState]) -> dict[str, dict[str, int]]:
    """Pages of each source mapped to a stable page that another source maps too.

    ``shares_with()[a][b]`` = for every stable node mapped by both a and b, the
    number of a's pages mapped to it (summed). The same rule ``vmshare status``
    applies to kernel PFNs: a's pages on a KSM PFN count toward [a][b] when b
    maps that PFN too. Not symmetric when a source maps a node several times.
    """
    sources = sorted({rs.source for rs in order})
    if len(sources) < 2:               # nothing to share with
        return {s: {} for s in sources}
    sid = {s: i for i, s in enumerate(sources)}
    keys = [rs.node[rs.node >= 0].astype(np.int64) * len(sources) + sid[rs.source]
            for rs in order]
    out: dict[str, dict[str, int]] = {s: {} for s in sources}
    if not keys:
        return out
    allk = np.concatenate(keys)
    if allk.size == 0:
        return out
    uk, cnt = np.unique(allk, return_counts=True)
    node, src = np.divmod(uk, len(sources))
    starts = run_starts(node)
    ends = np.append(starts[1:], node.size)
    for s0, e0 in zip(starts.tolist(), ends.tolist(), strict=True):
        if e0 - s0 < 2:
            continue
        group = list(zip(src[s0:e0].tolist(), cnt[s0:e0].tolist(), strict=True))
        for a, ca in group:
            row = out[sources[a]]
            for b, _ in group:
                if b != a:
                    row[sources[b]] = row.get(sources[b], 0) + ca
    return out
