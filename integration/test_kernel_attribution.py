"""Exact attribution against real kernel KSM with real processes (no VMs needed)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from integration.ksm_fixtures import MemProc, converge, kernel_ksm, memprocs, start_memproc
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import PAGE_SIZE
from vmshare.observe.attribution import attribute

__all__ = ["kernel_ksm", "memprocs"]
pytestmark = pytest.mark.integration


def all_mergeable_entries(procfs: ProcFs) -> dict[str, npt.NDArray[np.uint64]]:
    """Pagemap entries of every mergeable mapping of every process on the host."""
    out: dict[str, npt.NDArray[np.uint64]] = {}
    for entry in procfs.root.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            for vma in procfs.smaps(pid):
                if vma.mergeable:
                    out[f"{pid}@{vma.start:x}"] = procfs.pagemap(pid, vma.start,
                                                                 vma.size // PAGE_SIZE)
        except Exception:   # processes come and go (kernel threads have no smaps)
            continue
    return out


def test_fair_share_adds_up_to_pages_sharing(kernel_ksm: KsmSysfs, memprocs: list[MemProc]) -> None:
    procfs = ProcFs()
    identical, unique = 2048, 512
    for _ in range(3):
        memprocs.append(start_memproc(identical=identical, unique=unique, seed=7))
    counters = converge(kernel_ksm)
    # Exact expectation for three processes: each identical page has one
    # stable page with three mappings, so pages_shared=2048, pages_sharing=4096.
    assert counters["pages_shared"] >= identical
    assert counters["pages_sharing"] >= 2 * identical
    ours = {str(p.pid): procfs.pagemap(p.pid, p.address, p.pages) for p in memprocs}
    att = attribute(ours, procfs.kpageflags, procfs.kpagecount)
    for p in memprocs:
        fig = att.per_vm[str(p.pid)]
        assert fig.ksm_pages == identical
        assert fig.saved_pages == pytest.approx(identical * 2 / 3)
        others = {k: v for k, v in att.shares_with[str(p.pid)].items()}
        assert others == {str(q.pid): identical for q in memprocs if q is not p}
    # Host-wide: every mergeable mapping's fair share sums to pages_sharing.
    everything = attribute(all_mergeable_entries(procfs), procfs.kpageflags,
                           procfs.kpagecount)
    total = sum(f.saved_pages for f in everything.per_vm.values())
    sharing = kernel_ksm.read_int("pages_sharing")
    assert total == pytest.approx(sharing, rel=0.01)


def test_mremap_breaks_merges_then_they_come_back(kernel_ksm: KsmSysfs,
                                                  memprocs: list[MemProc]) -> None:
    """mremap() moving a mergeable area unmerges its KSM pages first (Hugh
    Dickins' 2009 fix, so stale stable-tree entries never turn up at the new
    address) but keeps the area mergeable: the pages merge again later."""
    procfs = ProcFs()
    a = start_memproc(identical=512, seed=3)
    b = start_memproc(identical=512, seed=3)
    memprocs.extend([a, b])
    converge(kernel_ksm)

    def ksm_pages_of_b() -> int:
        entries = {"b": procfs.pagemap(b.pid, b.address, b.pages)}
        return attribute(entries, procfs.kpageflags, procfs.kpagecount).per_vm["b"].ksm_pages

    assert ksm_pages_of_b() == 512
    old = b.address
    assert b.mremap() != old
    assert ksm_pages_of_b() == 0
    moved = [v for v in procfs.smaps(b.pid) if v.start == b.address]
    assert moved and moved[0].mergeable
    converge(kernel_ksm)
    assert ksm_pages_of_b() == 512


def test_fast_path_ignores_the_huge_zero_page(kernel_ksm: KsmSysfs,
                                              memprocs: list[MemProc]) -> None:
    """Guest-RAM-like memory (MADV_DONTFORK) that was only read maps the huge
    zero page: the kpageflags-free attribution path must not count it as KSM."""
    procfs = ProcFs()
    a = start_memproc(identical=256, seed=4, dontfork=True, read_only=1024)
    b = start_memproc(identical=256, seed=4, dontfork=True)
    memprocs.extend([a, b])
    converge(kernel_ksm)
    entries = np.concatenate([procfs.pagemap(a.pid, a.address, a.pages),
                              procfs.pagemap(a.pid, a.ro_address, a.ro_pages)])
    huge_zero = int(((entries >> np.uint64(61)) & np.uint64(1)).sum())
    assert huge_zero > 0, "the read-only THP region did not map the huge zero page"
    fast = attribute({"a": entries}, procfs.kpageflags, procfs.kpagecount,
                     unforked_zero_pfn=procfs.zero_pfn())
    exact = attribute({"a": entries}, procfs.kpageflags, procfs.kpagecount)
    assert fast.per_vm["a"].ksm_pages == exact.per_vm["a"].ksm_pages == 256
