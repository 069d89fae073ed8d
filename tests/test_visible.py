"""KernelVisiblePages' zero-page look-ups (sources/visible.py): the zero page and
the huge zero page told by PFN, /proc/kpageflags asked only in mappings that
may hold THPs, always with the answer of looking every all-zero page up.

On a fake kpageflags with known facts (property-tested against the look-up of
every page), and on a real child process: read-faulted (zero page) and written
all-zero pages, and an MADV_HUGEPAGE area holding the huge zero page and a THP
with all-zero subpages, checked against kpageflags itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dump_corpus import mapping_process
from tests.ksmtree import KPF_ZERO, PRESENT, FakeProc
from vmshare.ksm.procfs import KPF_THP, PM_PFN_MASK, ProcFs
from vmshare.model import PAGE_SIZE, Region, Vma
from vmshare.prediction.sketch import streamed_values
from vmshare.records.sketchfile import SketchKey
from vmshare.sources.live import LivePageRun, LiveProcessSource
from vmshare.sources.visible import KernelVisiblePages, zero_rows

THP = 1 << KPF_THP
ZERO_PFN, HUGE_PFN = 10, 512          # the fake's zero page and huge zero page
THP_PFNS, PLAIN_PFNS = (1024, 2048), (2048, 4096)
KINDS = ("zero_page", "huge_zero", "written_zero", "thp_zero", "data")


class KnownZero(ProcFs):
    """A fake /proc whose zero and huge zero pages are known, recording every
    PFN asked of kpageflags."""

    def __init__(self, root: Path, zero: int | None = ZERO_PFN,
                 huge: int | None = HUGE_PFN) -> None:
        super().__init__(root)
        self.zero, self.huge = zero, huge
        self.asked: list[int] = []

    def zero_pfn(self) -> int | None:
        return self.zero

    def huge_zero_pfn(self) -> int | None:
        return self.huge

    def kpageflags(self, pfns: np.ndarray) -> np.ndarray:
        self.asked += pfns.tolist()
        return super().kpageflags(pfns)


def fake_tree(root: Path) -> FakeProc:
    fake = FakeProc(root)
    fake.flags[ZERO_PFN] = KPF_ZERO
    fake.flags[HUGE_PFN:HUGE_PFN + 512] = KPF_ZERO | THP
    fake.flags[THP_PFNS[0]:THP_PFNS[1]] = THP
    fake.flush()
    return fake


@dataclass
class FakeLive:
    """The parts of a LiveProcessSource KernelVisiblePages uses: one run per
    mapping, its pages' bytes and pagemap entries given."""

    vmas: list[Vma]
    data: list[bytearray]
    entries: list[np.ndarray]
    name: str = "vm"
    read_into: None = field(default=None)

    def regions(self) -> list[Region]:
        return [Region(f"vma@{v.start:#x}", v.size, "g") for v in self.vmas]

    def runs(self, chunk_pages: int = 4096, part: tuple[int, int] = (0, 1)
             ) -> Iterator[LivePageRun]:
        for v, data, entries in zip(self.vmas, self.data, self.entries, strict=True):
            yield LivePageRun(self.name, f"vma@{v.start:#x}", 0, memoryview(data), entries)


def page_of(kind: str, vpage: int, n: int) -> tuple[int, bool]:
    """(PFN, all zero) for a page of ``kind`` at virtual page ``vpage`` (the
    n-th of its kind)."""
    if kind == "zero_page":
        return ZERO_PFN, True
    if kind == "huge_zero":                  # PMD-mapped: the same offset in 2 MiB
        return HUGE_PFN + vpage % 512, True
    if kind == "thp_zero":
        return THP_PFNS[0] + n % 1024, True
    return PLAIN_PFNS[0] + n % 2048, kind == "written_zero"


