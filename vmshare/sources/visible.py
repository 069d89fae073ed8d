"""Live guest memory as kernel KSM sees it: all-zero pages it never counts left out.

``KernelVisiblePages`` wraps a ``LiveProcessSource`` and drops the all-zero
pages that kernel KSM never scans or counts (the shared zero page; all-zero
subpages of a transparent huge page, which a THP split maps to the zero page
since Linux 6.12). ``zero_rows`` finds all-zero pages in a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from vmshare.engine._pages import zero_pages
from vmshare.ksm.procfs import HPAGE_PMD_SIZE, KPF_THP, KPF_ZERO_PAGE, PM_PFN_MASK, ProcFs
from vmshare.model import PAGE_SIZE, Region, Vma
from vmshare.sources.base import DEFAULT_CHUNK_PAGES, WHOLE, Part, ReadInto
from vmshare.sources.live import LivePageRun, LiveProcessSource

_HUGE_PFNS = np.uint64(HPAGE_PMD_SIZE // PAGE_SIZE)
Mask = npt.NDArray[np.bool_]


def zero_rows(data: memoryview) -> np.ndarray[Any, np.dtype[np.intp]]:
    """Indices of the all-zero pages in ``data`` (whole pages), in C without the
    GIL (``engine._pages.zero_pages``: a page is left at its first non-zero word,
    so a reader pays about one load per page that is not zero: 10 ms for
    1 GiB of the benchmarks' mix, against 21 ms for numpy's first/last-word
    filter with the candidates copied and checked whole)."""
    out = np.empty(len(data) // PAGE_SIZE, dtype=np.intp)
    return out[:zero_pages(data, out)]


def may_hold_thp(vma: Vma) -> bool:
    """Can ``vma`` hold transparent huge pages (smaps: THPeligible, or
    AnonHugePages above 0; a mapping that reports neither line counts as able)."""
    return vma.thp_eligible is not False or vma.anon_huge_bytes > 0


def _counted(run: LivePageRun, zero_pages: int) -> LivePageRun:
    """``run`` with its count of all-zero pages (built directly: dataclasses.replace
    looks its fields up on every call)."""
    return LivePageRun(run.source, run.region, run.first_page, run.data, run.pagemap,
                       zero_pages=zero_pages)


def _without(run: LivePageRun, zero: npt.NDArray[np.intp], keep: Mask
             ) -> Iterator[LivePageRun]:
    """The stretches of ``run`` its pages ``keep`` make (its all-zero pages
    ``zero`` the others), each with its count of (kept) all-zero pages, worked
    out for all stretches at once (on THP memory a run can fall into hundreds)."""
    edges = np.diff(keep.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    kept_zero = np.zeros(run.npages + 1, dtype=np.intp)     # all-zero pages fed all the same
    kept_zero[zero[keep[zero]] + 1] = 1
    np.cumsum(kept_zero, out=kept_zero)
    counts = (kept_zero[stops] - kept_zero[starts]).tolist()
    source, region, first, data, pagemap = (run.source, run.region, run.first_page,
                                            run.data, run.pagemap)
    for a, b, nzero in zip(starts.tolist(), stops.tolist(), counts, strict=True):
        yield LivePageRun(source, region, first + a, data[a * PAGE_SIZE:b * PAGE_SIZE],
                          pagemap[a:b], zero_pages=nzero)


class KernelVisiblePages:
    """A live source without the all-zero pages kernel KSM never counts.

    * An untouched anonymous page that was only read maps the kernel's shared
      (huge) zero page: pagemap calls it present, but KSM never scans it (it
      is not an anonymous page; no rmap item).
    * An all-zero page inside a transparent huge page (KPF_THP): to merge any
      subpage KSM must split the THP, and since Linux 6.12 splitting an
      anonymous THP maps its zero-filled subpages to the shared zero page
      instead of keeping them. A THP with zero subpages always gets split
      (its zero subpages match each other), so they end up as zero-page
      mappings: memory saved, but counted in neither pages_sharing nor
      ksm_zero_pages. ``thp_zero_pages`` counts them (last scan).

    Only all-zero pages can be either, so only those are asked about, their
    PFNs from the pagemap entries the live source read in the same pass
    (``LivePageRun.pagemap``). The zero page and the huge zero page are told
    by PFN (``ProcFs.zero_pfn``, ``ProcFs.huge_zero_pfn``, learned once); only
    in a mapping that may hold THPs (``may_hold_thp``) are the other all-zero
    pages looked up in /proc/kpageflags (KPF_THP). Where the zero page's PFN
    cannot be learned every all-zero page is looked up; where the huge zero
    page's cannot, those that could be part of it (PFN and address at the
    same offset in 2 MiB).
    """

    def __init__(self, inner: LiveProcessSource, procfs: ProcFs, *,
                 thp_split: bool = True) -> None:
        self.inner = inner
        self.name = inner.name
        self.procfs = procfs
        self.thp_split = thp_split       # False: keep THP zero subpages (dump-like view)
        self._thp_zero: dict[Part, int] = {}
        self._parts = 1
        self._zero_pfns: tuple[int | None, int | None] | None = None
        self._vmas = dict(zip((r.key for r in inner.regions()), inner.vmas, strict=True))

    @property
    def read_into(self) -> ReadInto | None:
        return self.inner.read_into

    @read_into.setter
    def read_into(self, value: ReadInto | None) -> None:
        self.inner.read_into = value

    def regions(self) -> list[Region]:
        return self.inner.regions()

    @property
    def thp_zero_pages(self) -> int:
        """THP zero subpages seen by the last scan (all its parts)."""
        return sum(v for (_, n), v in self._thp_zero.items() if n == self._parts)

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
             ) -> Iterator[LivePageRun]:
        for run, zero, keep in self._classified(chunk_pages, part):
            if keep is None:
                yield run
            else:
                yield from _without(run, zero, keep)

    def masked_runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES, part: Part = WHOLE
                    ) -> Iterator[tuple[LivePageRun, Mask | None]]:
        """As ``runs``, but a run the dropped pages would cut comes whole, with
        the mask of its pages kept (False: dropped), and its ``zero_pages``
        those of its kept pages: one run a read where ``runs`` gives hundreds
        on THP memory (for ``KsmEngine.feed(present=...)``)."""
        for run, zero, keep in self._classified(chunk_pages, part):
            if keep is None:
                yield run, None
            else:
                yield _counted(run, int(np.count_nonzero(keep[zero]))), keep

    def _classified(self, chunk_pages: int, part: Part
                    ) -> Iterator[tuple[LivePageRun, npt.NDArray[np.intp], Mask | None]]:
        """Each run read, its all-zero pages, and the mask of its pages kept
        (None when none is dropped: the run is then counted already)."""
        self._parts = part[1]              # each share counts its own (readers run at once)
        self._thp_zero[part] = 0
        if self._zero_pfns is None:        # readers may both learn it: the same answer
            self._zero_pfns = (self.procfs.zero_pfn(), self.procfs.huge_zero_pfn())
        for run in self.inner.runs(chunk_pages, part):
            zero = zero_rows(run.data)
            if zero.size == 0:
                yield _counted(run, 0), zero, None
                continue
            on_zero_page, thp_zero = self._classify(run, zero)
            self._thp_zero[part] += int(thp_zero.sum())
            dropped = on_zero_page | thp_zero
            if not dropped.any():
                yield _counted(run, int(zero.size)), zero, None
                continue
            keep = np.ones(run.npages, dtype=np.bool_)
            keep[zero[dropped]] = False
            yield run, zero, keep

    def _classify(self, run: LivePageRun, zero: npt.NDArray[np.intp]) -> tuple[Mask, Mask]:
        """Of the all-zero pages ``zero`` of ``run``: which map the (huge) zero
        page, and which are subpages of a THP (False everywhere without
        ``thp_split``)."""
        assert self._zero_pfns is not None
        zero_pfn, huge_pfn = self._zero_pfns
        pfn = run.pagemap[zero] & PM_PFN_MASK
        vma = self._vmas.get(run.region)
        if zero_pfn is None or vma is None:
            on_zero_page = np.zeros(zero.size, dtype=np.bool_)
            ask = np.ones(zero.size, dtype=np.bool_)
        else:
            on_zero_page = pfn == np.uint64(zero_pfn)
            if huge_pfn is not None:       # below it, the difference wraps around: large
                on_zero_page |= (pfn - np.uint64(huge_pfn)) < _HUGE_PFNS
                ask = np.zeros(zero.size, dtype=np.bool_)
            else:                          # PMD-mapped: the same offset in 2 MiB
                vpage = (vma.start // PAGE_SIZE + run.first_page + zero).astype(np.uint64)
                ask = pfn % _HUGE_PFNS == vpage % _HUGE_PFNS
            if self.thp_split and may_hold_thp(vma):
                ask[:] = True
            ask &= ~on_zero_page
        thp_zero = np.zeros(zero.size, dtype=np.bool_)
        if ask.any():
            flags = self.procfs.kpageflags(pfn[ask])
            flagged_zero = (flags & np.uint64(1 << KPF_ZERO_PAGE)) != 0
            on_zero_page[ask] = flagged_zero
            if self.thp_split:
                thp_zero[ask] = ((flags & np.uint64(1 << KPF_THP)) != 0) & ~flagged_zero
        return on_zero_page, thp_zero

    def resident_bytes(self) -> int:
        return self.inner.resident_bytes()

    def read_pages(self, region: str, pages: npt.NDArray[np.int64],
                   into: memoryview) -> None:
        self.inner.read_pages(region, pages, into)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> KernelVisiblePages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
