"""What to scan: named targets (a running domain's eligible RAM backends, a dump
file, a process's private anonymous memory), each opened afresh as a page
source for every scan, and each target's trust group. Split from
vmshare.prediction.predict, which runs the engine over them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmshare.errors import DomainNotRunning, ProcessGone, UsageError
from vmshare.ksm.procfs import ProcFs
from vmshare.model import VmRef
from vmshare.sources import (
    LiveProcessSource,
    PageSource,
    open_dump,
    private_anonymous_vmas,
)
from vmshare.sources.visible import KernelVisiblePages

if TYPE_CHECKING:
    from vmshare.config import Config
    from vmshare.hypervisor.base import Hypervisor
    from vmshare.observe.host import Observer


# ------------------------------------------------------------------ targets
@dataclass
class Target:
    """One named thing to scan: ``open()`` gives a fresh page source per scan
    (None when it has nothing eligible right now), named ``name``."""

    name: str
    kind: str                                   # "domain" | "dump" | "pid"
    open: Callable[[], PageSource | None]
    group: str | None = None
    notes: list[str] = field(default_factory=list)


def _first_then(opener: Callable[[], PageSource | None], first: PageSource | None
                ) -> Callable[[], PageSource | None]:
    """``opener``, whose first call gives ``first`` (opened a moment ago to fail
    early) instead of opening the source a second time: for a live process
    that is its smaps parsed and /proc files opened once less before the
    first scan. Every later call opens afresh."""
    held = [first]

    def open_() -> PageSource | None:
        src = held.pop() if held else None
        return src if src is not None else opener()
    return open_


def dump_target(path: str, *, raw: bool = False) -> Target:
    """A dump file; opened (and validated) once now so a bad file fails early.

    ELF cores and kdump files are recognised by content; with ``raw`` the file
    is a plain RAM image (pmemsave). A file that is neither, without ``raw``,
    is an error rather than silently read as raw memory.
    Raises DumpError (missing, unreadable or malformed dump).
    """
    from vmshare.sources.raw import RawImageSource  # dump readers: loaded when used

    def opener() -> PageSource:
        if raw:
            return RawImageSource(path, path)
        return open_dump(path, path, raw_ok=False)

    opener().close()
    return Target(path, "dump", opener)


def pid_target(pid: int, procfs: ProcFs | None = None) -> Target:
    """Private anonymous memory of process ``pid`` (its mappings re-read every scan).

    Raises UsageError for a non-positive pid, ProcessGone, AccessDenied.
    """
    if pid <= 0:
        raise UsageError(f"not a process id: {pid}")
    pf = procfs or ProcFs()
    name = f"pid:{pid}"

    def opener() -> PageSource:
        vmas = private_anonymous_vmas(pid, pf)
        return KernelVisiblePages(LiveProcessSource(pid, vmas, name=name, procfs=pf), pf)

    try:
        first = opener()      # fail now on a dead pid or EPERM
    except ProcessGone as exc:
        raise ProcessGone(f"no running process with pid {pid}") from exc
    return Target(name, "pid", _first_then(opener, first))


def domain_target(hv: Hypervisor, observer: Observer, ident: str, procfs: ProcFs | None = None, *,
                  thp_split: bool = True) -> Target:
    """A running domain's eligible RAM backends, read live from its QEMU process.

    ``thp_split=False`` feeds the all-zero pages inside THPs too (see
    KernelVisiblePages): the guest's content exactly as a dump holds it.

    Ineligible backends (shared, file, memfd, hugetlb, nosharepages) and
    confidential guests are skipped with a note. Raises DomainNotFound,
    DomainNotRunning, HypervisorError, ProcessGone, AccessDenied.
    """
    pf = procfs or ProcFs()
    ref: VmRef = hv.lookup(ident)
    target = Target(ref.name, "domain", lambda: None)

    def opener() -> PageSource | None:
        facts = hv.facts(ref)
        if facts.pid is None:
            raise DomainNotRunning(f"domain {ref.name} is not running")
        target.notes.clear()
        if facts.launch_security:
            target.notes.append(f"{ref.name}: skipped: confidential guest (launchSecurity); "
                                "its memory is encrypted and never read")
            return None
        vmas, ids = [], {}
        for view in observer.backends(facts.ref, facts):
            bid = view.backend.id
            if view.ineligible_reason is not None:
                target.notes.append(f"{ref.name}: backend {bid} skipped: "
                                    f"{view.ineligible_reason}")
            elif view.vma is None:
                target.notes.append(f"{ref.name}: backend {bid} skipped: its mapping was "
                                    f"not found in QEMU process {facts.pid}")
            else:
                vmas.append(view.vma)
                ids[view.vma.start] = bid
        if not vmas:
            target.notes.append(f"{ref.name}: no eligible RAM backend; nothing scanned")
            return None
        return KernelVisiblePages(
            LiveProcessSource(facts.pid, vmas, name=ref.name, backend_ids=ids, procfs=pf), pf,
            thp_split=thp_split)

    target.open = _first_then(opener, opener())   # fail now on a stopped domain or EPERM
    return target


def check_unique(targets: Sequence[Target]) -> None:
    """Raises UsageError naming a target listed twice."""
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            raise UsageError(f"{t.name} is listed twice")
        seen.add(t.name)


def open_all(targets: Sequence[Target]) -> list[PageSource]:
    """A fresh page source per target that has something eligible now; if one
    fails to open, those already open are closed. Raises what ``open`` raises."""
    opened: list[PageSource] = []
    try:
        for t in targets:
            src = t.open()
            if src is not None:
                opened.append(src)
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(sources: Iterable[PageSource]) -> None:
    for s in sources:
        s.close()


# ------------------------------------------------------------------ trust groups
def trust_groups(hv: Hypervisor | None, targets: Sequence[Target], config: Config
                 ) -> tuple[dict[str, str], list[str]]:
    """Each target's trust group: domains by vmshare.policy.rules (domain metadata,
    then the config's ``[vm."NAME"]`` table, then the host default); dumps and
    processes have no policy and fall in the host's default group (noted).

    Raises PolicyError for malformed domain metadata, HypervisorError.
    """
    from vmshare.policy.rules import effective
    from vmshare.policy.sources import vm_policy

    host = config.host
    groups: dict[str, str] = {}
    notes: list[str] = []
    for t in targets:
        if t.kind == "domain":
            if hv is None:
                raise UsageError(f"{t.name}: a domain's trust group needs a hypervisor")
            ref = hv.lookup(t.name)
            facts = hv.facts(ref)
            groups[t.name] = effective(facts, vm_policy(hv, ref), host).group
        else:
            table = host.vms.get(t.name)
            groups[t.name] = table.group if table and table.group else host.default_group
            notes.append(f"{t.name}: a {t.kind} has no domain policy; trust group "
                         f"{groups[t.name]!r}")
    return groups, notes
