"""Differential tests: the userspace engine against the real kernel KSM.

Known content is placed in real processes' private anonymous memory (and in
real TCG guests' RAM); the kernel merges it until it converges; the engine
then scans exactly that memory, live, until it converges too. For static
content every merge counter must be equal; for running guests, whose memory
keeps changing, pages_sharing must agree within 2%.

The kernel's counters are host-wide: the tests first make sure nothing else
on the machine has a mergeable mapping and fail with the culprits named.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from integration.domains import domain_name
from integration.ksm_fixtures import MemProc, converge, kernel_ksm, memprocs, start_memproc
from vmshare.engine import EngineConfig, KsmCounters, KsmEngine
from vmshare.errors import VmshareError
from vmshare.guest import FillSpec
from vmshare.ksm.procfs import PM_PFN_MASK, ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import PAGE_SIZE, Vma
from vmshare.observe.host import Observer
from vmshare.prediction.predict import Target, domain_target, run_until_converged
from vmshare.prediction.scanning import scan_sources
from vmshare.sources import LiveProcessSource

__all__ = ["kernel_ksm", "memprocs"]
pytestmark = pytest.mark.integration

WAIT_FOR_QUIET = 120.0   # seconds other tests' mergeable processes get to finish
EXACT = ("pages_shared", "pages_sharing", "pages_unshared", "ksm_zero_pages",
         "stable_node_chains", "stable_node_dups")


def mergeable_processes(exclude: Sequence[int] = ()) -> list[str]:
    """'pid (comm)' of every process with a mergeable (mg) mapping, except ``exclude``."""
    procfs = ProcFs()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        pid = int(entry)
        try:
            if not any(v.mergeable for v in procfs.smaps(pid)):
                continue
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (VmshareError, OSError):
            continue   # exited, or a kernel thread
        found.append(f"{pid} ({comm})")
    return found


def require_alone(exclude: Sequence[int], wait: float = 0.0) -> None:
    """Fail, naming them, if other processes have mergeable memory; with ``wait``,
    first give them that many seconds to go away (a shared test machine)."""
    deadline = time.monotonic() + wait
    others = mergeable_processes(exclude)
    while others and time.monotonic() < deadline:
        time.sleep(2)
        others = mergeable_processes(exclude)
    if others:
        pytest.fail("other processes have mergeable memory, so the kernel's host-wide "
                    f"counters include theirs and cannot be compared: {', '.join(others)}; "
                    "run this test on an otherwise idle machine")


def memproc_source(p: MemProc, name: str) -> LiveProcessSource:
    vma = Vma(p.address, p.address + p.pages * PAGE_SIZE, "rw-p", 0, "")
    return LiveProcessSource(p.pid, [vma], name=name)


def engine_converge(config: EngineConfig, procs: Sequence[MemProc],
                    max_scans: int = 8) -> tuple[KsmCounters, int]:
    engine = KsmEngine(config)

    def scan(e: KsmEngine) -> None:
        sources = [memproc_source(p, f"p{i}") for i, p in enumerate(procs)]
        try:
            scan_sources(e, sources)
        finally:
            for s in sources:
                s.close()

    scans = engine.converge(scan, max_scans=max_scans)
    return engine.counters(), scans


def pick(counters: KsmCounters | dict[str, int]) -> dict[str, int]:
    if isinstance(counters, KsmCounters):
        return {k: getattr(counters, k) for k in EXACT}
    return {k: counters[k] for k in EXACT}


# ------------------------------------------------------------------ static content
@pytest.mark.parametrize("use_zero_pages", [False, True], ids=["zero-pages-off", "zero-pages-on"])
def test_engine_equals_kernel_on_static_content(kernel_ksm: KsmSysfs, memprocs: list[MemProc],
                                                use_zero_pages: bool) -> None:
    max_sharing = 4
    kernel_ksm.set("max_page_sharing", max_sharing)
    kernel_ksm.set("use_zero_pages", int(use_zero_pages))
    kernel_ksm.set("pages_to_scan", 5000)
    # Six processes with the same identical pages: 6 copies of each, more than
    # max_page_sharing, so chains with two dups each. Two more share a
    # different set (2 copies each). Everyone has unique and zero pages, and
    # one has nothing identical at all.
    for i in range(6):
        memprocs.append(start_memproc(identical=300, unique=100 + 10 * i, zero=70 + i, seed=7))
    for _ in range(2):
        memprocs.append(start_memproc(identical=150, unique=40, zero=3, seed=8))
    memprocs.append(start_memproc(unique=64, zero=9, seed=9))
    require_alone([p.pid for p in memprocs], wait=WAIT_FOR_QUIET)

    kernel = converge(kernel_ksm, timeout=180)
    kernel_ksm.set("run", 0)            # freeze the kernel's state while the engine reads
    kernel = kernel_ksm.counters()
    require_alone([p.pid for p in memprocs])

    config = EngineConfig(max_page_sharing=max_sharing, use_zero_pages=use_zero_pages)
    engine, scans = engine_converge(config, memprocs)
    assert scans < 8, "the engine did not converge on static content"
    # Sanity: the content really exercised chains and (with the knob) zero pages.
    assert kernel["stable_node_chains"] >= 300
    assert (kernel["ksm_zero_pages"] > 0) == use_zero_pages
    assert pick(engine) == pick(kernel), (
        f"engine {pick(engine)} != kernel {pick(kernel)} (use_zero_pages={use_zero_pages})")
    # The exact expectation, computed by hand for the identical sets.
    zero = sum(70 + i for i in range(6)) + 2 * 3 + 9
    if use_zero_pages:
        assert engine.ksm_zero_pages == zero
    assert engine.pages_unshared == sum(100 + 10 * i for i in range(6)) + 2 * 40 + 64


def test_engine_equals_kernel_default_knobs(kernel_ksm: KsmSysfs,
                                            memprocs: list[MemProc]) -> None:
    """max_page_sharing=256 and use_zero_pages=0 (the defaults) with many processes."""
    for i in range(4):
        memprocs.append(start_memproc(identical=2000, unique=500, zero=300 + i, seed=3))
    require_alone([p.pid for p in memprocs], wait=WAIT_FOR_QUIET)
    converge(kernel_ksm, timeout=180)
    kernel_ksm.set("run", 0)
    kernel = kernel_ksm.counters()
    engine, _ = engine_converge(EngineConfig(), memprocs)
    assert kernel["pages_sharing"] >= 3 * 2000
    assert pick(engine) == pick(kernel)


def test_streaming_scan_gives_the_answer_of_keeping_every_page(
        memprocs: list[MemProc]) -> None:
    """The scan keeps no page (a 2 MiB read buffer, the pages to compare read
    again at the end of each scan) against an engine fed copies of every page
    it keeps until end_scan: the same answer."""
    for i in range(3):
        memprocs.append(start_memproc(identical=3000, unique=700, zero=300 + i, seed=12,
                                      madvise=False))
    answers = []
    for stream in (False, True):
        engine = KsmEngine(EngineConfig(max_page_sharing=16))
        for _ in range(2):
            sources = [memproc_source(p, f"p{i}") for i, p in enumerate(memprocs)]
            try:
                if stream:
                    scan_sources(engine, sources, buffer_bytes=2 * 2**20)
                else:
                    engine.begin_scan({s.name: s.regions() for s in sources})
                    for s in sources:
                        for run in s.runs():
                            engine.feed(replace(run, data=memoryview(bytearray(run.data))))
                    engine.end_scan()
            finally:
                for src in sources:
                    src.close()
        answers.append((engine.counters().merge_state(), engine.per_source(),
                        engine.shares_with()))
    assert answers[0] == answers[1]
    assert answers[0][0][1] >= 2 * 3000            # pages_sharing: the identical pages


def test_reading_live_memory_leaves_ksm_pages_merged(kernel_ksm: KsmSysfs,
                                                     memprocs: list[MemProc]) -> None:
    """A scan reads /proc/<pid>/mem, which takes plain page references. A reader
    that pins pages (process_vm_readv) would unshare every KSM page it reads,
    each becoming a private copy: this pins the choice."""
    for _ in range(2):
        memprocs.append(start_memproc(identical=1024, unique=64, seed=4))
    converge(kernel_ksm, timeout=120, min_scans=2)
    kernel_ksm.set("run", 0)              # nothing merges or unmerges from here on
    procfs = ProcFs()

    def pfns(p: MemProc) -> Any:
        return procfs.pagemap(p.pid, p.address, p.pages) & PM_PFN_MASK

    before = [pfns(p) for p in memprocs]
    merged = np.intersect1d(before[0], before[1])
    assert merged.size >= 1000, "the identical pages did not merge"
    engine = KsmEngine()
    scan_sources(engine, [memproc_source(p, f"p{i}") for i, p in enumerate(memprocs)])
    after = [pfns(p) for p in memprocs]
    for b, a in zip(before, after, strict=True):
        assert (b == a).all(), f"{int((b != a).sum())} pages changed frame while being read"
    assert np.intersect1d(after[0], after[1]).size == merged.size


# ------------------------------------------------------------------ real guests
GUEST_NAMES = (domain_name("eng-diff-a"), domain_name("eng-diff-b"))
GUEST_SPEC = FillSpec(identical_mib=64, unique_mib=24, zero_mib=16, volatile_mib=4, seed=21)
GUEST_MIB = 224


@pytest.fixture
def two_guests(boot_guests: Callable[..., list[Any]]) -> tuple[str, ...]:
    boot_guests(GUEST_NAMES, GUEST_SPEC, memory_mib=GUEST_MIB)
    return GUEST_NAMES


def test_engine_close_to_kernel_on_running_guests(kernel_ksm: KsmSysfs,
                                                  two_guests: tuple[str, ...]) -> None:
    """Real TCG guests (some pages volatile): the engine's pages_sharing within 2%
    of the kernel's. Guest RAM is THP-backed; zero-filled subpages become
    zero-page mappings when KSM splits their THP, which the live source models."""
    from vmshare.hypervisor import connect

    hv = connect("qemu:///system")
    try:
        observer = Observer(hv, kernel_ksm, ProcFs())
        targets: list[Target] = [domain_target(hv, observer, n) for n in two_guests]
        pids = [hv.facts(hv.lookup(n)).pid or 0 for n in two_guests]
        require_alone(pids, wait=WAIT_FOR_QUIET)
        for n in two_guests:       # the default: QEMU marks guest RAM mergeable
            views = observer.backends(hv.lookup(n), hv.facts(hv.lookup(n)))
            assert any(v.mg_flag for v in views), f"{n}: guest RAM is not mergeable"
        kernel = converge(kernel_ksm, timeout=300)
        require_alone(pids)
        engine = KsmEngine(EngineConfig())
        scans, _, _ = run_until_converged(engine, targets, max_scans=6)
        kernel_after = kernel_ksm.counters()
    finally:
        with contextlib.suppress(VmshareError):
            hv.close()
    ours = engine.counters().pages_sharing
    theirs = (kernel["pages_sharing"] + kernel_after["pages_sharing"]) / 2
    # The identical regions alone: 64 MiB shared by two guests.
    assert theirs >= GUEST_SPEC.identical_mib * 256 * 0.95
    assert ours == pytest.approx(theirs, rel=0.02), (
        f"engine pages_sharing {ours} vs kernel {kernel['pages_sharing']} / "
        f"{kernel_after['pages_sharing']} after {scans} engine scans")
