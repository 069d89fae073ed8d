"""predict.py over synthetic dumps and a real child process (no root, no KSM)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dump_corpus import (
    ElfSpec,
    KdumpSpec,
    Seg,
    build_elf,
    build_kdump,
    noise_page,
    page,
)
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.errors import DumpError, ProcessGone, UsageError
from vmshare.ksm.procfs import ProcFs
from vmshare.model import PAGE_SIZE, Vma
from vmshare.prediction.predict import LiveScanner, dump_target, pid_target, predict
from vmshare.present.progress import ProgressBar
from vmshare.sources import LiveProcessSource
from vmshare.sources.visible import zero_rows

Z = bytes(PAGE_SIZE)


def write_elf(path: Path, pages: list[bytes]) -> str:
    path.write_bytes(build_elf(ElfSpec([Seg(0, b"".join(pages))])))
    return str(path)


def test_two_dumps_exact_counts(tmp_path: Path) -> None:
    # a: 10 copies of page(1), 5 unique, 3 zero; b: 2 copies of page(1), page(2) twice.
    a = write_elf(tmp_path / "a.elf", [page(1)] * 10 + [noise_page(i) for i in range(5)]
                  + [Z] * 3)
    b = write_elf(tmp_path / "b.elf", [page(1)] * 2 + [page(2)] * 2)
    r = predict([dump_target(a), dump_target(b)], EngineConfig(max_page_sharing=4))
    (g,) = r.groups
    assert g.converged and g.scans == 2      # settled after the merging scan
    settled = predict([dump_target(a), dump_target(b)], EngineConfig(max_page_sharing=4),
                      settle=True)
    assert settled.groups[0].scans == 2       # no confirmation scan, the same answer
    assert settled.groups[0].counters.merge_state() == g.counters.merge_state()
    c = g.counters
    # page(1): 12 copies, max 4 -> 3 full dups; page(2): 1 node of 2; zero: 1 node of 3.
    assert (c.pages_shared, c.pages_sharing) == (5, 9 + 1 + 2)
    assert (c.stable_node_chains, c.stable_node_dups) == (1, 3)
    assert c.pages_unshared == 5
    src = {s.name: s for s in g.sources}
    assert src[a].pages == 18 and src[a].zero_content_pages == 3
    assert src[b].ksm_pages == 4
    assert sum(s.saved for s in g.sources) == c.pages_sharing      # fair share adds up
    assert src[a].shares_with[b] > 0 and src[b].shares_with[a] > 0
    assert r.totals()["pages_sharing"] == c.pages_sharing


def test_use_zero_pages_and_kdump(tmp_path: Path) -> None:
    kd = tmp_path / "k.kdump"
    kd.write_bytes(build_kdump(KdumpSpec({0: page(1), 1: page(1), 2: Z, 3: Z, 9: Z}, 16)))
    r = predict([dump_target(str(kd))], EngineConfig(use_zero_pages=True))
    (g,) = r.groups
    assert g.counters.ksm_zero_pages == 3
    assert g.counters.pages_sharing == 1
    assert g.sources[0].zero_pages == 3


def test_trust_groups_do_not_share(tmp_path: Path) -> None:
    a = write_elf(tmp_path / "a.elf", [page(1)] * 2)
    b = write_elf(tmp_path / "b.elf", [page(1)] * 2)
    targets = [dump_target(a), dump_target(b)]
    together = predict(targets, EngineConfig())
    apart = predict(targets, EngineConfig(), groups={a: "red", b: "blue"})
    assert together.totals()["pages_sharing"] == 3
    assert [g.group for g in apart.groups] == ["blue", "red"]
    assert apart.totals()["pages_sharing"] == 2
    assert all(not s.shares_with for g in apart.groups for s in g.sources)


def test_fixed_scan_count(tmp_path: Path) -> None:
    a = write_elf(tmp_path / "a.elf", [page(1)] * 2)
    r = predict([dump_target(a)], EngineConfig(), scans=1)
    assert r.groups[0].scans == 1 and not r.groups[0].converged
    assert r.groups[0].counters.pages_volatile == 2
    with pytest.raises(UsageError):
        predict([], EngineConfig())


def test_bad_dumps(tmp_path: Path) -> None:
    with pytest.raises(DumpError, match="cannot open"):
        dump_target(str(tmp_path / "missing"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 2000)
    with pytest.raises(DumpError, match="neither an ELF core nor a kdump"):
        dump_target(str(junk))
    assert dump_target(str(junk), raw=True).kind == "dump"
    a = write_elf(tmp_path / "a.elf", [page(1)])
    with pytest.raises(UsageError, match="listed twice"):
        predict([dump_target(a), dump_target(a)], EngineConfig())


def test_zero_rows() -> None:
    middle = bytearray(PAGE_SIZE)
    middle[PAGE_SIZE // 2] = 1           # passes the first/last-word filter
    data = bytearray(b"".join([Z, page(3), Z, Z, bytes(PAGE_SIZE - 1) + b"\1", Z,
                               bytes(middle), Z]))
    assert zero_rows(memoryview(data)).tolist() == [0, 2, 3, 5, 7]
    assert zero_rows(memoryview(bytearray(page(1)))).tolist() == []


CHILD = """
import mmap, sys
m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(64):
    m[i * 4096:(i + 1) * 4096] = bytes([7]) * 4096
