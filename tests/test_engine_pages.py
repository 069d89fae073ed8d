"""The C inner loops (vmshare.engine._pages) against Python/numpy computing the same."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from vmshare.engine import _pages
from vmshare.model import PAGE_SIZE

U8 = np.uint8


def pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PAGE_SIZE), dtype=U8)


def test_hashes_equal_python_xxhash() -> None:
    data = pages(9)
    data[3] = 0                      # the zero page too
    data[4] = data[5]
    data[4, -1] ^= 1                 # differs in the very last byte
    out = np.zeros(9, dtype=np.uint64)
    _pages.hash64(data.reshape(-1), out)
    assert out.tolist() == [xxhash.xxh3_64_intdigest(p.tobytes()) for p in data]
    idx = np.array([8, 0, 3, 3], dtype=np.int64)
    some = np.zeros(4, dtype=np.uint64)
    _pages.hash64_at(data.reshape(-1), idx, some)
    assert some.tolist() == out[idx].tolist()
    fp = np.zeros((9, 2), dtype=np.uint64)
    _pages.hash128(data.reshape(-1), fp)
    # low word, then high word: the big-endian digest read backwards
    assert [f.tobytes()[::-1] for f in fp] == [xxhash.xxh3_128_digest(p.tobytes())
                                              for p in data]
    assert len({tuple(f) for f in fp.tolist()}) == 9


def test_hash_errors_name_the_problem() -> None:
    data = pages(2).reshape(-1)
    with pytest.raises(ValueError, match="not a whole number of pages"):
        _pages.hash64(data[:-1], np.zeros(1, dtype=np.uint64))
    with pytest.raises(ValueError, match="output holds 8 bytes, 16 needed"):
        _pages.hash64(data, np.zeros(1, dtype=np.uint64))
    with pytest.raises(IndexError, match=r"index 2 \(entry 1\) is outside a buffer of 2 pages"):
        _pages.hash64_at(data, np.array([0, 2], dtype=np.int64), np.zeros(2, dtype=np.uint64))
    with pytest.raises(TypeError):
        _pages.hash64(data, b"\0" * 16)          # read-only output


def make_set(seed: int = 1) -> tuple[_pages.PageSet, dict[int, np.ndarray]]:
    """Three runs at global positions 0-3, 10-11 and 20-24 (gaps between)."""
    runs = {0: pages(4, seed), 10: pages(2, seed + 1), 20: pages(5, seed + 2)}
    runs[10][1] = runs[0][2]                  # equal pages in different runs
    runs[20][0] = 0
    runs[20][4] = runs[0][2]
    runs[20][4, -1] ^= 0x80                   # ... and one differing in its last byte
    runs[20][3] = runs[0][2]
    runs[20][3, 0] ^= 1                       # ... and one in its first
    ps = _pages.PageSet([r.reshape(-1).data for r in runs.values()], list(runs))
    return ps, {start + i: r[i] for start, r in runs.items() for i in range(len(r))}


def test_pageset_matches_numpy() -> None:
    ps, by_pos = make_set()
    pos = sorted(by_pos)
    pa = np.array([a for a in pos for _ in pos], dtype=np.int64)
    pb = np.array([b for _ in pos for b in pos], dtype=np.int64)
    eq = np.zeros(pa.size, dtype=np.bool_)
    ps.equal(pa, pb, eq)
    want = [bool((by_pos[a] == by_pos[b]).all()) for a, b in zip(pa, pb, strict=True)]
    assert eq.tolist() == want
    assert eq[(pa == 2) & (pb == 11)].all() and not eq[(pa == 2) & (pb == 24)].any()
    p = np.array(pos, dtype=np.int64)
    z = np.zeros(p.size, dtype=np.bool_)
    ps.is_zero(p, z)
    assert z.tolist() == [not by_pos[q].any() for q in pos] and z.sum() == 1
    fp = np.zeros((p.size, 2), dtype=np.uint64)
    ps.hash128(p, fp)
    assert [f.tobytes()[::-1] for f in fp] == [xxhash.xxh3_128_digest(by_pos[q].tobytes())
                                              for q in pos]
    assert ps.page(21) == by_pos[21].tobytes()


def test_verify_groups_compares_each_page_with_its_first() -> None:
    ps, by_pos = make_set()
    order = np.array([2, 11, 3, 24, 23, 0, 20], dtype=np.int64)
    first = np.array([0, 2, 4, 5, 6], dtype=np.int64)
    size = np.array([2, 2, 1, 1, 1], dtype=np.int64)       # {2,11} {3,24} {23} {0} {20}
    same = np.zeros(5, dtype=np.bool_)
    fp = np.zeros((5, 2), dtype=np.uint64)
    ps.verify_groups(order, first, size, same, fp)
    assert same.tolist() == [True, False, True, True, True]
    heads = order[first]
    assert [f.tobytes()[::-1] for f in fp] == [xxhash.xxh3_128_digest(by_pos[h].tobytes())
                                              for h in heads.tolist()]
    # a near-copy (last byte) in a group of equals makes the group not the same
    ps.verify_groups(np.array([2, 11, 24], dtype=np.int64), np.array([0], dtype=np.int64),
                     np.array([3], dtype=np.int64), same[:1], fp[:1])
    assert not same[0]


def test_pageset_refuses_bad_positions_and_layouts() -> None:
    ps, _ = make_set()
    out = np.zeros(1, dtype=np.bool_)
    for bad in (4, 12, 19, 25, -1):             # gaps, past the end, negative
        with pytest.raises(IndexError, match=rf"position {bad} \(entry 0\) is in no fed run"):
            ps.is_zero(np.array([bad], dtype=np.int64), out)
        with pytest.raises(IndexError, match=f"position {bad} "):
            ps.equal(np.array([0], dtype=np.int64), np.array([bad], dtype=np.int64), out)
    with pytest.raises(IndexError, match="group 0 is empty or reaches beyond"):
        ps.verify_groups(np.array([0, 1], dtype=np.int64), np.array([1], dtype=np.int64),
                         np.array([2], dtype=np.int64), out, np.zeros((1, 2), np.uint64))
    with pytest.raises(ValueError, match="output holds 1 bytes, 2 needed"):
        ps.equal(np.array([0, 1], dtype=np.int64), np.array([0, 1], dtype=np.int64), out)
    two = pages(2).reshape(-1)
    with pytest.raises(ValueError, match="runs must be sorted and disjoint"):
        _pages.PageSet([two, two], [0, 1])
    with pytest.raises(ValueError, match="2 buffers but 1 starts"):
        _pages.PageSet([two, two], [0])
    with pytest.raises(ValueError, match="not a whole number of pages"):
        _pages.PageSet([two[:100]], [0])
    ps.close()
    with pytest.raises(ValueError, match="PageSet is closed"):
        ps.page(0)


def test_pageset_holds_its_buffers_until_closed() -> None:
    buf = bytearray(2 * PAGE_SIZE)
    ps = _pages.PageSet([buf], [0])
    with pytest.raises(BufferError):
        buf.extend(b"x")                      # exported: cannot be resized under it
    ps.close()
    buf.extend(b"x")
