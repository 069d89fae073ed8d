"""Exact per-VM KSM accounting: pure functions over pagemap and page-flag arrays.

The rule (one definition, used by `status`, the metrics and the engine):
a KSM page mapped k times in the whole host saves k-1 pages (that is the
kernel's pages_sharing for it). Each of its k mappings is credited (k-1)/k of
a page. A VM's ``saved_bytes`` is the sum over its guest-RAM mappings of KSM
pages; summed over every process on the host it is exactly pages_sharing x
page size, so nothing is counted twice.

``shares_with[a][b]`` is the number of guest-RAM pages of VM a mapped to a KSM
page that VM b maps too (a KSM page that is shared only inside one VM is not
counted). It is not symmetric when one VM maps the same KSM page several times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmshare.errors import AccessDenied, ProcfsError
from vmshare.model import RamBackend, Vma

U64 = npt.NDArray[np.uint64]
PfnLookup = Callable[[U64], U64]

_PFN_MASK = np.uint64((1 << 55) - 1)
_ONE = np.uint64(1)
_KPF_KSM = 21          # include/uapi/linux/kernel-page-flags.h


@dataclass(frozen=True)
class PageFigures:
    """One VM's page-level figures (see model.VM_FIGURE_MEANINGS)."""

    resident_pages: int
    ksm_pages: int
    saved_pages: float


@dataclass(frozen=True)
class Attribution:
    per_vm: dict[str, PageFigures]
    shares_with: dict[str, dict[str, int]]   # pages, see module docstring


def _bit(entries: U64, bit: int) -> npt.NDArray[np.bool_]:
    return ((entries >> np.uint64(bit)) & _ONE).astype(bool)


def check_kpf_ksm(anon_flags: int | None) -> None:
    """Refuse to trust KPF_KSM when the kernel sets it on a plain page.

    ``anon_flags`` is the kpageflags word of a private anonymous page that
    was written and never made mergeable (ProcFs.anon_page_flags), or None
    where it could not be read. Linux 6.10, until a fix reported in 2026,
    set KPF_KSM on every anonymous page: per-VM figures from such a kernel
    would count every shared-after-fork page as merged.

    Raises ProcfsError when that page reads KPF_KSM.
    """
    if anon_flags is not None and anon_flags >> _KPF_KSM & 1:
        raise ProcfsError(
            "/proc/kpageflags marks a plain anonymous page of vmshare's own as a KSM page "
            f"(KPF_KSM, flags {anon_flags:#x}): this kernel flags anonymous pages as KSM "
            "(as Linux 6.10 did until its fix), so per-VM KSM figures would be wrong and "
            "are not reported; the host counters in sysfs are still right")


def attribute(vms: Mapping[str, U64], kpageflags: PfnLookup, kpagecount: PfnLookup, *,
              unforked_zero_pfn: int | None = None,
              anon_flags: Callable[[], int | None] | None = None) -> Attribution:
    """Attribute KSM savings to VMs from their guest-RAM pagemap entries.

    ``vms`` maps a VM name to the pagemap entries of all its guest RAM.
    ``kpageflags``/``kpagecount`` look entries up by PFN (sorted, unique).
    Only present pages that are not exclusively mapped (pagemap bit 56) are
    looked up: a page mapped once can save nothing, so this costs no
    accuracy in saved bytes.

    ``unforked_zero_pfn``: the caller vouches that every mapping is private
    memory that no fork can share (QEMU marks guest RAM MADV_DONTFORK: the
    ``dc`` VmFlag; anonymous, or a private file/memfd mapping) and gives the
    zero page's PFN. A present page of such memory that is neither exclusive
    nor file/shared (bit 61: a page-cache page, or the huge zero page) is
    then either the zero page or a KSM page, so the KSM bit need not be read:
    kpageflags is skipped, which halves the kernel work.

    ``anon_flags`` (ProcFs.anon_page_flags) is called, before KPF_KSM is
    trusted, to check the kernel flags a known plain page correctly (see
    ``check_kpf_ksm``). With ``unforked_zero_pfn`` no KPF_KSM is read, so
    no figure depends on it and the check is not needed.

    Raises AccessDenied when PFNs are hidden (pagemap read without
    CAP_SYS_ADMIN reports PFN 0 for every page); ProcfsError from
    ``check_kpf_ksm``.
    """
    names = list(vms)
    pfns, owner, resident = _candidates(vms, names)
    # One sort serves every look-up: unique PFNs in order, and each mapping's index.
    unique, inverse = np.unique(pfns, return_inverse=True)
    inverse = inverse.reshape(-1)
    if unforked_zero_pfn is None:
        if anon_flags is not None and len(unique):
            check_kpf_ksm(anon_flags())
        flags = kpageflags(unique)
        ksm_unique = _bit(flags, _KPF_KSM) & ~_bit(flags, 24)
    else:
        ksm_unique = unique != np.uint64(unforked_zero_pfn)
    counts_unique = np.ones(len(unique), dtype=np.float64)
    counts_unique[ksm_unique] = kpagecount(unique[ksm_unique]).astype(np.float64)
    counts_unique[counts_unique < 1] = 1   # unmapped since we read pagemap: saves nothing
    share_unique = (counts_unique - 1.0) / counts_unique
    is_ksm = ksm_unique[inverse]
    return _figures(names, resident, owner[is_ksm], inverse[is_ksm], share_unique,
                    len(unique))


