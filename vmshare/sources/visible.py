"""Live guest memory as kernel KSM sees it: all-zero pages it never counts left out.

``KernelVisiblePages`` wraps a ``LiveProcessSource`` and drops the all-zero
pages that kernel KSM never scans or counts (the shared zero page; all-zero
subpages of a transparent huge page, which a THP split maps to the zero page
since Linux 6.12). ``zero_rows`` finds all-zero pages in a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from vmshare.ksm.procfs import KPF_THP, KPF_ZERO_PAGE, PM_PFN_MASK, ProcFs
from vmshare.model import PAGE_SIZE, Region
from vmshare.sources.base import DEFAULT_CHUNK_PAGES, WHOLE, Part, ReadInto
from vmshare.sources.live import LivePageRun, LiveProcessSource

_WORDS_PER_PAGE = PAGE_SIZE // 8


def zero_rows(data: memoryview) -> np.ndarray[Any, np.dtype[np.intp]]:
    """Indices of the all-zero pages in ``data``: a cheap first/last-word filter,
    then whole pages checked over contiguous stretches of candidates (views, no
    copies)."""
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
    maybe = np.flatnonzero((words[:, 0] == 0) & (words[:, -1] == 0))
    if maybe.size == 0:
        return maybe
    parts = []
    for block in np.split(maybe, np.flatnonzero(np.diff(maybe) != 1) + 1):
        rows = words[int(block[0]):int(block[-1]) + 1]
        parts.append(block if not rows.any() else block[~rows.any(axis=1)])
    return np.concatenate(parts)


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

    Only all-zero pages can be either, so only those are looked up: their PFN
    from the pagemap entries the live source read in the same pass
    (``LivePageRun.pagemap``, through its held descriptor), then KPF_ZERO_PAGE
    and KPF_THP in kpageflags.
    """

    def __init__(self, inner: LiveProcessSource, procfs: ProcFs, *,
                 thp_split: bool = True) -> None:
        self.inner = inner
        self.name = inner.name
        self.procfs = procfs
        self.thp_split = thp_split       # False: keep THP zero subpages (dump-like view)
        self._thp_zero: dict[Part, int] = {}
        self._parts = 1

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
        self._parts = part[1]              # each share counts its own (readers run at once)
        self._thp_zero[part] = 0
        for run in self.inner.runs(chunk_pages, part):
            zero = zero_rows(run.data)
            if zero.size == 0:
                yield replace(run, zero_pages=0)
                continue
            flags = self.procfs.kpageflags(run.pagemap[zero] & PM_PFN_MASK)
            on_zero_page = (flags & np.uint64(1 << KPF_ZERO_PAGE)) != 0
            thp_zero = ((flags & np.uint64(1 << KPF_THP)) != 0) & ~on_zero_page
            if not self.thp_split:
                thp_zero[:] = False
            self._thp_zero[part] += int(thp_zero.sum())
            dropped = on_zero_page | thp_zero
            if not dropped.any():
                yield replace(run, zero_pages=int(zero.size))
                continue
            kept_zero = zero[~dropped]             # all-zero pages fed all the same
            keep = np.ones(run.npages, dtype=np.int8)
            keep[zero[dropped]] = 0
            edges = np.diff(keep, prepend=np.int8(0), append=np.int8(0))
            for a, b in zip(np.flatnonzero(edges == 1).tolist(),
                            np.flatnonzero(edges == -1).tolist(), strict=True):
                first, data = run.first_page + a, run.data[a * PAGE_SIZE:b * PAGE_SIZE]
                nzero = int(np.searchsorted(kept_zero, b) - np.searchsorted(kept_zero, a))
                yield LivePageRun(run.source, run.region, first, data, run.pagemap[a:b],
                                  zero_pages=nzero)

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
