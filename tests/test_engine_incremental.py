"""Incremental rescans: the engine's ``unchanged`` masks and the live source's
soft-dirty mirror (vmshare.sources.softdirty.SoftDirtyMirror)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from tests.dump_corpus import mapping_process
from tests.test_engine import Z, pg
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.model import PAGE_SIZE, PageRun, Region, Vma
from vmshare.sources.live import LiveProcessSource, TrackedPageRun
from vmshare.sources.softdirty import SoftDirtyMirror


def scan(e: KsmEngine, world: dict[str, list[bytes]], prev: dict[str, list[bytes]] | None,
         lie: bool = False) -> tuple[int, ...]:
    """One scan; each run carries the true unchanged mask (or all True with ``lie``)."""
    e.begin_scan({s: [Region("ram", len(p) * PAGE_SIZE)] for s, p in world.items()})
    for s, pages in world.items():
        for i in range(0, len(pages), 3):
            chunk = pages[i:i + 3]
            mask = np.array([lie or (prev is not None and prev[s][i + k] == b)
                             for k, b in enumerate(chunk)], dtype=np.bool_)
            e.feed(PageRun(s, "ram", i, memoryview(bytearray(b"".join(chunk)))), mask)
    return e.end_scan().counters.merge_state()


@pytest.mark.parametrize("seed", range(8))
def test_unchanged_masks_give_the_same_result_as_hashing(seed: int) -> None:
    rng = random.Random(seed)
    cfg = EngineConfig(max_page_sharing=3, use_zero_pages=seed % 2 == 1)
    plain, inc = KsmEngine(cfg), KsmEngine(cfg)
    world = {s: [rng.choice([Z, pg(1), pg(2), pg(rng.randrange(9))]) for _ in range(10)]
             for s in ("a", "b", "c")}
    prev = None
    for _ in range(6):
        e1 = scan(plain, world, None)
        e2 = scan(inc, world, prev)
        assert e1 == e2
        assert plain.per_source() == inc.per_source()
        prev = {s: list(p) for s, p in world.items()}
        for s in world:                      # rewrite a few pages
            for _ in range(rng.randrange(4)):
                world[s][rng.randrange(10)] = rng.choice([Z, pg(1), pg(rng.randrange(9))])


def test_unchanged_without_a_checksum_is_hashed() -> None:
    """A claim of 'unchanged' for a page the engine never saw cannot skip hashing."""
    world = {"a": [pg(1), pg(1)], "b": [pg(1), pg(2)]}
    e, plain = KsmEngine(), KsmEngine()
    assert scan(e, world, None, lie=True) == scan(plain, world, None)
    assert scan(e, world, None, lie=True) == scan(plain, world, None) == (1, 2, 1, 0, 0, 0, 0)


def test_unchanged_mask_of_wrong_length_is_refused() -> None:
    from vmshare.errors import UsageError
    e = KsmEngine()
    e.begin_scan({"a": [Region("ram", 2 * PAGE_SIZE)]})
    with pytest.raises(UsageError):
        e.feed(PageRun("a", "ram", 0, memoryview(bytearray(2 * PAGE_SIZE))),
               np.ones(1, dtype=np.bool_))


CHILD = r"""
import mmap, sys, struct, ctypes
m = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(16):
    m[i * 4096:(i + 1) * 4096] = struct.pack("<QQ", 0xFEED, i) * 256
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
for line in sys.stdin:
    i, v = map(int, line.split())
    m[i * 4096:i * 4096 + 8] = struct.pack("<Q", v)
    print("ok", flush=True)
"""


@pytest.fixture
def writer() -> Iterator[tuple[subprocess.Popen[str], int]]:
    with mapping_process(CHILD) as pa:
        yield pa


def collect(src: LiveProcessSource) -> tuple[dict[int, bytes], dict[int, bool]]:
    data, unchanged = {}, {}
    for run in src.runs(4):
        assert isinstance(run, TrackedPageRun) and run.pagemap.shape == (run.npages,)
        for k in range(run.npages):
            data[run.first_page + k] = bytes(run.data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
            unchanged[run.first_page + k] = bool(run.unchanged[k])
    return data, unchanged


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
def test_soft_dirty_mirror_rereads_only_written_pages(
        writer: tuple[subprocess.Popen[str], int]) -> None:
    proc, addr = writer
    assert proc.stdin is not None and proc.stdout is not None
    vma = Vma(addr, addr + 16 * PAGE_SIZE, "rw-p", 0, "")
    mirror = SoftDirtyMirror()

    def one_scan() -> tuple[dict[int, bytes], dict[int, bool]]:
        with LiveProcessSource(proc.pid, [vma], mirror=mirror) as src:
            return collect(src)

    data, unchanged = one_scan()
    if not mirror.supported:
        pytest.skip("kernel without CONFIG_MEM_SOFT_DIRTY: pagemap bit 55 never set")
    expect = {i: struct.pack("<QQ", 0xFEED, i) * 256 for i in range(16)}
    assert data == expect and not any(unchanged.values())
    assert mirror.pages_read == 16
    data, unchanged = one_scan()
    assert data == expect and all(unchanged.values()) and mirror.pages_read == 0
    proc.stdin.write("5 12345\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ok"
    data, unchanged = one_scan()
    expect[5] = struct.pack("<Q", 12345) + expect[5][8:]
    assert data == expect
    assert [i for i, u in unchanged.items() if not u] == [5] and mirror.pages_read == 1
