"""The streaming scan (vmshare.prediction.scanning): sources many times larger
than the read buffer give the reference's counters, and a source that shrinks
or vanishes mid-scan ends it with a clear error and the last scan's counters."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dump_corpus import ElfSpec, KdumpSpec, Seg, build_elf, build_kdump
from tests.engine_reference import ReferenceKsm
from tests.sketch_mixes import GeneratedSource, content_ids, exact_sharing, page_bytes, write_vms
from tests.test_engine import as_dict, xxh
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.errors import DumpError, ProcessGone
from vmshare.model import PAGE_SIZE, Region, Vma
from vmshare.prediction.scanning import MIN_BUFFER_BYTES, scan_sources
from vmshare.sources import LiveProcessSource, PageSource, open_dump
from vmshare.sources.base import pread_pages

Z = bytes(PAGE_SIZE)


def mix(rng: random.Random, n: int, templates: int = 40) -> list[bytes]:
    """Pages: copies of a few templates, unique pages and zero pages, shuffled."""
    out = []
    for i in range(n):
        r = rng.random()
        tag = rng.randrange(templates) if r < 0.4 else 10_000 + i
        out.append(Z if r > 0.9 else tag.to_bytes(8, "little") * (PAGE_SIZE // 8))
    return out


def write_dump(tmp_path: Path, kind: str, pages: list[bytes]) -> tuple[str, dict[str, bytes]]:
    """A dump of ``pages`` (ELF: two segments with a gap and a partial last page);
    returns its path and its content by region key."""
    path = tmp_path / f"d.{kind}"
    if kind == "raw":
        path.write_bytes(b"".join(pages))
        return str(path), {"gpa@0x0": b"".join(pages)}
    if kind == "kdump":
        path.write_bytes(build_kdump(KdumpSpec(dict(enumerate(pages)), len(pages))))
        return str(path), {"gpa@0x0": b"".join(pages)}
    half = len(pages) // 2
    second = b"".join(pages[half:])[:-100]                  # a partial last page
    gap = (half + 8) * PAGE_SIZE
    path.write_bytes(build_elf(ElfSpec([Seg(0, b"".join(pages[:half])), Seg(gap, second)])))
    return str(path), {"gpa@0x0": b"".join(pages[:half]),
                       f"gpa@{gap:#x}": second + bytes(100)}


def reference(content: dict[str, bytes], name: str, scans: int,
              cfg: EngineConfig) -> dict[str, int]:
    ref = ReferenceKsm(max_page_sharing=cfg.max_page_sharing,
                       use_zero_pages=cfg.use_zero_pages, hasher=xxh)
    regions = {name: [Region(k, len(b)) for k, b in content.items()]}
    pages = {(name, k, i): b[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
             for k, b in content.items() for i in range(len(b) // PAGE_SIZE)}
    out: dict[str, int] = {}
    for _ in range(scans):
        out = ref.scan(regions, pages)
    return out


@pytest.mark.parametrize("kind", ["raw", "elf", "kdump"])
def test_a_source_many_times_the_buffer_gives_the_reference_counters(
        tmp_path: Path, kind: str) -> None:
    """3,000 pages (11.7 MiB) through the smallest ring (512 KiB: 23 times less),
    three scans: every counter as the naive reference's, which keeps every page."""
    pages = mix(random.Random(kind), 3000)
    path, content = write_dump(tmp_path, kind, pages)
    cfg = EngineConfig(max_page_sharing=8, use_zero_pages=kind == "elf")
    engine = KsmEngine(cfg)
    for _ in range(3):
        with open_dump(path, "d") as src:
            stats = scan_sources(engine, [src], buffer_bytes=MIN_BUFFER_BYTES)
    assert stats.pages_fed == len(pages)
    got = as_dict(engine.counters())
    assert got == reference(content, "d", 3, cfg)
    assert got["pages_sharing"] > 1000 and got["stable_node_chains"] > 0


def truncate_at(path: str, when: float) -> Callable[[float], None]:
    """A progress callback that truncates ``path`` to one page once the scan
    has read ``when`` of its pages."""
    def cb(frac: float) -> None:
        if frac >= when and os.path.getsize(path) > PAGE_SIZE:
            os.truncate(path, PAGE_SIZE)
    return cb


