"""Per-page state arrays and the stable node table (no I/O, no merge logic).

Per page, 13 bytes: the checksum of its last scan (uint64), the stable node it
is mapped to (int32, -1 for none) and flags (uint8). Stable nodes are indices
into Python lists; chains are sets of dup indices of one content.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

HAS_CK = 1       # the page has an rmap item with a recorded checksum
SEEN = 2         # fed in the current scan
STABLE_CK = 4    # fed this scan with the checksum recorded at the previous scan
ZERO = 8         # mapped to the zero page by use_zero_pages (no rmap item once passed)
ZERO_NEW = 16    # zero-mapped during this scan: its rmap item still exists
UNSTABLE = 32    # in this scan's unstable tree


class RegionState:
    """What the engine remembers of one (source, region) across scans."""

    __slots__ = ("ck", "flags", "generation", "key", "node", "npages", "source")

    def __init__(self, source: str, key: str, generation: str, npages: int) -> None:
        self.source = source
        self.key = key
        self.generation = generation
        self.npages = npages
        self.ck: npt.NDArray[np.uint64] = np.zeros(npages, dtype=np.uint64)
        self.node: npt.NDArray[np.int32] = np.full(npages, -1, dtype=np.int32)
        self.flags: npt.NDArray[np.uint8] = np.zeros(npages, dtype=np.uint8)


@dataclass(frozen=True)
class RunRef:
    """A fed run: the engine's reference to the caller's bytes for this scan only."""

    region: RegionState
    first: int
    npages: int
    data: memoryview


class NodeTable:
    """Stable nodes (the kernel's stable_node / stable_node dup) and their chains."""

    def __init__(self) -> None:
        self.hash: list[int] = []
        self.count: list[int] = []     # rmap items mapped (rmap_hlist_len)
        self.chain: list[int] = []     # chain id, -1 when a plain stable node
        self.live: list[bool] = []
        self.serial: list[int] = []    # creation order: ties between dups go to the oldest
        self._serial = 0
        self._free: list[int] = []
        self.chains: dict[int, list[int]] = {}
        self._next_chain = 0

    def new(self, h: int, count: int) -> int:
        self._serial += 1
        if self._free:
            i = self._free.pop()
            self.hash[i], self.count[i], self.chain[i], self.live[i] = h, count, -1, True
            self.serial[i] = self._serial
            return i
        self.serial.append(self._serial)
        self.hash.append(h)
        self.count.append(count)
        self.chain.append(-1)
        self.live.append(True)
        return len(self.hash) - 1

    def add_dup(self, existing: int, dup: int) -> None:
        """``dup`` holds the same content as ``existing``: queue both on one chain."""
        c = self.chain[existing]
        if c < 0:
            c = self._next_chain
            self._next_chain += 1
            self.chains[c] = [existing]
            self.chain[existing] = c
        self.chains[c].append(dup)
        self.chain[dup] = c

    def free(self, i: int) -> None:
        c = self.chain[i]
        if c >= 0:
            self.chains[c].remove(i)
            self.chain[i] = -1
        self.live[i] = False
        self.count[i] = 0
        self._free.append(i)

    def unmap(self, members: npt.NDArray[np.int32]) -> None:
        nodes, k = np.unique(members, return_counts=True)
        for i, m in zip(nodes.tolist(), k.tolist(), strict=True):
            self.count[i] -= m

    def free_empty(self) -> None:
        for i, (alive, c) in enumerate(zip(self.live, self.count, strict=True)):
            if alive and c <= 0:
                self.free(i)

    def prune_chains(self, max_page_sharing: int) -> None:
        """Free empty dups; drop chains left empty or with one dup that has room."""
        self.free_empty()
        for c, dups in list(self.chains.items()):
            if not dups:
                del self.chains[c]
            elif len(dups) == 1 and self.count[dups[0]] < max_page_sharing:
                self.chain[dups[0]] = -1
                del self.chains[c]

    def live_ids(self) -> list[int]:
        return [i for i, alive in enumerate(self.live) if alive]

    def shared_sharing(self) -> tuple[int, int]:
        shared = sharing = 0
        for alive, c in zip(self.live, self.count, strict=True):
            if alive and c > 0:
                shared += 1
                sharing += c - 1
        return shared, sharing

    def chain_counts(self) -> tuple[int, int]:
        return len(self.chains), sum(len(d) for d in self.chains.values())

    def count_array(self) -> npt.NDArray[np.int64]:
        return np.asarray(self.count, dtype=np.int64) if self.count else \
            np.zeros(0, dtype=np.int64)
