"""The issue's workload as a real process: private anonymous memory, 40% copies
of 2,000 page templates, 50% unique pages, 10% zero pages, shuffled (seeded).
Used by the scan memory test and the engine benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tests.dump_corpus import mapping_process

MIX_CHILD = r"""
import ctypes, mmap, sys
import numpy as np
n = int(sys.argv[1])
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if sys.argv[3] == "1":
    m.madvise(mmap.MADV_MERGEABLE)       # kernel KSM may merge it (benchmarks)
if sys.argv[4] == "1":
    m.madvise(mmap.MADV_HUGEPAGE)        # transparent huge pages where the kernel gives them
a = np.frombuffer(m, dtype=np.uint64).reshape(n, 512)
rng = np.random.default_rng(int(sys.argv[2]))
for lo in range(0, n, 1 << 16):          # in slices: the child's temporaries stay small
    hi = min(n, lo + (1 << 16))
    kind = rng.random(hi - lo)
    a[lo:hi, 0] = np.where(kind < 0.4, rng.integers(0, 2000, hi - lo), np.arange(lo, hi) + 10_000)
    a[lo:hi, 1] = 7
    a[lo:hi][kind >= 0.9] = 0
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
sys.stdin.read()
"""


@contextmanager
def mix_process(pages: int, seed: int = 1, *, mergeable: bool = False, thp: bool = False
                ) -> Iterator[tuple[int, int]]:
    """A child process holding ``pages`` pages of the mix (madvised MERGEABLE
    with ``mergeable``, HUGEPAGE with ``thp``); yields (pid, address)."""
    with mapping_process(MIX_CHILD, str(pages), str(seed), str(int(mergeable)),
                         str(int(thp))) as (proc, addr):
        yield proc.pid, addr


def expected_sharing(pages: int) -> float:
    """About how many pages the mix merges: 40% copies onto 2,000 templates."""
    return pages * 0.4 - 2000
