"""Act: make a VM's RAM backends mergeable or not, then prove it.

Every change is verified after it is made (QEMU's ``merge`` property through
query-memdev and the ``mg`` VmFlag of the backend's mapping); a mismatch is
an error, never a success. Unmerging is refused when the host lacks the
memory to un-share the VM's pages (the OOM worry of the 2009 KSM thread).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from vmshare.errors import (
    DomainNotRunning,
    KnobError,
    PolicyError,
    UnmergeRefused,
    UsageError,
    VerificationError,
    VmshareError,
)
from vmshare.hypervisor.base import Hypervisor
from vmshare.ksm.procfs import Headroom, ProcFs, headroom
from vmshare.ksm.sysfs import KNOBS, KsmSysfs
from vmshare.model import PAGE_SIZE, VmFacts, VmRef
from vmshare.observe.attribution import attribute
from vmshare.observe.host import BackendView, Observer
from vmshare.policy.rules import Decision, check_trust_groups
from vmshare.records.audit import AuditLog

log = logging.getLogger("vmshare.control.merge")

@dataclass(frozen=True)
class MergeChange:
    vm: str
    backend: str
    before: bool
    after: bool
    skipped: str | None = None   # why nothing was done, when nothing was

    @property
    def changed(self) -> bool:
        return self.skipped is None and self.before != self.after


class Controller:
    def __init__(self, hv: Hypervisor, procfs: ProcFs, observer: Observer) -> None:
        self.hv = hv
        self.procfs = procfs
        self.observer = observer

    def _running(self, ident: str) -> tuple[VmRef, VmFacts]:
        ref = self.hv.lookup(ident)
        facts = self.hv.facts(ref)
        if facts.pid is None:
            raise DomainNotRunning(f"domain {ref.name} is not running")
        return ref, facts

    def unmerge_headroom(self, facts: VmFacts, views: list[BackendView]) -> Headroom:
        """Memory needed to un-share these backends' KSM pages, and what is free.

        Breaking a merge gives the mapping its own copy: one new page per KSM
        page the VM maps (an upper bound: pages only this VM maps free one back).
        """
        assert facts.pid is not None
        entries = {}
        for i, view in enumerate(views):
            if view.vma is not None and view.backend.ineligible_reason is None:
                entries[str(i)] = self.procfs.pagemap(facts.pid, view.vma.start,
                                                      view.vma.size // PAGE_SIZE)
        att = attribute(entries, self.procfs.kpageflags, self.procfs.kpagecount)
        ksm_pages = sum(f.ksm_pages for f in att.per_vm.values())
        return headroom(self.procfs, ksm_pages * PAGE_SIZE)

    def set_merge(self, ident: str, merge: bool, *, backend: str | None = None,
                  force: bool = False, decision: Decision | None = None,
                  mergeable_now: Mapping[str, str] | None = None,
                  audit: AuditLog | None = None, reason: str = "",
                  event: str | None = None) -> list[MergeChange]:
        """Set ``merge`` on the VM's eligible RAM backends (or one), then verify.

        With ``decision`` (the VM's policy decision: trust group, force) and
        ``mergeable_now`` (currently mergeable VMs -> trust groups), making
        the VM mergeable is refused with TrustGroupConflict when a VM of
        another trust group is mergeable, unless the decision is forced.
        With ``audit``, every backend actually changed is recorded (action
        "merge", target "VM/backend", before, after, ``reason``, ``event``)
        as soon as the hypervisor accepted it, before verification.

        Raises DomainNotFound, DomainNotRunning, UsageError (unknown backend),
        PolicyError (nosharepages, confidential guest, ineligible backend),
        TrustGroupConflict (another trust group is mergeable),
        UnmergeRefused (not enough free memory to unmerge, unless ``force``),
        VerificationError (QEMU or the kernel disagree afterwards),
        MonitorError/DeadlineExceeded from the hypervisor.
        """
        ref, facts = self._running(ident)
        return self.set_merge_observed(
            facts, self.observer.backends(ref, facts), merge, backend=backend, force=force,
            decision=decision, mergeable_now=mergeable_now, audit=audit, reason=reason,
            event=event)

    def set_merge_observed(self, facts: VmFacts, observed: Sequence[BackendView],
                           merge: bool, *, backend: str | None = None, force: bool = False,
                           decision: Decision | None = None,
                           mergeable_now: Mapping[str, str] | None = None,
                           audit: AuditLog | None = None, reason: str = "",
                           event: str | None = None) -> list[MergeChange]:
        """``set_merge`` for a VM whose facts and backends (Observer.backends) the
        caller has just read, so they are not read again before the change; the
        verification afterwards reads them anew. Same errors as ``set_merge``.
        """
        ref = facts.ref
        if facts.pid is None:
            raise DomainNotRunning(f"domain {ref.name} is not running")
        views = list(observed)
        if backend is not None:
            views = [v for v in views if v.backend.id == backend]
            if not views:
                known = ", ".join(v.backend.id for v in observed)
                raise UsageError(f"domain {ref.name} has no memory backend {backend!r} "
                                 f"(it has: {known or 'none'})")
        if merge and facts.ineligible_reason:
            raise PolicyError(f"refusing to make {ref.name} mergeable: "
                              f"{facts.ineligible_reason}")
        if merge and decision is not None:
            check_trust_groups(replace(decision, merge=True), mergeable_now or {})
        changes: list[MergeChange] = []
        todo: list[BackendView] = []
        for view in views:
            b = view.backend
            if merge and b.ineligible_reason:
                if backend is not None:
                    raise PolicyError(f"{ref.name}/{b.id} cannot be merged: "
                                      f"{b.ineligible_reason}")
                changes.append(MergeChange(ref.name, b.id, b.merge, b.merge,
                                           skipped=b.ineligible_reason))
            elif b.merge == merge and view.mg_flag in (merge, None):
                changes.append(MergeChange(ref.name, b.id, b.merge, merge))
            else:
                todo.append(view)
        if not merge and todo:
            room = self.unmerge_headroom(facts, todo)
            if not room.ok and not force:
                raise UnmergeRefused(
                    f"unmerging {ref.name} needs up to {room.need_bytes // 2**20} MiB "
                    f"plus a {room.margin_bytes // 2**20} MiB margin, but only "
                    f"{room.available_bytes // 2**20} MiB is available (MemAvailable); "
                    "free memory or pass --force")
        for view in todo:
            self.hv.set_merge(ref, view.backend.id, merge)
            log.info("%s/%s: merge %s -> %s", ref.name, view.backend.id,
                     view.backend.merge, merge)
            if audit is not None:
                audit.record("merge", f"{ref.name}/{view.backend.id}", view.backend.merge,
                             merge, reason or ("enable" if merge else "disable"),
                             event=event, vm=ref.name)
            changes.append(MergeChange(ref.name, view.backend.id, view.backend.merge, merge))
        self.verify(ref, facts, {c.backend: c.after for c in changes if c.skipped is None})
        return changes

    def verify(self, ref: VmRef, facts: VmFacts, want: dict[str, bool]) -> None:
        """Check QEMU's merge property and the kernel's mg flag match ``want``.

        Raises VerificationError naming each backend that disagrees.
        """
        views, mismatched = self.observer.mismatches(ref, facts)
        problems = []
        for view in views:
            b = view.backend
            if b.id not in want:
                continue
            if b.merge != want[b.id]:
                problems.append(f"{b.id}: QEMU reports merge={str(b.merge).lower()}")
            elif view.vma is None:
                problems.append(f"{b.id}: its mapping was not found in process {facts.pid}")
            elif b.id in mismatched:
                problems.append(f"{b.id}: the kernel's mg flag is "
                                f"{'set' if view.vma.mergeable else 'clear'}")
        if problems:
            raise VerificationError(f"{ref.name}: merge state not as asked after the change: "
                                    + "; ".join(problems))


def host_unmerge_headroom(sysfs: KsmSysfs, procfs: ProcFs) -> Headroom:
    """Memory needed to unmerge everything (run=2): one page per pages_sharing."""
    return headroom(procfs, sysfs.read_int("pages_sharing") * PAGE_SIZE)


def unmerge_all(sysfs: KsmSysfs, procfs: ProcFs, *, force: bool = False) -> int:
    """run=2 after checking the host can hold every un-shared copy.

    Returns how many pages were sharing before. Raises UnmergeRefused unless
    ``force``; KnobError/AccessDenied from the kernel.
    """
    room = host_unmerge_headroom(sysfs, procfs)
    if not room.ok and not force:
        raise UnmergeRefused(
            f"unmerging all KSM pages needs {room.need_bytes // 2**20} MiB plus a "
            f"{room.margin_bytes // 2**20} MiB margin, but only "
            f"{room.available_bytes // 2**20} MiB is available; unmerge VMs one at a "
            "time ('vmshare disable DOMAIN') or pass --force")
    before = room.need_bytes // PAGE_SIZE
    sysfs.unmerge()
    return before


def apply_knobs(sysfs: KsmSysfs, procfs: ProcFs, assignments: dict[str, str], *,
                allow_unmerge: bool = False, force: bool = False
                ) -> list[tuple[str, int | str, int | str]]:
    """Validate every assignment, then apply them all or none.

    merge_across_nodes and max_page_sharing can change only while nothing is
    merged: with ``allow_unmerge`` KSM is unmerged first (run=2, after the
    memory check) and its run state restored afterwards; without it the
    change is refused. On any failure every knob already written is put
    back. Returns (knob, before, after) for each assignment.

    Raises KnobError, UnmergeRefused, AccessDenied, KsmUnavailable.
    """
    sysfs.require()
    parsed = {name: sysfs.validate(name, value) for name, value in assignments.items()}
    snapshot = sysfs.snapshot()
    before = dict(snapshot.values)
    missing = [n for n in parsed if n not in before]
    if missing:
        raise KnobError(f"this kernel has no KSM knob {', '.join(missing)}")
    guarded = [n for n, v in parsed.items() if KNOBS[n].needs_unmerged and before[n] != v]
    unmerged = False
    if guarded and sysfs.read_int("pages_shared") > 0:
        if not allow_unmerge:
            raise KnobError(f"{', '.join(guarded)} can change only while no pages are "
                            "merged; pass --unmerge to unmerge first (then KSM resumes)")
        unmerge_all(sysfs, procfs, force=force)
        unmerged = True
    order = [n for n in parsed if n != "run"] + (["run"] if "run" in parsed else [])
    try:
        for name in order:
            sysfs.set(name, parsed[name])
        if unmerged and "run" not in parsed and before["run"] != 2:
            sysfs.set("run", before["run"])
    except VmshareError:
        try:
            sysfs.restore(snapshot)
        except VmshareError as exc:
            log.error("could not roll back KSM knobs: %s", exc)
        raise
    return [(n, before[n], sysfs.read_knob(n)) for n in parsed]