@pytest.mark.parametrize("when", [0.1, 1.0])   # while reading; after, before comparing
def test_a_dump_truncated_mid_scan_ends_it_with_the_last_counters(
        tmp_path: Path, when: float) -> None:
    """Truncated while the scan reads, or after (when it reads again the pages
    it compares): one DumpError naming the file, the counters of the scan
    before, and the engine usable again (starting from nothing)."""
    pages = mix(random.Random(3), 600)
    path, _ = write_dump(tmp_path, "raw", pages)
    engine = KsmEngine()
    with open_dump(path, "d") as src:
        scan_sources(engine, [src], buffer_bytes=MIN_BUFFER_BYTES)
    before = engine.counters()          # scan 2 would merge: it compares pages
    assert before.pages_volatile == len(pages)
    with open_dump(path, "d") as src, \
            pytest.raises(DumpError, match=rf"{path}: .*(truncated|past the end)"):
        scan_sources(engine, [src], buffer_bytes=MIN_BUFFER_BYTES,
                     progress=truncate_at(path, when))
    assert engine.counters() == before
    with open_dump(path, "d") as src:           # the engine is usable again, from nothing
        scan_sources(engine, [src])
    assert engine.counters().full_scans == before.full_scans + 1
    assert engine.counters().pages_sharing == 0 and engine.counters().pages_volatile == 1


