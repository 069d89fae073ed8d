"""One full scan's merge decisions (see the overview in ``vmshare.engine``).

Pages whose checksum occurs once in the scan and matches no stable node can
only be volatile or enter the unstable tree alone: that is decided with numpy
per region. The rest (the candidates) are sorted by checksum; each checksum
group is split into contents by byte comparison, and each content, with the
stable node dups holding it, is simulated in scan order: leaves (CoW breaks and
holes) and arrivals (pages with a stable checksum) as the kernel meets them.
Contents never interact, so this is the kernel's sequential result.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmshare.engine.state import (
    SEEN,
    STABLE_CK,
    UNSTABLE,
    ZERO,
    ZERO_NEW,
    NodeTable,
    RegionState,
    RunRef,
)
from vmshare.model import PAGE_SIZE

_ZERO_PAGE = bytes(PAGE_SIZE)
_CHUNK = 1 << 16     # pages per vectorised step: bounds temporaries to a few MiB


class _Config(Protocol):  # EngineConfig, without importing core (no cycle)
    @property
    def max_page_sharing(self) -> int: ...
    @property
    def use_zero_pages(self) -> bool: ...


def _key_values(order: list[RegionState], nodes: NodeTable,
                zero_hash: int) -> npt.NDArray[np.uint64]:
    """Checksums that can take part in a merge: stable twice, a stable node's, zero's."""
    parts = [rs.ck[(rs.flags & STABLE_CK) != 0] for rs in order]
    allh = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    del parts
    allh.sort()
    dup = allh[1:][allh[1:] == allh[:-1]]
    del allh
    node_h = np.array([nodes.hash[i] for i in nodes.live_ids()], dtype=np.uint64)
    return np.unique(np.concatenate([dup, node_h, np.array([zero_hash], np.uint64)]))


def run_scan(order: list[RegionState], runs: list[RunRef], nodes: NodeTable,
             config: _Config, zero_hash: int) -> None:
    keyvals = _key_values(order, nodes, zero_hash)
    offsets: list[int] = []
    off = 0
    for rs in order:
        offsets.append(off)
        off += rs.npages

    # Singletons decided per region; candidates collected.
    cand_r: list[npt.NDArray[np.int64]] = []
    cand_i: list[npt.NDArray[np.int64]] = []
    for r, rs in enumerate(order):
        for s in range(0, rs.npages, _CHUNK):
            e = min(rs.npages, s + _CHUNK)
            fl = rs.flags[s:e]
            ck = rs.ck[s:e]
            seen = (fl & SEEN) != 0
            idx = np.searchsorted(keyvals, ck)
            np.minimum(idx, len(keyvals) - 1, out=idx)
            stable = (fl & STABLE_CK) != 0
            # a volatile page that maps nothing cannot merge: no bytes needed
            cand = (stable & (keyvals[idx] == ck)) | (rs.node[s:e] >= 0) | ((fl & ZERO) != 0)
            fl[stable & ~cand] |= np.uint8(UNSTABLE)
            fl[~seen & ~cand] = 0                           # holes: rmap items freed
            ci = np.flatnonzero(cand)
            if ci.size:
                cand_i.append(ci + s)
                cand_r.append(np.full(ci.size, r, dtype=np.int64))
    if not cand_i:
        nodes.prune_chains(config.max_page_sharing)
        return
    ri = np.concatenate(cand_r)
    li = np.concatenate(cand_i)
    del cand_r, cand_i
    pos = np.asarray(offsets, dtype=np.int64)[ri] + li
    h = np.empty(ri.size, dtype=np.uint64)
    node = np.empty(ri.size, dtype=np.int32)
    fl8 = np.empty(ri.size, dtype=np.uint8)
    for r, rs in enumerate(order):
        m = ri == r
        if m.any():
            h[m] = rs.ck[li[m]]
            node[m] = rs.node[li[m]]
            fl8[m] = rs.flags[li[m]]
    srt = np.lexsort((pos, h))
    ri, li, pos, h, node, fl8 = ri[srt], li[srt], pos[srt], h[srt], node[srt], fl8[srt]

    # Where each candidate's bytes are: the run covering it.
    rindex = {id(rs): r for r, rs in enumerate(order)}
    runs_sorted = sorted(runs, key=lambda rr: offsets[rindex[id(rr.region)]] + rr.first)
    starts = np.array([offsets[rindex[id(rr.region)]] + rr.first for rr in runs_sorted],
                      dtype=np.int64)
    run_of = (np.searchsorted(starts, pos, side="right") - 1).tolist() if starts.size \
        else [-1] * pos.size

    new_node, new_fl = _decide(pos.tolist(), h.tolist(), node.tolist(), fl8.tolist(),
                               run_of, runs_sorted, starts.tolist(), nodes, config,
                               zero_hash)
    nn = np.asarray(new_node, dtype=np.int32)
    nf = np.asarray(new_fl, dtype=np.uint8)
    for r, rs in enumerate(order):
        m = ri == r
        if m.any():
            rs.node[li[m]] = nn[m]
            rs.flags[li[m]] = nf[m]
    nodes.prune_chains(config.max_page_sharing)


def _decide(pos: list[int], h: list[int], node: list[int], fl: list[int],
            run_of: list[int], runs: list[RunRef], starts: list[int], nodes: NodeTable,
            config: _Config, zero_hash: int) -> tuple[list[int], list[int]]:
    """Sequential decisions over candidates sorted by (checksum, position)."""
    n = len(pos)
    maxs = config.max_page_sharing

    def page(k: int) -> bytes:
        run = runs[run_of[k]]
        o = (pos[k] - starts[run_of[k]]) * PAGE_SIZE
        return run.data[o:o + PAGE_SIZE].tobytes()

    # 1. Contents: split each checksum group by bytes.
    cls = [-1] * n
    class_zero: list[bool] = []
    i = 0
    while i < n:
        hv = h[i]
        j = i + 1
        while j < n and h[j] == hv:
            j += 1
        reps: list[tuple[bytes, int]] = []
        for k in range(i, j):
            if not fl[k] & SEEN:
                continue
            b = page(k)
            for rb, cid in reps:
                if b == rb:
                    cls[k] = cid
                    break
            else:
                cid = len(class_zero)
                class_zero.append(hv == zero_hash and b == _ZERO_PAGE)
                reps.append((b, cid))
                cls[k] = cid
        i = j

    new_node = list(node)
    new_fl = list(fl)

    # 2. Which content each stable node holds; nodes with none left are freed.
    members: dict[int, list[int]] = {}
    for k in range(n):
        if node[k] >= 0:
            members.setdefault(node[k], []).append(k)
    node_class: dict[int, int] = {}
    for nd, ks in members.items():
        hx = nodes.hash[nd]
        tally: dict[int, int] = {}
        for k in ks:
            if cls[k] >= 0 and h[k] == hx:
                tally[cls[k]] = tally.get(cls[k], 0) + 1
        if not tally:
            nodes.free(nd)
            for k in ks:
                new_node[k] = -1
            continue
        node_class[nd] = max(tally, key=lambda c: (tally[c], -c))
    class_dups: dict[int, list[int]] = {}
    for nd in sorted(node_class, key=lambda x: nodes.serial[x]):
        class_dups.setdefault(node_class[nd], []).append(nd)

    # 3. Events per content: leaves of its dups, arrivals of stable-checksum pages.
    leaves: dict[int, list[tuple[int, int]]] = {}
    for nd, c in node_class.items():
        for k in members[nd]:
            if cls[k] != c:
                leaves.setdefault(c, []).append((pos[k], nd))
                new_node[k] = -1
    arrivals: dict[int, list[int]] = {}
    for k in range(n):
        f = fl[k]
        if not f & SEEN:
            new_fl[k] = 0
            new_node[k] = -1
            continue
        c = cls[k]
        if f & ZERO and not class_zero[c]:
            new_fl[k] = f & ~ZERO            # written: CoW from the zero page
        if node[k] >= 0 and node_class.get(node[k]) == c:
            continue                         # still mapped to its stable node
        if f & STABLE_CK:
            arrivals.setdefault(c, []).append(k)

    for c in set(arrivals) | set(leaves):
        arr = arrivals.get(c, [])
        lv = leaves.get(c, [])
        if not arr or (config.use_zero_pages and class_zero[c]):
            for _, nd in lv:
                nodes.count[nd] -= 1
            for k in arr:                    # use_zero_pages: map to the zero page
                new_fl[k] |= ZERO | ZERO_NEW
            continue
        dups = class_dups.setdefault(c, [])
        events = sorted([(pos[k], 1, k) for k in arr] + [(p, 0, nd) for p, nd in lv])
        unstable = -1
        for _, kind, x in events:
            if kind == 0:
                nodes.count[x] -= 1
                continue
            best, best_count = -1, -1
            for d in dups:                   # fullest dup with room; ties: oldest
                cd = nodes.count[d]
                if best_count < cd < maxs:
                    best, best_count = d, cd
            if best >= 0:
                nodes.count[best] += 1
                new_node[x] = best
            elif unstable < 0:
                unstable = x
            else:
                d = nodes.new(h[x], 2)
                if dups:
                    nodes.add_dup(dups[0], d)
                dups.append(d)
                new_node[unstable] = d
                new_node[x] = d
                unstable = -1
        if unstable >= 0:
            new_fl[unstable] |= UNSTABLE
    return new_node, new_fl
