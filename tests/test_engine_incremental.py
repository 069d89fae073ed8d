"""Incremental rescans (the engine's ``unchanged`` masks), and a live page
rewritten by a real process between its hash and its comparison."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from tests.dump_corpus import mapping_process
from tests.test_engine import Z, pg
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.model import PAGE_SIZE, PageRun, Region, Vma
from vmshare.prediction.scanning import source_fetch
from vmshare.sources.live import LiveProcessSource


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
for i in range(16):      # pages 0-7 identical, 8-15 unique
    m[i * 4096:(i + 1) * 4096] = struct.pack("<QQ", 0xFEED, max(i, 7)) * 256
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


def rewrite(proc: subprocess.Popen[str], page: int, value: int) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{page} {value}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
def test_a_page_rewritten_between_hash_and_comparison_is_compared_by_its_new_bytes(
        writer: tuple[subprocess.Popen[str], int]) -> None:
    """Scan 2 hashes the process's pages (none kept), then the helper rewrites
    page 3 before the engine reads the pages it compares again: page 3 is
    compared by its new bytes, never merges with the other seven of pages
    0-7 (its checksum still says it equals them), and those seven merge."""
    proc, addr = writer
    vma = Vma(addr, addr + 16 * PAGE_SIZE, "rw-p", 0, "")
    engine = KsmEngine()
    for scan_no in range(2):
        with LiveProcessSource(proc.pid, [vma], "p") as src:
            engine.begin_scan({"p": src.regions()})
            for run in src.runs(4):
                engine.feed(run, retain=False)
            if scan_no == 1:           # hashed, not yet compared
                rewrite(proc, 3, 0xBAD)
            c = engine.end_scan(source_fetch([src], {("p", src.regions()[0].key): 0}))
    counters = c.counters
    assert (counters.pages_shared, counters.pages_sharing) == (1, 6)
    assert counters.pages_unshared + counters.pages_volatile == 9
