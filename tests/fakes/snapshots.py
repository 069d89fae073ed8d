"""A metrics snapshot of a big host, built without a hypervisor: ``vms`` running
VMs in trust groups of ``group`` VMs, each sharing pages with every peer of its
group (the most ``vmshare_vm_shares_with_bytes`` series a grouped host has).
For the exporter's scrape-cost benchmark and the server's concurrency test: a
scrape only renders the last snapshot, so what it costs depends on the figures,
not on how they were measured."""

from __future__ import annotations

import time

from vmshare.model import PAGE_SIZE, KsmStat, RamBackend, Vma, VmFacts, VmRef
from vmshare.observe.host import BackendView, HostView, VmView
from vmshare.present.metrics import Snapshot, VmPolicyFacts

RAM = 4 << 30


def _vm(i: int, members: list[str]) -> VmView:
    name = members[i % len(members)]
    ram = RamBackend("pc.ram", RAM, merge=True)
    vma = Vma(0x7f0000000000, 0x7f0000000000 + RAM, "rw-p", 0, "",
              frozenset({"rd", "wr", "mg"}), rss_bytes=RAM // 2)
    peers = {p: 1000 + 37 * j for j, p in enumerate(members) if p != name}
    return VmView(
        facts=VmFacts(VmRef(name, f"00000000-0000-4000-8000-{i:012d}", i + 1, True),
                      pid=10_000 + i, memory_bytes=RAM),
        backends=(BackendView(ram, vma, None),),
        ksm_stat=KsmStat(ksm_rmap_items=200_000 + i, ksm_zero_pages=3000 + i,
                         ksm_merging_pages=90_000 + i, ksm_process_profit=(80_000 + i) * PAGE_SIZE,
                         ksm_mergeable=True),
        resident_pages=RAM // PAGE_SIZE // 2, ksm_pages=90_000 + i,
        saved_pages=45_000.5 + i, shares_with_pages=peers)


def big_host(vms: int = 200, group: int = 20, taken_at: float | None = None) -> Snapshot:
    """The snapshot: VMs ``vm-000``.. in groups ``tenant-00``..; every policy says merge."""
    names = [f"vm-{i:03d}" for i in range(vms)]
    views, policy = [], {}
    for g in range(0, vms, group):
        members = names[g:g + group]
        for i in range(g, g + len(members)):
            views.append(_vm(i, members))
            policy[names[i]] = VmPolicyFacts(f"tenant-{g // group:02d}", True)
    counters = {"pages_shared": 50_000, "pages_sharing": sum(int(v.saved_pages) for v in views),
                "pages_unshared": 10_000, "pages_volatile": 500, "full_scans": 12,
                "pages_scanned": 5_000_000, "general_profit": 1 << 33}
    host = HostView(counters=counters, knobs={"run": 1, "pages_to_scan": 1000,
                                              "sleep_millisecs": 20}, vms=tuple(views))
    return Snapshot(host=host, taken_at=time.time() if taken_at is None else taken_at,
                    duration=1.5, cpu_seconds=1.2, ksmd_cpu_seconds=1234.5, policy=policy)
