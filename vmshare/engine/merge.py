"""One full scan's merge decisions (see the overview in ``vmshare.engine``).

Phase 1 (numpy, per region chunk): merged pages are kept or broken out, zero-mapped
pages kept or CoW'd, holes dropped, and the *arrivals* (pages whose checksum is
unchanged since the previous scan and that are not kept on a stable node or the
zero page) marked. Stable nodes left with no kept page are stale and freed.

Phase 2 (numpy, per checksum bucket): arrivals are sorted by (checksum, position).
An arrival alone with its checksum and matching no live node goes to the unstable
tree. Every other group is byte-compared against its first page in bulk; a group
that matches no stable node and is byte-identical throughout is decided in closed
form (the kernel fills a new dup up to max_page_sharing, then starts another by
pairing two unstable pages; a lone last page stays unstable). Groups that meet a
stable node, have a member leaving one of those nodes, or hold different contents
under one checksum (a collision) are simulated page by page in scan order (slow
path, ``vmshare.engine.slowpath``; contents separated by byte comparison).
Contents never interact, so this is the kernel's sequential result.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from vmshare.engine import lone
from vmshare.engine.feedcheck import FeedCheck
from vmshare.engine.slowpath import SlowPath
from vmshare.engine.state import (
    BOOL,
    HAS_CK,
    I32,
    I64,
    LONE,
    SEEN,
    STABLE_CK,
    U64,
    UNSTABLE,
    ZERO,
    ZERO_NEW,
    Fetch,
    NodeTable,
    PageAtlas,
    RegionState,
    RunRef,
    release_freed_memory,
    run_starts,
)

ARRIVAL = 64          # scratch flag during end_scan: the page is an arrival
_ARRIVED = HAS_CK | SEEN | STABLE_CK   # with ARRIVAL, an arrival's only flags
#: an arrival's flags once its bucket is known: ARRIVAL and the bucket's number in
#: the seven bits every arrival has alike (not _ARRIVED: the zero group's value)
_CODES = np.array([ARRIVAL | (v & 63) | ((v & 64) << 1) for v in range(128) if v != _ARRIVED],
                  dtype=np.uint8)
_CHUNK = 1 << 15      # pages per vectorised step: bounds temporaries
_BUCKET = 1 << 14     # arrivals handled per bucket at least (memory bound below)
_GATHER = 1 << 16     # pages searched per step for a bucket's arrivals


class _Config(Protocol):  # EngineConfig, without importing core (no cycle)
    @property
    def max_page_sharing(self) -> int: ...
    @property
    def use_zero_pages(self) -> bool: ...


class _Scan:
    """The state of one end_scan (kept together to keep the phases short)."""

    def __init__(self, order: list[RegionState], runs: list[RunRef], nodes: NodeTable,
                 config: _Config, zero_hash: int, verify: bool,
                 fetch: Fetch | None = None, check: FeedCheck | None = None) -> None:
        self.order = order
        self.check = check
        #: every zero-checksum arrival was found all zero when fed: one group, no read
        self.zero_fast = check is not None and check.zero_ok
        self.nzero = 0
        self.vol = lone.Volatile(sum(rs.npages for rs in order))
        self.nodes = nodes
        self.mps = config.max_page_sharing
        self.uzp = config.use_zero_pages
        self.zero_hash = np.uint64(zero_hash)
        self.verify = verify
        offs = [0]
        for rs in order:
            offs.append(offs[-1] + rs.npages)
        self.offsets = np.asarray(offs, dtype=np.int64)
        self.total = offs[-1]
        rindex = {id(rs): r for r, rs in enumerate(order)}
        runs = sorted(runs, key=lambda rr: offs[rindex[id(rr.region)]] + rr.first)
        starts = np.array([offs[rindex[id(rr.region)]] + rr.first for rr in runs],
                          dtype=np.int64)
        self.atlas = PageAtlas(runs, starts, fetch)
        nn = nodes.n
        self.node_ck = np.zeros(nn, dtype=np.uint64)
        self.node_rep = np.full(nn, -1, dtype=np.int64)
        self.leave_pos: list[I64] = []
        self.leave_node: list[I32] = []
        self.narrivals = 0
        self.slow: list[tuple[int, I64]] = []
        #: no mapping left a stable node this scan (break-out, hole, stale node)
        self.quiet = True

    # -- phase 1 ------------------------------------------------------------------

    def keep_and_break(self) -> None:
        nodes = self.nodes
        for r, rs in enumerate(self.order):
            base = int(self.offsets[r])
            for s in range(0, rs.npages, _CHUNK):
                e = min(rs.npages, s + _CHUNK)
                fl, ck, nd = rs.flags[s:e], rs.ck[s:e], rs.node[s:e]
                seen = (fl & SEEN) != 0
                stable = (fl & STABLE_CK) != 0
                member = nd >= 0
                keep = member & seen & stable
                zero = (fl & ZERO) != 0
                zkeep = zero & seen & stable
                if self.verify:
                    ki = np.flatnonzero(keep)
                    if ki.size:
                        fps = self.atlas.fingerprints(ki + (base + s))
                        keep[ki] = (fps == nodes.fp[nd[ki]]).all(axis=1)
                    zi = np.flatnonzero(zero & seen)
                    zkeep[:] = False
                    zkeep[zi] = self.atlas.is_zero(zi + (base + s))
                brk = member & ~keep
                bi = np.flatnonzero(brk)
                if bi.size:
                    self.quiet = False
                    self.leave_pos.append(bi + (base + s))
                    self.leave_node.append(nd[bi].copy())
                    nd[bi] = -1
                ki = np.flatnonzero(keep)
                self.node_ck[nd[ki]] = ck[ki]
                self.node_rep[nd[ki]] = ki + (base + s)
                fl[zero & ~zkeep] &= np.uint8(~ZERO & 0xFF)
                arr = seen & stable & ~keep & ~zkeep
                alone = arr & ((fl & LONE) != 0)       # still alone: unstable at once
                fl &= np.uint8(~LONE & 0xFF)
                fl[alone] |= np.uint8(UNSTABLE | LONE)
                arr &= ~alone
                fl[~seen] = 0
                fl[arr] |= np.uint8(ARRIVAL)
                self.narrivals += int(np.count_nonzero(arr))
                if self.zero_fast:
                    self.nzero += int(np.count_nonzero(arr & (ck == self.zero_hash)))
                self.vol.add(ck[seen & ~stable])
        live_before = nodes.count > 0
        stale = live_before & (self.node_rep < 0)
        if stale.any():
            self.quiet = False
        if self.leave_node:
            ln = np.concatenate(self.leave_node)
            lp = np.concatenate(self.leave_pos)
            ok = ~stale[ln]
            self.leave_node, self.leave_pos = [ln[ok]], [lp[ok]]
            nodes.unmap(ln[ok])
        nodes.count[stale] = 0
        nodes.chain[stale] = -1
        if self.verify:
            self._verify_kept_bytes()

    def _verify_kept_bytes(self) -> None:
        """Verify mode: every kept page must equal its node's representative byte for byte."""
        for r, rs in enumerate(self.order):
            mi = np.flatnonzero(rs.node >= 0)
            if not mi.size:
                continue
            pos = mi + int(self.offsets[r])
            rep = self.node_rep[rs.node[mi]]
            bad = ~self.atlas.equal(pos, rep)
            if bad.any():             # only after a 128-bit collision: break them out
                self.quiet = False
                bi = mi[bad]
                self.nodes.unmap(rs.node[bi])
                rs.node[bi] = -1

    # -- phase 2 ------------------------------------------------------------------

    def arrivals(self) -> None:
        nodes = self.nodes
        live = np.flatnonzero(nodes.count[:self.node_ck.size] > 0).astype(np.int32)
        nck = self.node_ck[live]
        self.node_ck = np.zeros(0, dtype=np.uint64)   # no longer needed: free it now
        srt = np.argsort(nck, kind="stable")          # ties: ids ascending
        self.live_ck, self.live_ids = nck[srt], live[srt]
        del nck, srt, live
        # every new node takes two arrivals at least: room for all of them now,
        # so the node table is not regrown (and copied) bucket after bucket
        nodes.reserve(self.narrivals // 2)
        per = max(_BUCKET, self.total // 128)
        nb = min(_CODES.size, -(-self.narrivals // per)) if self.narrivals else 0
        if nb > 1:                    # each arrival's bucket, kept in its flags
            for rs in self.order:
                for s in range(0, rs.npages, _CHUNK):
                    e = min(rs.npages, s + _CHUNK)
                    ai = np.flatnonzero(self._arrivals(rs, s, e)) + s
                    rs.flags[ai] = _CODES[(rs.ck[ai] >> np.uint64(40)) % np.uint64(nb)]
        if self.check is not None:
            self.check.confirm(self.atlas)
        for b in range(nb):
            self._bucket(int(_CODES[b]) if nb > 1 else None)
            release_freed_memory()
        if self.nzero:
            self._zero_group()
        if self.slow:
            self._slow_groups()
        self.vol.clear_lone(self.order)

    def _gather(self, code: int | None) -> tuple[I64, U64]:
        """Positions and checksums of the arrivals whose flags are ``code`` (a
        bucket's; None: every arrival, in one bucket), in position order."""
        pos_parts: list[I64] = []
        ck_parts: list[U64] = []
        for r, rs in enumerate(self.order):
            ai = np.concatenate([np.flatnonzero(
                rs.flags[s:s + _GATHER] == code if code is not None else
                self._arrivals(rs, s, s + _GATHER)) + s for s in range(0, rs.npages, _GATHER)]
                or [np.zeros(0, np.int64)])
            pos_parts.append(ai + int(self.offsets[r]))
            ck_parts.append(rs.ck[ai])
        return np.concatenate(pos_parts), np.concatenate(ck_parts)

    def _arrivals(self, rs: RegionState, s: int, e: int) -> npt.NDArray[np.bool_]:
        """Pages ``s:e`` of ``rs`` decided in checksum buckets: the arrivals,
        less the zero group when it is decided apart (``_zero_group``)."""
        arr: BOOL = (rs.flags[s:e] & ARRIVAL) != 0
        if self.zero_fast:
            arr &= rs.ck[s:e] != self.zero_hash
        return arr

    def _bucket(self, code: int | None) -> None:
        """Decide one bucket's arrivals (``_gather``). Group-level arrays are
        built once; the per-arrival results are made and written back ``_CHUNK``
        arrivals at a time, so a bucket holding one huge group (all-zero pages)
        stays small."""
        pos, ck = self._gather(code)   # this frame holds the only references
        if not pos.size:
            return
        srt = np.argsort(ck, kind="stable")
        ck = ck[srt]
        pos = pos[srt]
        del srt
        n = pos.size
        gstart = run_starts(ck)
        gsize = np.diff(gstart, append=n)
        gck = ck[gstart]
        del ck
        lo = np.searchsorted(self.live_ck, gck, side="left")
        hi = np.searchsorted(self.live_ck, gck, side="right")
        has_nodes = hi > lo
        del lo, hi
        zero_g = (gck == self.zero_hash) if self.uzp else np.zeros(gck.size, np.bool_)
        cand = (gsize >= 2) | has_nodes | zero_g
        # per group: the flags its pages get, and for closed-form groups their nodes
        gflags = np.where(cand, 0, np.where(gck == self.zero_hash, UNSTABLE, UNSTABLE | LONE)
                          ).astype(np.uint8)
        # node-free groups: byte-compared with their first page, which is fingerprinted
        fastg = cand & ~has_nodes
        fi = np.flatnonzero(fastg)
        same, fps = self.atlas.verify_groups(pos, gstart[fi], gsize[fi]) if self.check is None \
            else self.check.verify(self.atlas, pos, gck[fi], gstart[fi], gsize[fi])
        fastg[fi[~same]] = False
        for g in np.flatnonzero(cand & ~fastg).tolist():
            s = int(gstart[g])
            self.slow.append((int(gck[g]), pos[s:s + int(gsize[g])].copy()))
        fg, fps = fi[same], fps[same]
        del fi, same
        if self.uzp and fg.size:
            zg = fg[zero_g[fg]]
            if zg.size:
                isz = self.atlas.is_zero(pos[gstart[zg]])
                gflags[zg[isz]] = ZERO | ZERO_NEW
                nz = gflags[fg] == 0
                fg, fps = fg[nz], fps[nz]
        gnode = self._closed_form(fg, fps, gsize) if fg.size else None
        done_g = fastg | ~cand
        for c0 in range(0, n, _CHUNK):
            c1 = min(n, c0 + _CHUNK)
            gid = np.searchsorted(gstart, np.arange(c0, c1), side="right") - 1
            keep = done_g[gid]
            gid = gid[keep]
            cpos = pos[c0:c1][keep]
            flags_or = gflags[gid]
            node_of = np.full(gid.size, -1, dtype=np.int32)
            if gnode is not None:
                first_node, nfull, rem = gnode[0][gid], gnode[1][gid], gnode[2][gid]
                closed = first_node >= 0
                blk = (np.arange(c0, c1)[keep] - gstart[gid]) // self.mps
                lone = closed & (blk == nfull) & (rem == 1)
                member = closed & ~lone
                node_of[member] = (first_node + blk)[member]
                flags_or[lone] = UNSTABLE
            self._write_back(cpos, node_of, flags_or)

    def _zero_group(self) -> None:
        """The arrivals of the zero page's checksum, all found zero when fed: one
        group of one content, decided without reading a page again (zero-mapped
        with use_zero_pages, else dups in closed form), unless a stable node of
        that checksum exists (then the slow path, as any group meeting one)."""
        zh = self.zero_hash
        if np.searchsorted(self.live_ck, zh, "right") > np.searchsorted(self.live_ck, zh):
            pos = np.concatenate([np.flatnonzero(((rs.flags & ARRIVAL) != 0) & (rs.ck == zh))
                                  + int(self.offsets[r]) for r, rs in enumerate(self.order)])
            self.slow.append((int(zh), pos))
            return
        n = self.nzero
        form = None
        if not self.uzp and n >= 2:
            one = np.zeros(1, dtype=np.int64)
            form = self._closed_form(one, lone.zero_fingerprint(), np.full(1, n, np.int64))
        rank = 0
        for rs in self.order:
            for s in range(0, rs.npages, _CHUNK):
                e = min(rs.npages, s + _CHUNK)
                idx = np.flatnonzero(((rs.flags[s:e] & ARRIVAL) != 0) & (rs.ck[s:e] == zh))
                if not idx.size:
                    continue
                node_of, flags_or = lone.zero_rows(rank + np.arange(idx.size), form,
                                                   self.mps, self.uzp)
                rank += idx.size
                rs.node[s + idx] = node_of
                rs.flags[s + idx] = (rs.flags[s + idx] & np.uint8(~ARRIVAL & 0xFF)) | flags_or

    def _closed_form(self, fg: I64, fps: U64, gsize: I64
                     ) -> tuple[I64, I64, I64]:
        """Node-free groups of one content (``fps``: each one's fingerprint): dups of
        max_page_sharing, lone last page unstable. Creates the nodes; returns per
        group of the bucket its first new node (-1: not a closed-form group), the
        number of full dups and the remainder, from which each page's node follows
        by its rank in the group."""
        mps = self.mps
        size = gsize[fg]
        nfull, rem = np.divmod(size, mps)
        blocks = nfull + (rem >= 2)
        first_node = np.cumsum(blocks) - blocks + self.nodes.n
        chained = blocks >= 2
        chain_of = np.full(fg.size, -1, dtype=np.int64)
        nch = int(np.count_nonzero(chained))
        if nch:
            chain_of[chained] = self.nodes.new_chains(nch) + np.arange(nch)
        total = int(blocks.sum())
        counts = np.full(total, mps, dtype=np.int64)
        last = first_node + blocks - 1 - self.nodes.n
        part = rem >= 2
        counts[last[part]] = rem[part]
        self.nodes.add(counts, np.repeat(chain_of, blocks), np.repeat(fps, blocks, axis=0))
        g_first = np.full(gsize.size, -1, dtype=np.int64)
        g_nfull = np.zeros(gsize.size, dtype=np.int64)
        g_rem = np.zeros(gsize.size, dtype=np.int64)
        g_first[fg], g_nfull[fg], g_rem[fg] = first_node, nfull, rem
        return g_first, g_nfull, g_rem

    def _write_back(self, pos: I64, node_of: I32, flags_or: npt.NDArray[np.uint8]) -> None:
        """Pages at ``pos`` (ascending within each region) get their node and flags."""
        reg = np.searchsorted(self.offsets, pos, side="right") - 1
        for r, rs in enumerate(self.order):
            m = np.flatnonzero(reg == r)
            if not m.size:
                continue
            li = pos[m] - int(self.offsets[r])
            rs.node[li] = node_of[m]
            rs.flags[li] = np.uint8(_ARRIVED) | flags_or[m]

    # -- slow path (vmshare.engine.slowpath) ----------------------------------------

    def _slow_groups(self) -> None:
        lp = np.concatenate(self.leave_pos) if self.leave_pos else np.zeros(0, np.int64)
        ln = np.concatenate(self.leave_node) if self.leave_node else np.zeros(0, np.int32)
        path = SlowPath(self.nodes, self.atlas, self.node_rep, self.live_ck, self.live_ids,
                        self.mps, self.uzp, self.verify)
        for apos, node_of, flags_or in path.run(self.slow, lp, ln):
            self._write_back(apos, node_of, flags_or)


def run_scan(order: list[RegionState], runs: list[RunRef], nodes: NodeTable,
             config: _Config, zero_hash: int, verify: bool,
             fetch: Fetch | None = None, check: FeedCheck | None = None) -> bool:
    """One scan's decisions; returns True when no mapping left a stable node.
    ``fetch``: pages not in ``runs``, read again (KsmEngine.end_scan);
    ``check``: the comparisons made while the runs were fed."""
    scan = _Scan(order, runs, nodes, config, zero_hash, verify, fetch, check)
    try:
        scan.keep_and_break()
        scan.arrivals()
    finally:
        scan.atlas.close()       # the runs' buffers are released here, scan over
    quiet = scan.quiet
    del scan
    nodes.prune_chains(config.max_page_sharing)
    remap = nodes.compact()
    if remap is not None:
        for rs in order:
            m = rs.node >= 0
            rs.node[m] = remap[rs.node[m]]
    return quiet