def fake_live(kinds: list[list[str]], thp_ok: list[bool]) -> FakeLive:
    vmas, datas, entries = [], [], []
    for k, (pages, ok) in enumerate(zip(kinds, thp_ok, strict=True)):
        start = (1 << 30) + k * (64 << 20) + 3 * PAGE_SIZE
        vmas.append(Vma(start, start + len(pages) * PAGE_SIZE, "rw-p", 0, "",
                        thp_eligible=ok))
        data = bytearray(len(pages) * PAGE_SIZE)
        pm = []
        for i, kind in enumerate(pages):
            pfn, zero = page_of(kind, start // PAGE_SIZE + i, i)
            if not zero:
                data[i * PAGE_SIZE + 5] = 1
            pm.append(PRESENT | pfn)
        datas.append(data)
        entries.append(np.array(pm, dtype=np.uint64))
    return FakeLive(vmas, datas, entries)


def fed(src: KernelVisiblePages) -> tuple[list[tuple[str, int, int, int | None]], int]:
    runs = [(r.region, r.first_page, r.npages, r.zero_pages) for r in src.runs()]
    return runs, src.thp_zero_pages


def pages_fed(src: KernelVisiblePages, masked: bool) -> tuple[list[tuple[str, int]], int, int]:
    """Every page fed (region, page), the all-zero pages among them and the THP
    zero subpages: from ``runs`` (cut at dropped pages) or ``masked_runs``
    (whole, with the mask of the pages kept)."""
    out: list[tuple[str, int]] = []
    zero = 0
    pairs = src.masked_runs() if masked else ((r, None) for r in src.runs())
    for r, present in pairs:
        idx = range(r.npages) if present is None else np.flatnonzero(present).tolist()
        out += [(r.region, r.first_page + i) for i in idx]
        zero += r.zero_pages or 0
    return out, zero, src.thp_zero_pages


def one_mapping(root: Path, kinds: list[str], thp_ok: bool, huge: int | None = HUGE_PFN
                ) -> tuple[list[tuple[int, int, int | None]], int, list[int], int]:
    """Pages of ``kinds`` in one mapping through KernelVisiblePages: the runs fed
    (first page, pages, zero pages), THP zero subpages, PFNs asked of
    kpageflags (sorted) and the mapping's first virtual page."""
    fake_tree(root)
    live = fake_live([kinds], [thp_ok])
    procfs = KnownZero(root, huge=huge)
    runs, thp = fed(KernelVisiblePages(live, procfs))  # type: ignore[arg-type]
    return ([(f, n, z) for _, f, n, z in runs], thp, sorted(procfs.asked),
            live.vmas[0].start // PAGE_SIZE)


def test_zero_pages_known_by_pfn_are_never_looked_up(tmp_path: Path) -> None:
    kinds = ["zero_page", "huge_zero", "written_zero", "data", "zero_page"]
    runs, thp, asked, _ = one_mapping(tmp_path, kinds, thp_ok=False)
    assert runs == [(2, 2, 1)] and thp == 0            # the written zero page is fed
    assert asked == []                                 # no THP possible: nothing asked


def test_a_mapping_that_may_hold_thps_asks_only_for_other_zero_pages(
        tmp_path: Path) -> None:
    kinds = ["zero_page", "thp_zero", "written_zero", "huge_zero", "data"]
    runs, thp, asked, _ = one_mapping(tmp_path, kinds, thp_ok=True)
    assert runs == [(2, 1, 1), (4, 1, 0)] and thp == 1
    assert asked == [THP_PFNS[0] + 1, PLAIN_PFNS[0] + 2]


def test_an_unknown_huge_zero_page_is_asked_only_where_it_could_be(tmp_path: Path) -> None:
    """Without the huge zero page's PFN, only all-zero pages whose PFN sits at
    their address's offset in 2 MiB are asked (a PMD mapping's pages do)."""
    kinds = ["huge_zero", "written_zero", "huge_zero", "zero_page"]
    runs, _, asked, vpage0 = one_mapping(tmp_path, kinds, thp_ok=False, huge=None)
    assert [(first, n) for first, n, _ in runs] == [(1, 1)]
    assert asked == [HUGE_PFN + vpage0 % 512, HUGE_PFN + (vpage0 + 2) % 512]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(KINDS), min_size=1, max_size=40),
                min_size=1, max_size=3),
       st.lists(st.booleans(), min_size=3, max_size=3),
       st.sampled_from([(ZERO_PFN, HUGE_PFN), (ZERO_PFN, None), (None, None)]),
       st.booleans())
