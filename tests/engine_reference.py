"""A naive reference of the KSM engine: one page at a time, bytes kept everywhere.

It applies the rules documented in vmshare.engine / KsmEngine directly: scan
order, checksum stability, zero pages, stable-tree-first search with
max_page_sharing and chains, the unstable tree rebuilt every scan. Slow and
memory-hungry on purpose; only for checking the engine in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from vmshare.model import PAGE_SIZE, Region

ZERO = bytes(PAGE_SIZE)
Key = tuple[str, str, int]


@dataclass
class _Page:
    ck: int | None = None        # checksum recorded at the last visit (None: no rmap item)
    node: int | None = None
    zero: bool = False           # mapped to the zero page
    zero_new: bool = False
    unstable: bool = False


@dataclass
class _Node:
    content: bytes
    serial: int
    count: int = 0
    chain: int | None = None


@dataclass
class ReferenceKsm:
    max_page_sharing: int = 256
    use_zero_pages: bool = False
    hasher: Callable[[bytes], int] = field(default=lambda b: hash(b))
    pages: dict[Key, _Page] = field(default_factory=dict)
    nodes: dict[int, _Node] = field(default_factory=dict)
    chains: dict[int, list[int]] = field(default_factory=dict)
    gens: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    full_scans: int = 0
    serial: int = 0
    last_layout: list[tuple[str, str, int]] = field(default_factory=list)

    def scan(self, regions: Mapping[str, Sequence[Region]],
             content: Mapping[Key, bytes]) -> dict[str, int]:
        """One full scan; ``content`` holds the fed pages (missing keys are holes)."""
        wanted = {(s, r.key): (r.generation, r.size // PAGE_SIZE)
                  for s, regs in regions.items() for r in regs}
        for sr, g in list(self.gens.items()):
            if wanted.get(sr) != g:
                for key in [k for k in self.pages if k[:2] == sr]:
                    self._forget(key)
                del self.gens[sr]
        self.gens.update(wanted)
        for p in self.pages.values():
            p.unstable = False
            p.zero_new = False
        # Stable nodes with no page present holding their content are stale.
        alive = {nid for key, p in self.pages.items() if p.node is not None
                 for nid in [p.node] if content.get(key) == self.nodes[nid].content}
        for nid in list(self.nodes):
            if nid not in alive:
                for p in self.pages.values():
                    if p.node == nid:
                        p.node = None
                self._free(nid)
        unstable: dict[bytes, Key] = {}
        layout = [(s, r.key, i) for s, regs in regions.items() for r in regs
                  for i in range(r.size // PAGE_SIZE)]
        for key in layout:
            self._visit(key, content.get(key), unstable)
        self._prune()
        self.full_scans += 1
        return self.counters(content)

    def _visit(self, key: Key, data: bytes | None, unstable: dict[bytes, Key]) -> None:
        p = self.pages.get(key)
        if data is None:
            if p is not None:
                self._forget(key)
            return
        if p is None:
            p = self.pages[key] = _Page()
        if p.zero:
            if data == ZERO:
                return
            p.zero = False                                   # CoW from the zero page
        if p.node is not None:
            if data == self.nodes[p.node].content:
                return
            self.nodes[p.node].count -= 1                    # CoW break
            p.node = None
        h = self.hasher(data)
        stable = p.ck is not None and p.ck == h
        p.ck = h
        if not stable:
            return
        if self.use_zero_pages and data == ZERO:
            p.zero = p.zero_new = True
            return
        same = sorted((n for n in self.nodes.values() if n.content == data),
                      key=lambda n: n.serial)
        room = [n for n in same if n.count < self.max_page_sharing]
        if room:
            best = max(room, key=lambda n: (n.count, -n.serial))
            best.count += 1
            p.node = self._id(best)
            return
        other = unstable.pop(data, None)
        if other is None:
            unstable[data] = key
            p.unstable = True
            return
        self.serial += 1
        nid = self.serial
        self.nodes[nid] = _Node(data, self.serial, 2)
        if same:
            first = same[0]
            if first.chain is None:
                first.chain = self._id(first)
                self.chains[first.chain] = [self._id(first)]
            self.chains[first.chain].append(nid)
            self.nodes[nid].chain = first.chain
        q = self.pages[other]
        q.unstable = False
        q.node = nid
        p.node = nid

    def _id(self, node: _Node) -> int:
        return next(i for i, n in self.nodes.items() if n is node)

    def _forget(self, key: Key) -> None:
        p = self.pages.pop(key)
        if p.node is not None:
            self.nodes[p.node].count -= 1

    def _free(self, nid: int) -> None:
        n = self.nodes.pop(nid)
        if n.chain is not None:
            self.chains[n.chain].remove(nid)

    def _prune(self) -> None:
        for nid in [i for i, n in self.nodes.items() if n.count <= 0]:
            self._free(nid)
        for c, dups in list(self.chains.items()):
            if not dups:
                del self.chains[c]
            elif len(dups) == 1 and self.nodes[dups[0]].count < self.max_page_sharing:
                self.nodes[dups[0]].chain = None
                del self.chains[c]

    def counters(self, content: Mapping[Key, bytes]) -> dict[str, int]:
        shared = sum(1 for n in self.nodes.values() if n.count > 0)
        sharing = sum(n.count - 1 for n in self.nodes.values() if n.count > 0)
        unshared = sum(1 for p in self.pages.values() if p.unstable)
        rmap = sum(1 for p in self.pages.values() if not p.zero or p.zero_new)
        return {
            "pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared,
            "pages_volatile": max(0, rmap - shared - sharing - unshared),
            "full_scans": self.full_scans,
            "ksm_zero_pages": sum(1 for p in self.pages.values() if p.zero),
            "stable_node_chains": len(self.chains),
            "stable_node_dups": sum(len(d) for d in self.chains.values()),
        }

    def saved(self) -> dict[str, Fraction]:
        out: dict[str, Fraction] = {}
        for (src, _, _), p in self.pages.items():
            out.setdefault(src, Fraction(0))
            if p.node is not None:
                k = self.nodes[p.node].count
                out[src] += Fraction(k - 1, k)
        return out

    def shares_with(self) -> dict[str, dict[str, int]]:
        per_node: dict[int, dict[str, int]] = {}
        for (src, _, _), p in self.pages.items():
            if p.node is not None:
                d = per_node.setdefault(p.node, {})
                d[src] = d.get(src, 0) + 1
        out: dict[str, dict[str, int]] = {}
        for d in per_node.values():
            for a, ca in d.items():
                for b in d:
                    if b != a:
                        row = out.setdefault(a, {})
                        row[b] = row.get(b, 0) + ca
        return out
