"""The slow path of one scan's merge decisions (phase 2 of ``vmshare.engine.merge``).

Checksum groups that meet a stable node, have a member leaving one of those
nodes, or hold different contents under one checksum (a collision) are
simulated here page by page in scan order. A group's pages and its nodes'
representatives are read once and told apart by their bytes; contents never
interact, so each content replays its own events in scan order: a mapping
leaving one of its dups (break-out or hole), and an arrival joining the
fullest dup with room, waiting in the unstable tree, or pairing with the
unstable page before it into a new node (a dup in a chain when the content
already has a node). The new nodes are created together once every group is
decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmshare.engine.state import (
    I32,
    I64,
    U64,
    UNSTABLE,
    ZERO,
    ZERO_NEW,
    NodeTable,
    PageAtlas,
    fingerprint_bytes,
)
from vmshare.model import PAGE_SIZE

_ZERO_PAGE = bytes(PAGE_SIZE)
_LEAVE, _ARRIVE = 0, 1     # event kinds; at one position a leave comes first

#: one group's decisions: arrival positions, each one's node (-1: none), flags to set
Outcome = tuple[I64, I32, npt.NDArray[np.uint8]]
#: an event of one content: (position, _LEAVE, node) or (position, _ARRIVE, arrival index)
Event = tuple[int, int, int]


@dataclass
class _Tally:
    """One group's simulation in progress."""

    count: dict[int, int]       # mappings per node of the group, new nodes included
    joinable: set[int]          # nodes whose representative still holds their content
    node_of: list[int]          # per arrival: the node it joins (-1: none)
    flags_or: list[int]         # per arrival: the flags it gets