CHILD = r"""
import mmap, sys, ctypes
m = mmap.mmap(-1, 2048 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(2048):
    m[i * 4096:i * 4096 + 8] = (i % 300).to_bytes(8, "little")
print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
@pytest.mark.parametrize("when", [0.2, 1.0])
def test_a_process_that_exits_mid_scan_ends_it_with_the_last_counters(when: float) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        addr = int(child.stdout.readline(), 16)
        vma = Vma(addr, addr + 2048 * PAGE_SIZE, "rw-p", 0, "")
        engine = KsmEngine()

        def source() -> PageSource:
            return LiveProcessSource(child.pid, [vma], "p")
        with source() as src:
            scan_sources(engine, [src], buffer_bytes=MIN_BUFFER_BYTES)
        before = engine.counters()          # scan 2 would merge: it compares pages
        assert before.pages_volatile == 2048

        def kill(frac: float) -> None:
            if frac >= when and child.poll() is None:
                child.kill()
                child.wait()
        with source() as src, pytest.raises(ProcessGone, match=f"process {child.pid} is gone"):
            scan_sources(engine, [src], buffer_bytes=MIN_BUFFER_BYTES, progress=kill)
        assert engine.counters() == before
    finally:
        child.kill()
        child.wait()


def test_a_generated_source_scans_as_its_raw_image(tmp_path: Path) -> None:
    """The sketch tests' GeneratedSource keeps the PageSource contract (its runs
    made where ``read_into`` says, pages made again by ``read_pages``): scan by
    scan, the counters of the raw image of the same pages."""
    ids = content_ids(np.random.default_rng(1), [(300, 2), (50, 7)], zero=20)
    (path,) = write_vms(tmp_path, ids, 1)
    generated, from_file = KsmEngine(), KsmEngine()
    for _ in range(2):
        scan_sources(generated, [GeneratedSource("g", ids)], buffer_bytes=MIN_BUFFER_BYTES)
        with open_dump(path, "g") as src:
            scan_sources(from_file, [src], buffer_bytes=MIN_BUFFER_BYTES)
        assert generated.counters() == from_file.counters()
    assert generated.counters().pages_sharing == exact_sharing([ids])[0]   # merged on scan 2
    gen, buf = GeneratedSource("g", ids), bytearray(5 * PAGE_SIZE)
    gen.read_into = lambda n: memoryview(buf)[:n]
    run = next(gen.runs(chunk_pages=5))
    assert run.data.obj is buf and bytes(buf) == page_bytes(ids[:5])
    again = np.array([3, 7, 8], np.int64)
    gen.read_pages("ram", again, memoryview(buf))
    assert bytes(buf[:3 * PAGE_SIZE]) == page_bytes(ids[again])


def test_the_buffer_bounds_are_checked(tmp_path: Path) -> None:
    from vmshare.errors import UsageError
    path, _ = write_dump(tmp_path, "raw", [Z])
    with open_dump(path, "d") as src, pytest.raises(UsageError, match="at least 512 KiB"):
        scan_sources(KsmEngine(), [src], buffer_bytes=MIN_BUFFER_BYTES - 1)
    with open_dump(path, "d") as src, pytest.raises(UsageError, match="verify mode"):
        scan_sources(KsmEngine(verify_merged=True), [src])


@st.composite
def page_mixes(draw: st.DrawFn) -> tuple[int, bool, list[list[bytes]]]:
    """Scans of one dump: pages from a small alphabet, zero and unique pages,
    some rewritten between scans."""
    n = draw(st.integers(1, 120))
    alphabet = [Z] + [t.to_bytes(8, "little") * (PAGE_SIZE // 8) for t in range(1, 6)]
    unique = st.integers(100, 10**6).map(lambda t: t.to_bytes(8, "little") * (PAGE_SIZE // 8))
    page = st.one_of(st.sampled_from(alphabet), unique)
    pages = [draw(page) for _ in range(n)]
    scans = []
    for _ in range(draw(st.integers(1, 4))):
        scans.append(list(pages))
        for _ in range(draw(st.integers(0, 5))):
            pages[draw(st.integers(0, n - 1))] = draw(page)
    return draw(st.integers(2, 5)), draw(st.booleans()), scans


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_mixes())
def test_several_readers_give_the_single_reader_and_reference_counters(
        tmp_path: Path, h: tuple[int, bool, list[list[bytes]]]) -> None:
    """The page range split over 1, 2 and 4 reader threads (16-page chunks,
    interleaved), the pages to compare read again by as many: every scan's
    counters equal the naive reference's."""
    mps, uzp, scans = h
    cfg = EngineConfig(max_page_sharing=mps, use_zero_pages=uzp)
    engines = {w: KsmEngine(cfg) for w in (1, 2, 4)}
    ref = ReferenceKsm(max_page_sharing=mps, use_zero_pages=uzp, hasher=xxh)
    path = tmp_path / "mix.raw"
    path.write_bytes(b"".join(scans[0]))
    first = os.stat(path)
    for pages in scans:
        with open(path, "r+b") as f:           # rewritten in place, same generation:
            f.write(b"".join(pages))           # the engine keeps what it knew
        os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))
        with open_dump(path, "d") as src:
            regions = src.regions()
        want = ref.scan({"d": regions}, {("d", "gpa@0x0", i): b for i, b in enumerate(pages)})
        for w, engine in engines.items():
            with open_dump(path, "d") as src:
                scan_sources(engine, [src], buffer_bytes=MIN_BUFFER_BYTES, workers=w)
            assert as_dict(engine.counters()) == want, f"{w} readers"



@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.integers(0, 309), min_size=1, max_size=120))
def test_pread_pages_reads_each_page_and_hands_failures_to_the_slow_path(
        tmp_path: Path, wanted: set[int]) -> None:
    """Scattered pages of a 300-page file read in C; a stretch reaching past the
    end (pages 300-309) fails there and goes to the slow path, whose answer
    (here: zeros) is kept."""
    path = tmp_path / "f"
    if not path.exists():
        path.write_bytes(b"".join(i.to_bytes(8, "little") * (PAGE_SIZE // 8)
                                  for i in range(300)))
    pages = np.array(sorted(wanted), dtype=np.int64)
    into = memoryview(bytearray(pages.size * PAGE_SIZE))
    slow: list[int] = []

    def fallback(view: memoryview, offset: int) -> None:
        slow.append(offset // PAGE_SIZE)
        view[:] = bytes(len(view))
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_pages(fd, 0, pages, into, fallback)
    finally:
        os.close(fd)
    got = np.frombuffer(into, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)[:, 0]
    beyond = [int(p) for p in pages if p >= 300]
    assert got.tolist() == [0 if p in beyond or any(
        s <= p and all(q in wanted for q in range(s, p + 1)) and s in slow for s in slow)
        else p for p in pages.tolist()]
    assert bool(slow) == bool(beyond)