print("ready", flush=True)
sys.stdin.read()
"""


def test_pid_target_reads_private_anonymous_memory() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        t = pid_target(child.pid)
        r = predict([t], EngineConfig())
        (s,) = r.groups[0].sources
        assert s.name == f"pid:{child.pid}" and s.kind == "pid"
        assert s.pages >= 64
        assert r.groups[0].counters.pages_sharing >= 63      # 64 copies of one page
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ProcessGone, match=f"no running process with pid {child.pid}"):
        pid_target(child.pid)
    with pytest.raises(UsageError):
        pid_target(0)


def test_live_scanner_is_incremental(tmp_path: Path) -> None:
    a = write_elf(tmp_path / "a.elf", [page(1)] * 4)
    scanner = LiveScanner([dump_target(a)], EngineConfig())
    first, second = scanner.scan(), scanner.scan()
    assert first.counters.pages_volatile == 4 and first.counters.pages_sharing == 0
    assert second.counters.pages_sharing == 3 and second.index == 2


def test_progress_bar_only_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = io.StringIO()
    with ProgressBar(quiet) as bar:
        bar.update(0.5, "scan 1/5")
    assert quiet.getvalue() == ""
    tty = Tty()
    with ProgressBar(tty) as bar:
        bar.update(0.5, "scan 1/5")
    assert "scan 1/5 [" in tty.getvalue() and "50%" in tty.getvalue()
    assert tty.getvalue().endswith("\r")         # cleared at the end
    off = Tty()
    with ProgressBar(off, enabled=False) as bar:
        bar.update(1.0, "x")
    assert off.getvalue() == ""


def test_engine_left_mid_scan_is_replaced(tmp_path: Path) -> None:
    kd = tmp_path / "k.kdump"
    pages = {0: page(1), 1: page(1), 2: page(2)}
    kd.write_bytes(build_kdump(KdumpSpec(pages, 16)))
    scanner = LiveScanner([dump_target(str(kd))], EngineConfig())
    scanner.scan()
    old = scanner.engine
    # Headers still valid, page data corrupt: fails while streaming, mid-scan.
    kd.write_bytes(build_kdump(KdumpSpec(pages, 16,
                                         data_override={0: b"\x78\x01not-deflate"})))
    with pytest.raises(DumpError, match="corrupt"):
        scanner.scan()
    assert scanner.engine is not old and isinstance(scanner.engine, KsmEngine)
    kd.write_bytes(build_kdump(KdumpSpec(pages, 16)))
    assert scanner.scan().counters.pages_volatile == 3     # a fresh engine's first scan


def test_kernel_visible_pages_drop_zero_page_and_thp_zero_subpages(tmp_path: Path) -> None:
    """All-zero pages mapped to the zero page, or inside a THP (which KSM's split
    turns into zero-page mappings), are not fed; other pages, zero or not, are."""
    from types import SimpleNamespace

    import numpy as np

    from tests.ksmtree import KPF_ZERO, PRESENT, FakeProc
    from vmshare.model import Region, Vma
    from vmshare.sources.live import LivePageRun
    from vmshare.sources.visible import KernelVisiblePages

    fake = FakeProc(tmp_path)
    kpf_thp = 1 << 22
    fake.flags[10] = KPF_ZERO            # page 0: the shared zero page
    fake.flags[11] = kpf_thp             # page 1: zero content inside a THP
    fake.flags[12] = 0                   # page 2: zero content, plain 4K page
    fake.flags[13] = kpf_thp             # page 3: data inside a THP
    fake.flush()
    # no pagemap file in the tree: the PFNs come with the run (read once, by the live source)
    entries = np.array([PRESENT | pfn for pfn in (10, 11, 12, 13)], dtype=np.uint64)
    data = bytearray(4 * 4096)
    data[3 * 4096] = 1
    region = Region("pc.ram", 4 * 4096, "g")
    inner = SimpleNamespace(
        name="vm", regions=lambda: [region], vmas=[Vma(0x10000000, 0x10004000, "rw-p", 0, "")],
        runs=lambda chunk_pages=4096, part=(0, 1): iter(
            [LivePageRun("vm", "pc.ram", 0, memoryview(data), entries)]),
        close=lambda: None)
    src = KernelVisiblePages(inner, ProcFs(tmp_path))  # type: ignore[arg-type]
    fed = [(r.first_page, r.npages, r.pagemap.tolist(), r.zero_pages) for r in src.runs()]
    assert fed == [(2, 2, entries[2:].tolist(), 1)]      # page 2 is zero and fed
    assert src.thp_zero_pages == 1
    dumplike = KernelVisiblePages(inner, ProcFs(tmp_path), thp_split=False)  # type: ignore[arg-type]
    assert [(r.first_page, r.npages, r.zero_pages) for r in dumplike.runs()] == [(1, 3, 2)]
    assert dumplike.thp_zero_pages == 0
    # two readers' shares, the second started first and the first finishing last
    # (a share clearing the others' counts failed this way on real guests)
    both = KernelVisiblePages(inner, ProcFs(tmp_path))  # type: ignore[arg-type]
    second = both.runs(part=(1, 2))
    next(second)
    first = list(both.runs(part=(0, 2)))
    list(second)
    assert len(first) == 1 and both.thp_zero_pages == 2       # each share saw page 1


RESIDENT_CHILD = """
import mmap, sys
m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 64, 4):
    m[i * 4096] = 1                                  # 16 of 64 pages touched
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print("ready", hex(addr), flush=True)
sys.stdin.read()
"""


def test_live_source_counts_resident_pages_only() -> None:
    child = subprocess.Popen([sys.executable, "-c", RESIDENT_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        word, addr = child.stdout.readline().split()
        assert word == "ready"
        start = int(addr, 16)
        vma = Vma(start, start + 64 * PAGE_SIZE, "rw-p", 0, "")
        with LiveProcessSource(child.pid, [vma]) as src:
            assert src.resident_bytes() == 16 * PAGE_SIZE
            assert sum(r.npages for r in src.runs()) == 16
    finally:
        child.kill()
        child.wait()


PRIVATE_FILE_CHILD = """
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 16 * 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
for i in range(16):
    if i % 2:
        m[i * 4096] = 9                          # written: a private anonymous copy
    else:
        _ = m[i * 4096]                          # only read: the page cache's page
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print("ready", hex(addr), flush=True)
sys.stdin.read()
"""


def test_live_source_reads_only_written_pages_of_a_private_file_mapping(
        tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes([3]) * 16 * PAGE_SIZE)
    child = subprocess.Popen([sys.executable, "-c", PRIVATE_FILE_CHILD, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        word, addr = child.stdout.readline().split()
        assert word == "ready"
        start = int(addr, 16)
        vma = Vma(start, start + 16 * PAGE_SIZE, "rw-p", 0, str(path))
        with LiveProcessSource(child.pid, [vma]) as src:
            runs = list(src.runs())
            assert [r.first_page for r in runs] == list(range(1, 16, 2))
            assert all(bytes(r.data)[0] == 9 for r in runs)
            assert src.resident_bytes() == 8 * PAGE_SIZE
    finally:
        child.kill()
        child.wait()