class SlowPath:
    """The slow-path groups of one scan, decided against the scan's stable nodes.

    ``node_rep``: a kept page of each node (its representative); ``live_ck`` and
    ``live_ids``: the live nodes' checksums, sorted, and their ids.
    """

    def __init__(self, nodes: NodeTable, atlas: PageAtlas, node_rep: I64, live_ck: U64,
                 live_ids: I32, max_page_sharing: int, use_zero_pages: bool,
                 verify: bool) -> None:
        self.nodes = nodes
        self.atlas = atlas
        self.node_rep = node_rep
        self.live_ck = live_ck
        self.live_ids = live_ids
        self.mps = max_page_sharing
        self.uzp = use_zero_pages
        self.verify = verify
        self.base = nodes.n                               # id of the first node made here
        self.pending: list[tuple[int, int, bytes]] = []   # new nodes: count, chain, bytes

    def run(self, groups: list[tuple[int, I64]], leave_pos: I64, leave_node: I32
            ) -> list[Outcome]:
        """Decide every group (checksum, arrival positions in scan order), given the
        mappings that leave nodes this scan (``leave_pos``, ``leave_node``); creates
        the new nodes and returns each group's outcome, to be written back."""
        results = []
        for hv, apos in groups:
            lo = np.searchsorted(self.live_ck, np.uint64(hv), side="left")
            hi = np.searchsorted(self.live_ck, np.uint64(hv), side="right")
            gnodes = sorted(self.live_ids[lo:hi].tolist())
            results.append(self._simulate(apos, gnodes, leave_pos, leave_node))
        if self.pending:
            counts = np.array([p[0] for p in self.pending], dtype=np.int64)
            chains = np.array([p[1] for p in self.pending], dtype=np.int64)
            fps = fingerprint_bytes(b"".join(p[2] for p in self.pending))
            self.nodes.add(counts, chains, fps)
        return results

    def _simulate(self, apos: I64, gnodes: list[int], lp: I64, ln: I32) -> Outcome:
        """One checksum group in scan order, contents separated by bytes."""
        arr = apos.tolist()
        contents, acls, ncls = self._contents(apos, gnodes)
        leaves = self._leaves(gnodes, lp, ln)
        count = {nd: int(self.nodes.count[nd]) for nd in gnodes}
        for _, nd in leaves:
            count[nd] += 1           # counted as they are before the scan reaches them
        t = _Tally(count, self._joinable(gnodes), [-1] * len(arr), [0] * len(arr))
        for c, content in enumerate(contents):
            dups = [nd for nd, k in zip(gnodes, ncls, strict=True) if k == c]
            events = sorted([(p, _LEAVE, nd) for p, nd in leaves if nd in dups] +
                            [(arr[i], _ARRIVE, i) for i, k in enumerate(acls) if k == c])
            if self.uzp and content == _ZERO_PAGE:
                self._to_zero_page(events, t)
            else:
                self._merge(events, content, dups, t)
        self._store_counts(t.count)
        return (apos, np.asarray(t.node_of, dtype=np.int32),
                np.asarray(t.flags_or, dtype=np.uint8))

    def _contents(self, apos: I64, gnodes: list[int]
                  ) -> tuple[list[bytes], list[int], list[int]]:
        """The group's distinct contents, and the index of each arrival's and each
        node representative's content among them (one read for all)."""
        reps = self.node_rep[np.array(gnodes, dtype=np.int64)]
        self.atlas.load(np.concatenate([apos, reps]))
        contents: list[bytes] = []

        def index(b: bytes) -> int:
            for i, c in enumerate(contents):
                if c == b:
                    return i
            contents.append(b)
            return len(contents) - 1

        acls = [index(self.atlas.page(p)) for p in apos.tolist()]
        ncls = [index(self.atlas.page(int(r))) for r in reps.tolist()]
        return contents, acls, ncls

    def _joinable(self, gnodes: list[int]) -> set[int]:
        """Nodes that may take a page. Outside verify mode (where kept pages were
        checked already) a node's representative must still match its fingerprint."""
        if self.verify or not gnodes:
            return set(gnodes)
        ids = np.array(gnodes, dtype=np.int64)
        fps = self.atlas.fingerprints(self.node_rep[ids])
        ok = (fps == self.nodes.fp[ids]).all(axis=1)
        return {nd for nd, good in zip(gnodes, ok.tolist(), strict=True) if good}

    @staticmethod
    def _leaves(gnodes: list[int], lp: I64, ln: I32) -> list[tuple[int, int]]:
        """(position, node) of the mappings leaving the group's nodes this scan."""
        gset = np.array(gnodes, dtype=np.int32)
        lm = np.isin(ln, gset) if gnodes else np.zeros(ln.size, np.bool_)
        return list(zip(lp[lm].tolist(), ln[lm].tolist(), strict=True))

    @staticmethod
    def _to_zero_page(events: list[Event], t: _Tally) -> None:
        """All-zero content with use_zero_pages: arrivals map the zero page."""
        for _, kind, x in events:
            if kind == _LEAVE:
                t.count[x] -= 1
            else:
                t.flags_or[x] = ZERO | ZERO_NEW

    def _merge(self, events: list[Event], content: bytes, dups: list[int], t: _Tally) -> None:
        """One content's events in scan order: an arrival joins the fullest dup
        with room (ties: the oldest), else waits in the unstable tree until the
        next arrival pairs with it into a new node."""
        unstable = -1
        for _, kind, x in events:
            if kind == _LEAVE:
                t.count[x] -= 1
                continue
            best, best_count = -1, -1
            for d in dups:
                cd = t.count[d]
                if best_count < cd < self.mps and d in t.joinable:
                    best, best_count = d, cd
            if best >= 0:
                t.count[best] += 1
                t.node_of[x] = best
            elif unstable < 0:
                unstable = x
            else:
                d = self.base + len(self.pending)
                chain = self._chain_of(dups[0]) if dups else -1
                self.pending.append((2, chain, content))
                t.count[d] = 2
                t.joinable.add(d)
                dups.append(d)
                t.node_of[unstable] = t.node_of[x] = d
                unstable = -1
        if unstable >= 0:
            t.flags_or[unstable] = UNSTABLE

    def _store_counts(self, count: dict[int, int]) -> None:
        for nd, k in count.items():
            if nd < self.base:
                self.nodes.count[nd] = k
            else:
                _, chain, content = self.pending[nd - self.base]
                self.pending[nd - self.base] = (k, chain, content)

    def _chain_of(self, first: int) -> int:
        """The chain of dup ``first``, creating one if it is a plain stable node."""
        if first < self.base:
            ch = int(self.nodes.chain[first])
            if ch < 0:
                ch = self.nodes.new_chain()
                self.nodes.chain[first] = ch
            return ch
        k, ch, content = self.pending[first - self.base]
        if ch < 0:
            ch = self.nodes.new_chain()
            self.pending[first - self.base] = (k, ch, content)
        return ch
