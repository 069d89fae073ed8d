"""Frozen model objects shared by every layer. No I/O here.

Counter meanings are defined once, in COUNTER_MEANINGS, with the kernel's
wording (Documentation/admin-guide/mm/ksm.rst). The engine, the reports and
the metrics use these names and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE_SIZE = 4096

# Host-wide KSM counters (read-only files in /sys/kernel/mm/ksm), kernel meanings.
COUNTER_MEANINGS: dict[str, str] = {
    "pages_shared": "how many shared pages are being used (one per stable-tree node)",
    "pages_sharing": "how many more sites are sharing them, i.e. how much memory is saved",
    "pages_unshared": "how many pages are unique but repeatedly checked for merging",
    "pages_volatile": "how many pages are changing too fast to be placed in a tree",
    "pages_skipped": "how many times the smart page scanning algorithm skipped a page",
    "pages_scanned": "how many pages are being scanned for ksm (cumulative)",
    "full_scans": "how many times all mergeable areas have been scanned",
    "general_profit": "how effective KSM is: saved bytes minus rmap_item overhead",
    "ksm_zero_pages": "how many zero pages that are still mapped into processes were "
                      "mapped by KSM when deduplicating (use_zero_pages=1)",
    "stable_node_chains": "number of stable node chains allocated (max_page_sharing reached)",
    "stable_node_dups": "number of stable node dups queued on stable node chains",
}

# Per-VM figures (vmshare's own, built from the kernel's), meanings defined once.
VM_FIGURE_MEANINGS: dict[str, str] = {
    "ram_bytes": "size of the VM's guest RAM backends",
    "resident_pages": "guest RAM pages present in host memory (pagemap present bit)",
    "ksm_pages": "guest RAM pages that are mapped to a KSM page (KPF_KSM)",
    "saved_bytes": "fair share of the KSM saving: each KSM page mapped k times credits "
                   "each mapping (k-1)/k of a page; summed over all mappings this is "
                   "pages_sharing",
    "zero_pages": "pages of the QEMU process that KSM replaced with the zero page "
                  "(ksm_stat ksm_zero_pages, use_zero_pages=1)",
    "rmap_items": "KSM reverse-map items the kernel holds for the process (ksm_rmap_items)",
    "process_profit_bytes": "the kernel's ksm_process_profit: (merging+zero pages) x page "
                            "size minus rmap items x rmap item size; summed over VMs it "
                            "double counts",
    "shares_with": "bytes of guest RAM mapped to the same KSM page in both VMs",
}


@dataclass(frozen=True)
class RamBackend:
    """One QEMU memory backend object (query-memdev + qom-list /objects)."""

    id: str
    size: int
    merge: bool
    qom_type: str = "memory-backend-ram"   # memory-backend-ram|file|memfd|epc|...
    share: bool = False
    mem_path: str | None = None             # memory-backend-file only
    hugetlb: bool = False                   # memfd hugetlb=on or file on hugetlbfs

    @property
    def qom_path(self) -> str:
        return f"/objects/{self.id}"

    @property
    def ineligible_reason(self) -> str | None:
        """Why KSM can never merge this backend, or None when it can.

        KSM merges private anonymous pages only. Shared memory (share=on: a
        memfd backend's default, a file backend with share=on) and hugetlb
        never qualify. A private file or memfd backend (share=off, what libvirt
        makes of ``<memoryBacking><source type='file|memfd'/>`` with access
        mode private) is a MAP_PRIVATE mapping: every page the guest writes
        becomes a private anonymous copy, which KSM merges like any other
        (QEMU madvises it mergeable, and ksmd merged 1,024 of 1,024 such pages
        in a test); pages only read stay page cache and are never merged.
        """
        if self.hugetlb:
            return "hugetlb-backed memory is never merged by KSM"
        if self.share:
            what = {"memory-backend-file": f"file {self.mem_path or ''}".rstrip(),
                    "memory-backend-memfd": "memfd"}.get(self.qom_type, "memory")
            return f"shared {what} (share=on) is never merged by KSM"
        if self.qom_type not in ("memory-backend-ram", "memory-backend-file",
                                 "memory-backend-memfd"):
            return f"{self.qom_type} is not private anonymous memory"
        return None


@dataclass(frozen=True)
class VmRef:
    """A VM as a hypervisor adapter names it."""

    name: str
    uuid: str
    domain_id: int | None = None   # libvirt id while running, else None
    running: bool = False


@dataclass(frozen=True)
class VmFacts:
    """What the domain definition says that matters to vmshare."""

    ref: VmRef
    pid: int | None
    nosharepages: bool = False
    launch_security: bool = False
    memory_bytes: int = 0
    # Whose <nosharepages/> it is, from vmshare's metadata element: "vmshare"
    # (added by ``vmshare policy adopt``: merging is vmshare's to turn on per
    # RAM backend), "operator" (there before vmshare adopted the domain), or
    # None (not recorded: the operator's, as far as vmshare knows).
    nosharepages_owner: str | None = None

    @property
    def ineligible_reason(self) -> str | None:
        if self.nosharepages and self.nosharepages_owner != "vmshare":
            if self.nosharepages_owner == "operator":
                return ("<memoryBacking><nosharepages/> is set by the operator "
                        "(recorded when vmshare adopted the domain)")
            return "<memoryBacking><nosharepages/> is set"
        if self.launch_security:
            return "confidential guest (launchSecurity)"
        return None


@dataclass(frozen=True)
class Adoption:
    """What ``vmshare policy adopt`` did to one domain's persistent definition.

    outcome: adopted (<nosharepages/> added: QEMU starts with mem-merge=off
    and vmshare turns merging on per RAM backend) | already (adopted before)
    | operator (its own <nosharepages/> recorded: never merged) | transient
    (no persistent definition to change) | confidential (never merged anyway).
    ``changed``: the definition was written.
    """

    vm: str
    outcome: str
    changed: bool = False
    running: bool = False


@dataclass(frozen=True)
class Vma:
    """One mapping of a process (from /proc/<pid>/smaps)."""

    start: int
    end: int
    perms: str
    offset: int
    pathname: str
    vmflags: frozenset[str] = field(default_factory=frozenset)
    rss_bytes: int = 0
    anon_huge_bytes: int = 0
    #: smaps' THPeligible: may the kernel back this mapping with transparent
    #: huge pages now (None: not reported)
    thp_eligible: bool | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def mergeable(self) -> bool:
        return "mg" in self.vmflags

    @property
    def anonymous_private(self) -> bool:
        return self.pathname in ("", "[heap]") and self.perms[3:4] == "p"


@dataclass(frozen=True)
class KsmStat:
    """/proc/<pid>/ksm_stat, kernel names (missing fields are 0)."""

    ksm_rmap_items: int = 0
    ksm_zero_pages: int = 0
    ksm_merging_pages: int = 0
    ksm_process_profit: int = 0
    ksm_merge_any: bool = False
    ksm_mergeable: bool = False


@dataclass(frozen=True)
class Region:
    """A contiguous stretch of guest (or process) memory inside a page source.

    ``key`` names it stably within its source (backend id, ELF segment index,
    "vma@<start>" for a plain process). ``generation`` changes whenever the
    region's identity changes (new pid, new address after mremap, new size,
    guest reset): the engine drops everything it knew about a region whose
    generation changed. A page's identity is (source, region key, page index),
    never a host virtual address.
    """

    key: str
    size: int
    generation: str = ""


@dataclass(frozen=True)
class PageRun:
    """Consecutive pages read from one region; ``data`` is a multiple of PAGE_SIZE.

    Holes (pages not present in a dump, not resident in a live process) are
    simply not covered by any run.
    """

    source: str
    region: str
    first_page: int
    data: memoryview

    @property
    def npages(self) -> int:
        return len(self.data) // PAGE_SIZE
