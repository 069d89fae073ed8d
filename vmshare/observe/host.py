"""Collect: read-only observation of the host and its VMs.

Everything here measures; nothing changes state. It joins the hypervisor's
view (backends, pids) with /proc and /sys and hands the page arrays to the
pure accounting in vmshare.observe.attribution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmshare.errors import HypervisorError, ProcessGone, ProcfsError
from vmshare.hypervisor.base import Hypervisor
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import PAGE_SIZE, KsmStat, RamBackend, Vma, VmFacts, VmRef
from vmshare.observe.attribution import U64, attribute, match_ram_vmas, mergeable_mismatch
from vmshare.records.history import HOST_FIELDS

log = logging.getLogger("vmshare.observe.host")

# Kernel docs: an rmap_item costs 64 bytes, a merged page saves 4096, so more
# than 64 rmap items per merging page means KSM costs this VM more than it saves.
RMAP_ITEMS_PER_MERGED_PAGE_LIMIT = 64


@dataclass(frozen=True)
class BackendView:
    backend: RamBackend
    vma: Vma | None
    ineligible_reason: str | None

    @property
    def mg_flag(self) -> bool | None:
        return None if self.vma is None else self.vma.mergeable


@dataclass(frozen=True)
class Mappings:
    """A running VM's RAM backends with their mappings, and every other mapping
    of its QEMU process the kernel may merge (``mg``): with QEMU's machine
    default mem-merge=on, the RAM blocks that are no backend (VRAM, ROMs)."""

    backends: tuple[BackendView, ...]
    other_mergeable: tuple[Vma, ...] = ()

    @property
    def other_mergeable_bytes(self) -> int:
        return sum(v.size for v in self.other_mergeable)

    @property
    def unmergeable(self) -> bool:
        """No mapping of the QEMU process is mergeable."""
        return not self.other_mergeable and not any(v.mg_flag for v in self.backends)


@dataclass(frozen=True)
class VmView:
    """Everything vmshare knows about one VM at one moment."""

    facts: VmFacts
    backends: tuple[BackendView, ...] = ()
    ksm_stat: KsmStat = field(default_factory=KsmStat)
    resident_pages: int = 0
    ksm_pages: int = 0
    saved_pages: float = 0.0
    thp_bytes: int = 0
    shares_with_pages: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    other_mergeable: tuple[Vma, ...] = ()   # see Mappings

    @property
    def other_mergeable_bytes(self) -> int:
        return sum(v.size for v in self.other_mergeable)

    @property
    def name(self) -> str:
        return self.facts.ref.name

    @property
    def ram_bytes(self) -> int:
        return sum(b.backend.size for b in self.backends)

    @property
    def saved_bytes(self) -> int:
        return round(self.saved_pages * PAGE_SIZE)


@dataclass(frozen=True)
class HostView:
    counters: dict[str, int]
    knobs: dict[str, int | str]
    vms: tuple[VmView, ...]
    ksm_available: bool = True

    @property
    def vm_saved_pages(self) -> float:
        return sum(v.saved_pages for v in self.vms)

    @property
    def other_saved_pages(self) -> float:
        """pages_sharing not accounted to the listed VMs (other processes, other VMs)."""
        return max(0.0, self.counters.get("pages_sharing", 0) - self.vm_saved_pages)


@dataclass
class _Gathered:
    facts: VmFacts
    backends: tuple[BackendView, ...]
    other_mergeable: tuple[Vma, ...]
    entries: U64
    stat: KsmStat
    thp: int
    start_time: int
    warnings: list[str]


def not_unmergeable_warning(facts: VmFacts, others: Sequence[Vma]) -> str:
    """Why a VM whose RAM backends are unmergeable still is not, and the fix."""
    size = sum(v.size for v in others)
    return (f"not fully unmergeable: {size // 1024:,} KiB in {len(others)} mapping(s) of QEMU "
            f"process {facts.pid} outside its RAM backends stay mergeable (QEMU's "
            "mem-merge=on: VRAM, ROMs); bring the domain to <nosharepages/> with "
            f"'vmshare policy adopt {facts.ref.name}' (a plain QEMU: -machine "
            "mem-merge=off) and restart the guest (mem-merge is a QEMU start option)")


class Observer:
    """Reads the host's and each VM's state. Errors are per VM where possible:
    a VM that vanishes mid-read is reported with a warning, never with numbers
    from a reused pid."""

    def __init__(self, hv: Hypervisor, sysfs: KsmSysfs, procfs: ProcFs, *,
                 one_snapshot: bool = False) -> None:
        self.hv = hv
        self.sysfs = sysfs
        self.procfs = procfs
        self._zero_pfn: int | None = None
        # one_snapshot: every reader of this observer sees one reading of each
        # VM's facts and mappings (the exporter's host view and its policy survey)
        self._maps: dict[tuple[str, int | None], Mappings] | None = \
            {} if one_snapshot else None
        self._facts: dict[str, VmFacts] | None = {} if one_snapshot else None

    def facts(self, vm: VmRef) -> VmFacts:
        """``hv.facts(vm)``, asked once per VM for a ``one_snapshot`` observer
        (a failure is not kept: it is raised to each asker). Raises what
        ``Hypervisor.facts`` raises."""
        key = vm.uuid or vm.name
        if self._facts is not None and key in self._facts:
            return self._facts[key]
        facts = self.hv.facts(vm)
        if self._facts is not None:
            self._facts[key] = facts
        return facts

    def mappings(self, vm: VmRef, facts: VmFacts) -> Mappings:
        """The VM's backends with their mapping in the QEMU process, and the
        process's other mergeable mappings (one read of smaps for both);
        read once per VM and process for a ``one_snapshot`` observer."""
        key = (vm.uuid or vm.name, facts.pid)
        if self._maps is not None and key in self._maps:
            return self._maps[key]
        maps = self._read_mappings(vm, facts)
        if self._maps is not None:
            self._maps[key] = maps
        return maps

    def _read_mappings(self, vm: VmRef, facts: VmFacts) -> Mappings:
        backends = self.hv.ram_backends(vm)
        vmas = self.procfs.smaps(facts.pid) if facts.pid else []
        matched = match_ram_vmas(vmas, backends)
        views = []
        for b in backends:
            reason = facts.ineligible_reason or b.ineligible_reason
            views.append(BackendView(b, matched.get(b.id), reason))
        taken = {v.start for v in matched.values()}
        others = tuple(v for v in vmas if v.mergeable and v.start not in taken)
        return Mappings(tuple(views), others)

    def backends(self, vm: VmRef, facts: VmFacts) -> list[BackendView]:
        """The VM's backends with their mapping in the QEMU process."""
        return list(self.mappings(vm, facts).backends)

    def mismatches(self, vm: VmRef, facts: VmFacts) -> tuple[Mappings, list[str]]:
        """Backends and other mergeable mappings, and the backend ids whose `mg`
        flag disagrees with QEMU's merge property."""
        maps = self.mappings(vm, facts)
        matched = {v.backend.id: v.vma for v in maps.backends if v.vma is not None}
        return maps, mergeable_mismatch([v.backend for v in maps.backends], matched)

    def _gather(self, vm: VmRef) -> _Gathered | VmFacts:
        """The running VM's pages and stats, or its facts when it is not running."""
        facts = self.facts(vm)
        if facts.pid is None:
            return facts
        start = self.procfs.start_time(facts.pid)
        maps = self.mappings(vm, facts)
        views = maps.backends
        parts: list[U64] = []
        thp = 0
        warnings: list[str] = []
        for view in views:
            if view.vma is None:
                warnings.append(f"backend {view.backend.id}: mapping not found in QEMU "
                                f"process {facts.pid}")
                continue
            if view.backend.ineligible_reason:
                continue
            parts.append(self.procfs.pagemap(facts.pid, view.vma.start,
                                             view.vma.size // PAGE_SIZE))
            thp += view.vma.anon_huge_bytes
        try:
            stat = self.procfs.ksm_stat(facts.pid)
        except ProcfsError:
            stat = KsmStat()
        if self.procfs.start_time(facts.pid) != start:
            raise ProcessGone(f"{vm.name}: QEMU process {facts.pid} was replaced while reading")
        entries = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        if maps.other_mergeable and not any(v.mg_flag for v in views):
            warnings.append(not_unmergeable_warning(facts, maps.other_mergeable))
        return _Gathered(facts, views, maps.other_mergeable, entries, stat, thp, start,
                         warnings)

    def _zero_pfn_if_unforked(self, gathered: Iterable[_Gathered]) -> int | None:
        """The zero page's PFN when every measured mapping is MADV_DONTFORK
        (QEMU guest RAM: VmFlag dc), which lets attribution skip kpageflags."""
        for g in gathered:
            for view in g.backends:
                if view.vma is not None and view.backend.ineligible_reason is None \
                        and "dc" not in view.vma.vmflags:
                    return None
        if self._zero_pfn is None:
            self._zero_pfn = self.procfs.zero_pfn() or 0
        return self._zero_pfn or None

    def host(self, names: Sequence[str] | None = None) -> HostView:
        """Host counters plus every (or the named) VM's figures.

        Raises DomainNotFound for an unknown name, AccessDenied without root.
        """
        ksm_ok = self.sysfs.available()
        counters = self.sysfs.counters() if ksm_ok else {}
        knobs = self.sysfs.knobs() if ksm_ok else {}
        refs = [self.hv.lookup(n) for n in names] if names else self.hv.list_vms()
        gathered: dict[str, _Gathered] = {}
        idle: list[VmView] = []
        for ref in refs:
            try:
                got = self._gather(ref)
            except (ProcessGone, HypervisorError, ProcfsError) as exc:
                # The VM stopped, or its QEMU changed, while we read: report
                # it without figures rather than failing the whole host.
                if names:
                    raise
                log.warning("%s: %s", ref.name, exc)
                idle.append(VmView(facts=VmFacts(ref=ref, pid=None), warnings=(str(exc),)))
                continue
            if isinstance(got, VmFacts):
                idle.append(VmView(facts=got))
            else:
                gathered[ref.name] = got
        att = attribute({n: g.entries for n, g in gathered.items()},
                        self.procfs.kpageflags, self.procfs.kpagecount,
                        unforked_zero_pfn=self._zero_pfn_if_unforked(gathered.values()),
                        anon_flags=self.procfs.anon_page_flags)
        views: list[VmView] = []
        for name, g in gathered.items():
            fig = att.per_vm[name]
            warnings = list(g.warnings)
            merging = g.stat.ksm_merging_pages
            if g.stat.ksm_rmap_items > RMAP_ITEMS_PER_MERGED_PAGE_LIMIT * max(merging, 1) \
                    and g.stat.ksm_rmap_items > 1024:
                warnings.append(
                    f"{g.stat.ksm_rmap_items} rmap items for {merging} merged pages: KSM "
                    "costs this VM more than it saves (more than 64 per merged page)")
            if g.thp:
                warnings.append(f"{g.thp // 2**20} MiB of guest RAM is in transparent huge "
                                "pages, which KSM must split before it can merge them")
            views.append(VmView(
                facts=g.facts, backends=tuple(g.backends), ksm_stat=g.stat,
                resident_pages=fig.resident_pages, ksm_pages=fig.ksm_pages,
                saved_pages=fig.saved_pages, thp_bytes=g.thp,
                shares_with_pages=att.shares_with.get(name, {}), warnings=tuple(warnings),
                other_mergeable=g.other_mergeable))
        views.extend(idle)
        views.sort(key=lambda v: v.name)
        return HostView(counters=counters, knobs=knobs, vms=tuple(views), ksm_available=ksm_ok)


def history_sample(host: HostView, now: float) -> dict[str, Any]:
    """One savings-history record of ``host`` (pure; the format vmshare.records.history
    reads back)."""
    vms = {}
    for vm in host.vms:
        if vm.facts.pid is None:
            continue
        vms[vm.name] = {"saved_bytes": vm.saved_bytes, "ksm_pages": vm.ksm_pages,
                        "ram_bytes": vm.ram_bytes, "zero_pages": vm.ksm_stat.ksm_zero_pages}
    return {"time": round(now, 3),
            "host": {k: host.counters[k] for k in HOST_FIELDS if k in host.counters},
            "vms": vms}
