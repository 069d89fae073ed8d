"""The page contents the guest's ``fill`` program writes, computed on the host.

This mirrors fill.c exactly (see the layout comment there), so a test or a
prediction can know which guest pages to expect without booting anything:
page ``i`` of the identical region of a guest booted with seed ``s`` is
``expected_pages(REGION_IDENTICAL, s, i, 1)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vmshare.model import PAGE_SIZE

REGION_IDENTICAL = "I"
REGION_UNIQUE = "U"
REGION_VOLATILE = "V"
PAGE_MAGIC = b"VMSHARE"           # bytes 0..6 of every filled page; byte 7 is the region code
PAGE_WORDS = PAGE_SIZE // 8
GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def mix64(z: int) -> int:
    """splitmix64's finaliser, as in fill.c."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _mix64_array(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def page_key(region: str, seed: int, index: int) -> int:
    code = _code(region)
    return mix64(mix64((seed + code * GOLDEN) & _MASK) ^ index)


def _code(region: str) -> int:
    if region not in (REGION_IDENTICAL, REGION_UNIQUE, REGION_VOLATILE):
        raise ValueError(f"region must be one of I, U, V, not {region!r}")
    return ord(region)


def expected_pages(region: str, seed: int, first: int, count: int) -> npt.NDArray[np.uint8]:
    """Pages ``first .. first+count-1`` of ``region`` for ``seed``: shape (count, 4096).

    For the volatile region word 3 (the counter) is given as 0. Raises
    ValueError for an unknown region or a negative range.
    """
    if first < 0 or count < 0:
        raise ValueError("first and count must be >= 0")
    code = _code(region)
    words = np.empty((count, PAGE_WORDS), dtype="<u8")
    indexes = np.arange(first, first + count, dtype=np.uint64)
    base = mix64((seed + code * GOLDEN) & _MASK)
    keys = _mix64_array(np.uint64(base) ^ indexes)
    steps = np.arange(4, PAGE_WORDS, dtype=np.uint64) * np.uint64(GOLDEN)
    with np.errstate(over="ignore"):
        words[:, 4:] = _mix64_array(keys[:, None] + steps[None, :])
    words[:, 0] = int.from_bytes(PAGE_MAGIC + bytes([code]), "little")
    words[:, 1] = indexes
    words[:, 2] = seed & _MASK
    words[:, 3] = 0
    return words.view(np.uint8).reshape(count, PAGE_SIZE)


def page_region(page: bytes | memoryview) -> str | None:
    """The region code of a page written by fill ("I", "U", "V"), or None."""
    head = bytes(page[:8])
    if head[:7] != PAGE_MAGIC:
        return None
    region = chr(head[7])
    return region if region in (REGION_IDENTICAL, REGION_UNIQUE, REGION_VOLATILE) else None
