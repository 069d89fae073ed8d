"""The engine's configuration and results: the kernel knobs the algorithm
depends on, and the kernel's counters with the kernel's names and meanings.
Split from core for size."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from vmshare.engine.state import SEEN, UNSTABLE, ZERO, ZERO_NEW, NodeTable, RegionState
from vmshare.errors import UsageError
from vmshare.model import COUNTER_MEANINGS

_COUNT_CHUNK = 1 << 16    # pages counted per step at the end of a scan


@dataclass(frozen=True)
class EngineConfig:
    """The kernel knobs the algorithm depends on (same names as /sys/kernel/mm/ksm).

    merge_across_nodes=1 and smart_scan=0 are assumed: one tree for all pages, no
    page skipped (a differential test against the kernel must set smart_scan=0).
    """

    max_page_sharing: int = 256
    use_zero_pages: bool = False

    def __post_init__(self) -> None:
        if self.max_page_sharing < 2:
            raise UsageError(f"max_page_sharing must be >= 2, not {self.max_page_sharing}")


@dataclass(frozen=True)
class KsmCounters:
    """The kernel's counters, with the kernel's names and meanings (COUNTER_MEANINGS)."""

    pages_shared: int = 0
    pages_sharing: int = 0
    pages_unshared: int = 0
    pages_volatile: int = 0
    pages_scanned: int = 0
    full_scans: int = 0
    ksm_zero_pages: int = 0
    stable_node_chains: int = 0
    stable_node_dups: int = 0

    def merge_state(self) -> tuple[int, ...]:
        """Every counter except the cumulative ones (full_scans, pages_scanned)."""
        return (self.pages_shared, self.pages_sharing, self.pages_unshared,
                self.pages_volatile, self.ksm_zero_pages, self.stable_node_chains,
                self.stable_node_dups)


assert all(f.name in COUNTER_MEANINGS for f in fields(KsmCounters))


@dataclass(frozen=True)
class ScanResult:
    counters: KsmCounters
    pages_fed: int


def count_scan(order: list[RegionState], nodes: NodeTable, quiet: bool, scanned_before: int,
               full_scans: int) -> tuple[ScanResult, bool]:
    """The scan's result (its counters and the pages fed) and whether the
    engine settled (``KsmEngine.settled``), from the pages' flags and the
    node table (``quiet``: the merge changed nothing; ``scanned_before``:
    pages_scanned before this scan), in chunks of _COUNT_CHUNK pages."""
    fed = rmap_items = unshared = zero = 0
    settled = quiet
    for rs in order:
        for s in range(0, rs.npages, _COUNT_CHUNK):
            fl = rs.flags[s:s + _COUNT_CHUNK]
            seen = (fl & SEEN) != 0
            fed += int(np.count_nonzero(seen))
            seen &= (fl & (ZERO | ZERO_NEW)) != ZERO       # less the zero-mapped before
            rmap_items += int(np.count_nonzero(seen))
            if settled:     # a volatile page (new, changed, just zero-mapped) remains
                settled = not np.any(seen & (rs.node[s:s + _COUNT_CHUNK] < 0)
                                     & ((fl & UNSTABLE) == 0))
            unshared += int(np.count_nonzero(fl & UNSTABLE))
            zero += int(np.count_nonzero(fl & ZERO))
    shared, sharing = nodes.shared_sharing()
    chains, dups = nodes.chain_counts()
    counters = KsmCounters(
        pages_shared=shared, pages_sharing=sharing, pages_unshared=unshared,
        pages_volatile=max(0, rmap_items - shared - sharing - unshared),
        pages_scanned=scanned_before + rmap_items, full_scans=full_scans,
        ksm_zero_pages=zero, stable_node_chains=chains, stable_node_dups=dups)
    return ScanResult(counters, fed), settled
