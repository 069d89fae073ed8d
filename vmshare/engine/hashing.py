"""The engine's page checksums: xxh3_64 in C by default, or a hasher injected
(tests forcing collisions), called page by page."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import xxhash

from vmshare.engine import _pages
from vmshare.engine.state import HAS_CK
from vmshare.errors import UsageError
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


def zeros_hold(data: memoryview, checksums: npt.NDArray[np.uint64], zero_hash: int) -> bool:
    """Is every page of ``data`` whose checksum is ``zero_hash`` all zero?"""
    data = data.cast("B") if data.format != "B" else data
    z = np.flatnonzero(checksums == np.uint64(zero_hash))
    if z.size == 0:
        return True
    out = np.empty(z.size, dtype=np.bool_)
    pages = _pages.PageSet([data], [0])
    try:
        pages.is_zero(z.astype(np.int64), out)
    finally:
        pages.close()
    return bool(out.all())


def run_checksums(hasher: Hasher, data: memoryview, flags: npt.NDArray[np.uint8],
                  ck: npt.NDArray[np.uint64], unchanged: npt.NDArray[np.bool_] | None,
                  checksums: npt.NDArray[np.uint64] | None) -> npt.NDArray[np.uint64]:
    """The checksums of a run being fed (``KsmEngine.feed``): ``checksums`` as
    given (hashed by the thread that read it), or the pages hashed now, less
    those ``unchanged`` since the last scan that have a checksum then (their
    ``flags`` and recorded ``ck``). Raises UsageError for a mask or checksums
    of another length, or both given."""
    n = len(data) // PAGE_SIZE
    if checksums is not None:
        if unchanged is not None:
            raise UsageError("feed takes an unchanged mask or checksums, not both")
        if checksums.shape != (n,) or checksums.dtype != np.uint64:
            raise UsageError(f"{checksums.size} checksums for a run of {n} pages")
        return checksums
    if unchanged is None:
        return hash_pages(hasher, data, n)
    if unchanged.shape != (n,):
        raise UsageError(f"unchanged mask of {unchanged.size} for a run of {n} pages")
    h = ck.copy()
    todo = np.flatnonzero(~(unchanged & ((flags & HAS_CK) != 0)))
    if todo.size == n:
        return hash_pages(hasher, data, n)
    if todo.size:
        h[todo] = hash_some(hasher, data, todo)
    return h