def _candidates(vms: Mapping[str, U64], names: Sequence[str]
                ) -> tuple[U64, npt.NDArray[np.int32], dict[str, int]]:
    """The PFNs that may be KSM pages, the index of the VM mapping each, and each
    VM's resident pages. Raises AccessDenied when PFNs are hidden."""
    all_pfns: list[U64] = []
    all_owner: list[npt.NDArray[np.int32]] = []
    resident: dict[str, int] = {}
    for index, name in enumerate(names):
        entries = vms[name]
        present = _bit(entries, 63)
        resident[name] = int(present.sum())
        pfns = entries & _PFN_MASK
        if resident[name] and not pfns[present].any():
            raise AccessDenied("page frame numbers are hidden in pagemap: "
                               "per-VM attribution needs root (CAP_SYS_ADMIN)")
        # KSM pages are anonymous: a page pagemap calls file-backed or shared
        # (bit 61; the huge zero page shows so) is never one.
        candidate = present & ~_bit(entries, 56) & ~_bit(entries, 61) & (pfns != 0)
        chosen = pfns[candidate]
        all_pfns.append(chosen)
        all_owner.append(np.full(len(chosen), index, dtype=np.int32))
    pfns = np.concatenate(all_pfns) if all_pfns else np.zeros(0, dtype=np.uint64)
    owner = np.concatenate(all_owner) if all_owner else np.zeros(0, dtype=np.int32)
    return pfns, owner, resident


def _figures(names: Sequence[str], resident: Mapping[str, int],
             owner: npt.NDArray[np.int32], inverse: npt.NDArray[np.intp],
             share_unique: npt.NDArray[np.float64], n_unique: int) -> Attribution:
    """Per-VM figures and which VMs share which KSM pages, from each KSM mapping's
    VM (``owner``), its unique page (``inverse``) and each unique page's share."""
    share = share_unique[inverse]
    saved = np.bincount(owner, weights=share, minlength=len(names))
    ksm_pages = np.bincount(owner, minlength=len(names))
    # present[v, u]: VM v maps unique KSM page u at least once.
    present = np.zeros((len(names), n_unique), dtype=bool)
    present[owner, inverse] = True
    per_vm: dict[str, PageFigures] = {}
    shares: dict[str, dict[str, int]] = {name: {} for name in names}
    for a, name_a in enumerate(names):
        per_vm[name_a] = PageFigures(resident_pages=resident[name_a],
                                     ksm_pages=int(ksm_pages[a]),
                                     saved_pages=float(saved[a]))
        mine = inverse[owner == a]
        for b, name_b in enumerate(names):
            if a != b and len(mine):
                both = int(present[b][mine].sum())
                if both:
                    shares[name_a][name_b] = both
    return Attribution(per_vm=per_vm, shares_with=shares)


def match_ram_vmas(vmas: Sequence[Vma], backends: Sequence[RamBackend]) -> dict[str, Vma]:
    """Find each memory backend's mapping in its QEMU process.

    QEMU maps a RAM block as one mapping of exactly the backend's size:
    private anonymous (rw-p, marked dc by MADV_DONTFORK) for
    memory-backend-ram, the file for memory-backend-file, a memfd for
    memory-backend-memfd. Backends of equal size are told apart only by
    creation order, which QEMU allocates top-down; ``ambiguous`` callers
    should verify by the multiset of flags (see ``mergeable_mismatch``).
    Backends without a match are left out.
    """
    found: dict[str, Vma] = {}
    taken: set[int] = set()
    ram = [b for b in backends if b.qom_type == "memory-backend-ram"]
    for backend in backends:
        if backend.qom_type == "memory-backend-file":
            for vma in vmas:
                if vma.start in taken or vma.size != backend.size:
                    continue
                if (backend.mem_path and vma.pathname.startswith(backend.mem_path)) \
                        or f"qemu_back_mem.{backend.id}." in vma.pathname:
                    found[backend.id] = vma
                    taken.add(vma.start)
                    break
        elif backend.qom_type == "memory-backend-memfd":
            for vma in vmas:
                if vma.start not in taken and vma.size == backend.size \
                        and vma.pathname.startswith("/memfd:"):
                    found[backend.id] = vma
                    taken.add(vma.start)
                    break
    by_size: dict[int, list[RamBackend]] = {}
    for backend in ram:
        by_size.setdefault(backend.size, []).append(backend)
    for size, group in by_size.items():
        candidates = [v for v in vmas if v.size == size and v.anonymous_private
                      and v.perms.startswith("rw") and v.start not in taken]
        preferred = [v for v in candidates if "dc" in v.vmflags]
        if len(preferred) >= len(group):
            candidates = preferred
        # Later-created backends get lower addresses (top-down mmap).
        candidates.sort(key=lambda v: v.start, reverse=True)
        for backend, vma in zip(group, candidates, strict=False):
            found[backend.id] = vma
            taken.add(vma.start)
    return found


def mergeable_mismatch(backends: Sequence[RamBackend],
                       matched: Mapping[str, Vma]) -> list[str]:
    """Backends whose mapping's ``mg`` flag disagrees with their ``merge`` property.

    For equal-size RAM backends the comparison is by count (how many of the
    group should be mergeable versus how many matched mappings are), so an
    order guess in ``match_ram_vmas`` can never hide or invent a mismatch.
    """
    problems: list[str] = []
    groups: dict[int, list[RamBackend]] = {}
    for backend in backends:
        if backend.id not in matched or backend.ineligible_reason:
            continue   # KSM ignores madvise on shared/file memory: no mg flag to expect
        if backend.qom_type == "memory-backend-ram":
            groups.setdefault(backend.size, []).append(backend)
        elif matched[backend.id].mergeable != backend.merge:
            problems.append(backend.id)
    for group in groups.values():
        want = sum(b.merge for b in group)
        have = sum(matched[b.id].mergeable for b in group)
        if want != have:
            problems.extend(b.id for b in group if matched[b.id].mergeable != b.merge)
    return problems
