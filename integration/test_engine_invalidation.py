"""Invalidation: what the engine knew of moved or replaced memory is dropped.

A region whose generation changed (a mapping moved by mremap, a guest
restored into a new QEMU process) must not keep its old merges: right after
the change its pages are new to the engine (none merged), and once both
converge, an incremental engine and a fresh engine agree on the same state.

The processes and guests here are made unmergeable for the kernel (no
madvise, QEMU merge=off): these tests exercise the engine only and must not
add to the kernel's counters that concurrent KSM tests read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration.domains import domain_name
from integration.ksm_fixtures import MemProc, memprocs, start_memproc
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.errors import VmshareError
from vmshare.guest import FillSpec
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import PAGE_SIZE, Vma
from vmshare.observe.host import Observer
from vmshare.prediction.predict import LiveScanner, ScanPass, domain_target
from vmshare.prediction.scanning import scan_sources
from vmshare.sources import LiveProcessSource
from vmshare.sources.secure import ensure_dump_dir

__all__ = ["memprocs"]
pytestmark = pytest.mark.integration


def source(p: MemProc, name: str) -> LiveProcessSource:
    """The memproc's region keyed by a fixed id (as a QEMU backend id would be):
    only its generation tells the engine that it moved."""
    vma = Vma(p.address, p.address + p.pages * PAGE_SIZE, "rw-p", 0, "")
    return LiveProcessSource(p.pid, [vma], name=name, backend_ids={p.address: "ram"})


def scan(engine: KsmEngine, procs: dict[str, MemProc]) -> None:
    sources = [source(p, n) for n, p in procs.items()]
    try:
        scan_sources(engine, sources)
    finally:
        for s in sources:
            s.close()


def test_mremap_gives_a_new_generation(memprocs: list[MemProc]) -> None:
    a = start_memproc(identical=400, unique=100, zero=50, seed=4, madvise=False)
    b = start_memproc(identical=400, unique=60, zero=20, seed=4, madvise=False)
    memprocs.extend([a, b])
    procs = {"a": a, "b": b}
    engine = KsmEngine(EngineConfig())
    engine.converge(lambda e: scan(e, procs))
    before = engine.per_source()
    assert before["a"].ksm_pages >= 400 + 50        # identical and zero pages merged
    old_gen = source(a, "a").regions()[0].generation

    old = a.address
    assert a.mremap() != old
    assert source(a, "a").regions()[0].generation != old_gen
    scan(engine, procs)
    # a's pages are new to the engine: nothing of a's is merged yet, although
    # its bytes and region key are unchanged. b keeps its stable nodes alone.
    after_move = engine.per_source()
    assert after_move["a"].ksm_pages == 0
    assert engine.counters().pages_volatile >= a.pages

    engine.converge(lambda e: scan(e, procs))
    fresh = KsmEngine(EngineConfig())
    fresh.converge(lambda e: scan(e, procs))
    assert engine.counters().merge_state() == fresh.counters().merge_state()
    assert engine.per_source() == fresh.per_source()
    assert engine.shares_with() == fresh.shares_with()


# ------------------------------------------------------------------ save / restore
NAMES = (domain_name("eng-inval-a"), domain_name("eng-inval-b"))
SPEC = FillSpec(identical_mib=48, unique_mib=16, zero_mib=8, seed=33)


@pytest.fixture
def guests(boot_guests: Callable[..., list[Any]]) -> tuple[str, ...]:
    boot_guests(NAMES, SPEC, memory_mib=192)
    return NAMES


def unmergeable(hv: Any, name: str) -> None:
    ref = hv.lookup(name)
    for b in hv.ram_backends(ref):
        hv.set_merge(ref, b.id, False)


def converge_passes(scanner: LiveScanner, limit: int = 6) -> ScanPass:
    previous = None
    for _ in range(limit):
        p = scanner.scan()
        state = (p.counters.pages_shared, p.counters.pages_sharing)
        if state == previous:
            return p
        previous = state
    return p


def test_save_restore_gives_a_new_generation(guests: tuple[str, ...], libvirt_conn: Any,
                                             tmp_path: Path) -> None:
    from vmshare.hypervisor import connect

    a, b = guests
    hv: Any = connect("qemu:///system")
    save_dir = ensure_dump_dir(tmp_path / "save")
    save_path = save_dir / f"{a}.save"
    try:
        for n in guests:
            unmergeable(hv, n)
        observer = Observer(hv, KsmSysfs(), ProcFs())
        targets = [domain_target(hv, observer, n) for n in guests]
        scanner = LiveScanner(targets, EngineConfig())
        settled = converge_passes(scanner)
        by = {s.name: s for s in settled.sources}
        assert by[a].ksm_pages >= SPEC.identical_mib * 256
        old_pid = hv.facts(hv.lookup(a)).pid

        libvirt_conn.lookupByName(a).save(str(save_path))
        libvirt_conn.restore(str(save_path))
        save_path.unlink()
        unmergeable(hv, a)
        new_pid = hv.facts(hv.lookup(a)).pid
        assert new_pid is not None and new_pid != old_pid

        first = scanner.scan()
        by = {s.name: s for s in first.sources}
        # New process, new generation: nothing of a's is merged after one pass,
        # while b still holds its stable pages (alone now).
        assert by[a].ksm_pages == 0
        assert by[a].pages > 0
        assert by[b].ksm_pages > 0

        incremental = converge_passes(scanner)
        fresh = converge_passes(LiveScanner(targets, EngineConfig()))
        for key in ("pages_shared", "pages_sharing"):
            got, want = getattr(incremental.counters, key), getattr(fresh.counters, key)
            # The guests run between the two engines' passes: a few pages move.
            assert got == pytest.approx(want, rel=0.01), (key, incremental.counters,
                                                            fresh.counters)
        inc = {s.name: s for s in incremental.sources}
        fr = {s.name: s for s in fresh.sources}
        assert inc[a].ksm_pages == pytest.approx(fr[a].ksm_pages, rel=0.01)
        assert inc[a].shares_with[b] == pytest.approx(fr[a].shares_with[b], rel=0.01)
    finally:
        save_path.unlink(missing_ok=True)      # guest memory: not left for pytest's tmp
        with contextlib.suppress(VmshareError):
            hv.close()
