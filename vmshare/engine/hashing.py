"""The engine's page checksums: xxh3_64 in C by default, or a hasher injected
(tests forcing collisions), called page by page."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import xxhash

from vmshare.engine import _pages
from vmshare.model import PAGE_SIZE

Hasher = Callable[[memoryview], int]

_HASH_CHUNK = 4096   # pages a custom hasher hashes per list comprehension (bounds the list)


def default_hasher(page: memoryview) -> int:
    """xxh3_64 of one page (the index and checksum function)."""
    return int(xxhash.xxh3_64_intdigest(page))


def hash_pages(hasher: Hasher, data: memoryview, n: int) -> npt.NDArray[np.uint64]:
    """The checksum of each of the ``n`` pages of ``data``."""
    out = np.empty(n, dtype=np.uint64)
    if hasher is default_hasher:     # the same xxh3_64, in C, GIL released
        _pages.hash64(data, out)
        return out
    for c in range(0, n, _HASH_CHUNK):
        m = min(_HASH_CHUNK, n - c)
        base = c * PAGE_SIZE
        out[c:c + m] = [hasher(data[o:o + PAGE_SIZE])
                        for o in range(base, base + m * PAGE_SIZE, PAGE_SIZE)]
    return out


def hash_some(hasher: Hasher, data: memoryview, idx: npt.NDArray[np.intp]
              ) -> npt.NDArray[np.uint64]:
    """The checksum of the pages ``idx`` of ``data``."""
    out = np.empty(idx.size, dtype=np.uint64)
    if hasher is default_hasher:
        _pages.hash64_at(data, np.ascontiguousarray(idx, dtype=np.int64), out)
        return out
    for c in range(0, idx.size, _HASH_CHUNK):
        out[c:c + _HASH_CHUNK] = [hasher(data[o:o + PAGE_SIZE]) for o in
                                  (idx[c:c + _HASH_CHUNK] * PAGE_SIZE).tolist()]
    return out