def test_the_answer_is_that_of_looking_every_zero_page_up(
        kinds: list[list[str]], thp_ok: list[bool], known: tuple[int | None, int | None],
        thp_split: bool) -> None:
    """Any mix of pages, where THPs sit only in mappings that may hold them:
    the same runs, zero counts and THP zero subpages as kpageflags for all."""
    thp_ok = thp_ok[:len(kinds)]
    kinds = [[k if ok or k != "thp_zero" else "written_zero" for k in pages]
             for pages, ok in zip(kinds, thp_ok, strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        fake_tree(Path(tmp))
        live = fake_live(kinds, thp_ok)
        got = fed(KernelVisiblePages(live, KnownZero(Path(tmp), *known),  # type: ignore[arg-type]
                                     thp_split=thp_split))
        every = fed(KernelVisiblePages(live, KnownZero(Path(tmp), None, None),  # type: ignore[arg-type]
                                       thp_split=thp_split))
        both = [pages_fed(KernelVisiblePages(live, KnownZero(Path(tmp), *known),  # type: ignore[arg-type]
                                             thp_split=thp_split), masked)
                for masked in (False, True)]
    assert got == every
    assert both[0] == both[1]       # masked runs feed exactly the pages of the cut ones


class CutOnly:
    """A KernelVisiblePages seen through ``runs`` alone (no ``masked_runs``)."""

    def __init__(self, src: KernelVisiblePages) -> None:
        self.name = src.name
        self.runs = src.runs


@given(st.lists(st.sampled_from(KINDS), min_size=1, max_size=60))
def test_a_sketch_of_masked_runs_is_that_of_the_cut_ones(kinds: list[str]) -> None:
    """The streamed sketch values read a run whole with its mask: the values
    of the runs cut at the dropped pages, page for page."""
    with tempfile.TemporaryDirectory() as tmp:
        fake_tree(Path(tmp))
        live = fake_live([kinds], [True])
        src = KernelVisiblePages(live, KnownZero(Path(tmp)))  # type: ignore[arg-type]
        key = SketchKey.from_secret(b"k" * 32)
        whole, cut = streamed_values(src, key), streamed_values(CutOnly(src), key)  # type: ignore[arg-type]
    assert whole.pages == cut.pages
    for a, b in ((whole.decision, cut.decision), (whole.identity, cut.identity),
                 (whole.exact, cut.exact)):
        assert np.array_equal(a, b)


def test_zero_rows_finds_exactly_the_all_zero_pages() -> None:
    rng = np.random.default_rng(3)
    pages = np.zeros((3000, PAGE_SIZE // 8), dtype=np.uint64)
    nonzero = rng.random(3000) < 0.5
    rows = np.flatnonzero(nonzero)
    pages[rows, rng.integers(0, PAGE_SIZE // 8, rows.size)] = 1     # one word anywhere
    assert np.array_equal(zero_rows(pages.data.cast("B")), np.flatnonzero(~nonzero))


# ---- a real process ------------------------------------------------------------

HPAGE = 2 << 20
CHILD = r"""
import ctypes, mmap, sys
size = 8 << 20
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
for i in range(16):                       # read-faulted: the shared zero page
    m[i * 4096]
for i in range(16, 32):                   # written, then all zero again
    m[i * 4096] = 1
    m[i * 4096] = 0
for i in range(32, 48):                   # data
    m[i * 4096] = 2
h = -(-(base + (1 << 18)) // (2 << 20)) * (2 << 20) - base
m.madvise(mmap.MADV_HUGEPAGE, h, 4 << 20)
for i in range(512):                      # read-faulted: the huge zero page
    m[h + i * 4096]
m[h + (2 << 20)] = 3                      # one write: a THP, 511 subpages zero
m[h + (2 << 20) + 100 * 4096] = 4
print(hex(base), flush=True)
sys.stdin.read()
"""


class EveryPage(ProcFs):
    """The reference: every all-zero page looked up in kpageflags."""

    def zero_pfn(self) -> int | None:
        return None


def thp_enabled() -> bool:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return "[never]" not in text


@pytest.mark.skipif(os.geteuid() != 0, reason="PFNs in pagemap need root")
def test_a_real_process_gets_the_kpageflags_answer() -> None:
    procfs = ProcFs()
    with mapping_process(CHILD) as (proc, base):
        vmas = [v for v in procfs.smaps(proc.pid) if base <= v.start < base + (8 << 20)]
        hg = [v for v in vmas if "hg" in v.vmflags]
        h = hg[0].start if hg else -(-(base + (1 << 18)) // HPAGE) * HPAGE
        # what kpageflags itself says of the pages the child set up
        entries = procfs.pagemap(proc.pid, h, 1024)
        flags = procfs.kpageflags(entries & PM_PFN_MASK)
        huge = procfs.huge_zero_pfn()
        thp_page = bool(flags[512] & np.uint64(THP))
        if thp_enabled():
            assert huge is not None and huge % 512 == 0
            assert int(entries[0] & PM_PFN_MASK) == huge      # the child maps the same one
        srcs = {name: KernelVisiblePages(LiveProcessSource(proc.pid, vmas), pf)
                for name, pf in (("fast", ProcFs()), ("every", EveryPage()))}
        results = {name: fed(src) for name, src in srcs.items()}
        cut_and_masked = [pages_fed(srcs["fast"], masked) for masked in (False, True)]
        for src in srcs.values():
            src.close()
    assert results["fast"] == results["every"]
    assert cut_and_masked[0] == cut_and_masked[1]
    runs, thp_zero = results["fast"]
    first = f"vma@{base:#x}"
    assert [(f, n, z) for r, f, n, z in runs if r == first][:1] == [(16, 32, 16)]
    assert sum(n for *_, n, _ in runs) == 32 + 2    # the THP's (or 4 KiB pages') data
    if not thp_enabled():
        return
    if not thp_page:
        pytest.skip("the kernel gave no THP for the written 2 MiB (memory fragmented)")
    assert thp_zero == 510
