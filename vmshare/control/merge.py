"""The one path that changes a VM's merge state: policy check, act, verify, audit.

``enable``, ``disable`` and ``to_decision`` are what the CLI (``vmshare
enable|disable``, ``policy set --apply``) and the daemon's reconcile call;
each returns a ``MergeResult``. Under them ``Controller`` acts:

* policy: a VM that can never merge (nosharepages, confidential guest) is
  refused; making a VM mergeable while a VM of another trust group is
  mergeable is refused naming that VM, unless the VM's policy has force
  (recorded in the result and the audit reason);
* memory: unmerging is refused when the host lacks the memory to un-share
  the VM's pages (the OOM worry of the 2009 KSM thread), unless forced;
* act: ``qom-set /objects/<id> merge`` per RAM backend that differs;
* audit: one record per backend actually changed, written as soon as the
  hypervisor accepted it, before verification (so a failed verification
  still leaves the change on record);
* verify: QEMU's ``merge`` property (query-memdev) and the kernel's ``mg``
  VmFlag of the backend's mapping, read afresh; a mismatch is a
  VerificationError, never a success. A VM is unmergeable only when no
  mapping of its QEMU process is mergeable: under QEMU's machine default
  mem-merge=on, VRAM and ROMs stay mergeable whatever the backends say, and
  disabling such a VM raises NotFullyUnmergeable naming the fix
  (``vmshare policy adopt``: vmshare.control.adopt).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from vmshare.config import Config
from vmshare.errors import (
    DomainNotRunning,
    PolicyError,
    UnmergeRefused,
    UsageError,
    VerificationError,
)
from vmshare.hypervisor.base import Hypervisor
from vmshare.ksm.procfs import Headroom, ProcFs, headroom
from vmshare.model import PAGE_SIZE, VmFacts, VmRef
from vmshare.observe.attribution import attribute
from vmshare.observe.host import BackendView, Mappings, Observer, not_unmergeable_warning
from vmshare.policy.rules import Decision, check_trust_groups
from vmshare.policy.sources import merge_request
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


@dataclass(frozen=True)
class MergeResult:
    """What one enable/disable came to, verified.

    ``forced`` names each check that force let the change past (a trust
    group, the free-memory check), in words an operator reads; ``acted``
    are the backends qom-set was sent to (a change even when QEMU's property
    already said so and only the kernel's mg flag disagreed).
    """

    vm: str
    merge: bool
    changes: tuple[MergeChange, ...]
    acted: tuple[str, ...] = ()
    forced: tuple[str, ...] = ()
    # Mergeable mappings of the QEMU process outside its RAM backends, as verified.
    other_mergeable_bytes: int = 0

    @property
    def changed(self) -> tuple[MergeChange, ...]:
        return tuple(c for c in self.changes if c.changed)


class NotFullyUnmergeable(VerificationError):
    """The RAM backends were made unmergeable, but other mappings of the QEMU
    process (VRAM, ROMs under QEMU's mem-merge=on) stay mergeable. ``result``
    is what was done; its changes are audited."""

    def __init__(self, message: str, result: MergeResult) -> None:
        super().__init__(message)
        self.result = result


class Controller:
    """Acts on one hypervisor's VMs and verifies; see the module docstring."""

    def __init__(self, hv: Hypervisor, procfs: ProcFs, observer: Observer) -> None:
        self.hv = hv
        self.procfs = procfs
        self.observer = observer

    def running(self, ident: str) -> tuple[VmRef, VmFacts]:
        """The VM and its facts. Raises DomainNotFound, DomainNotRunning."""
        ref = self.hv.lookup(ident)
        facts = self.hv.facts(ref)
        if facts.pid is None:
            raise DomainNotRunning(f"domain {ref.name} is not running")
        return ref, facts

    def unmerge_headroom(self, facts: VmFacts, views: Sequence[BackendView]) -> Headroom:
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
        att = attribute(entries, self.procfs.kpageflags, self.procfs.kpagecount,
                        anon_flags=self.procfs.anon_page_flags)
        ksm_pages = sum(f.ksm_pages for f in att.per_vm.values())
        return headroom(self.procfs, ksm_pages * PAGE_SIZE)

    def set_merge(self, ident: str, merge: bool, *, backend: str | None = None,
                  force: bool = False) -> list[MergeChange]:
        """Set ``merge`` on the VM's eligible RAM backends (or one) and verify,
        without policy or audit (the demo's own guests). Same errors as ``act``."""
        ref, facts = self.running(ident)
        return list(self.act(facts, self.observer.backends(ref, facts), merge,
                             backend=backend, force=force).changes)

    def act(self, facts: VmFacts, observed: Sequence[BackendView], merge: bool, *,
            backend: str | None = None, force: bool = False,
            decision: Decision | None = None, mergeable_now: Mapping[str, str] | None = None,
            exposed: Mapping[str, int] | None = None, audit: AuditLog | None = None,
            reason: str = "", event: str | None = None) -> MergeResult:
        """Set ``merge`` on the VM's eligible RAM backends (or one), then verify.

        ``observed`` are the VM's backends as just read (Observer.backends);
        they are not read again before acting, but are read afresh to verify.
        With ``decision`` (trust group, force) and ``mergeable_now`` (other
        mergeable VMs -> trust groups), making the VM mergeable is refused
        when a VM of another trust group is mergeable, unless the decision is
        forced (``exposed``: VMs mergeable only outside their RAM backends, so
        the refusal names the fix). With ``audit``, each backend acted on is
        recorded once. Making the whole VM unmergeable is verified over every
        mapping of its QEMU process: mergeable ones outside the RAM backends
        (VRAM, ROMs under QEMU's mem-merge=on) raise NotFullyUnmergeable
        after the backends were changed.

        Raises DomainNotRunning, UsageError (unknown backend), PolicyError
        (nosharepages, confidential guest, ineligible backend),
        TrustGroupConflict, UnmergeRefused (not enough free memory to unmerge,
        unless ``force``), VerificationError (QEMU or the kernel disagree
        afterwards; NotFullyUnmergeable), MonitorError/DeadlineExceeded from
        the hypervisor.
        """
        ref = facts.ref
        if facts.pid is None:
            raise DomainNotRunning(f"domain {ref.name} is not running")
        views = _selected(ref, observed, backend)
        if merge and facts.ineligible_reason:
            raise PolicyError(f"refusing to make {ref.name} mergeable: "
                              f"{facts.ineligible_reason}")
        if merge and decision is not None:
            check_trust_groups(replace(decision, merge=True), mergeable_now or {}, exposed)
        changes, todo = _plan_backends(ref, views, merge, single=backend is not None)
        forced: list[str] = []
        if not merge and todo:
            room = self.unmerge_headroom(facts, todo)
            if not room.ok:
                if not force:
                    raise UnmergeRefused(
                        f"unmerging {ref.name} needs up to {room.need_bytes // 2**20} MiB "
                        f"plus a {room.margin_bytes // 2**20} MiB margin, but only "
                        f"{room.available_bytes // 2**20} MiB is available (MemAvailable); "
                        "free memory or pass --force")
                forced.append(f"the free-memory check: unmerging needs up to "
                              f"{room.need_bytes // 2**20} MiB plus a "
                              f"{room.margin_bytes // 2**20} MiB margin, "
                              f"{room.available_bytes // 2**20} MiB is available")
        why = reason or ("enable" if merge else "disable")
        if forced:
            why += f"; forced past {forced[0]}"
        for view in todo:
            self.hv.set_merge(ref, view.backend.id, merge)
            log.info("%s/%s: merge %s -> %s", ref.name, view.backend.id,
                     view.backend.merge, merge)
            if audit is not None:
                audit.record("merge", f"{ref.name}/{view.backend.id}", view.backend.merge,
                             merge, why, event=event, vm=ref.name)
            changes.append(MergeChange(ref.name, view.backend.id, view.backend.merge, merge))
        maps = self.verify(ref, facts, {c.backend: c.after for c in changes
                                        if c.skipped is None})
        result = MergeResult(ref.name, merge, tuple(changes), tuple(v.backend.id for v in todo),
                             tuple(forced), maps.other_mergeable_bytes)
        if not merge and backend is None and maps.other_mergeable:
            raise NotFullyUnmergeable(
                f"{ref.name}: {not_unmergeable_warning(facts, maps.other_mergeable)}", result)
        return result

    def verify(self, ref: VmRef, facts: VmFacts, want: dict[str, bool]) -> Mappings:
        """Check QEMU's merge property and the kernel's mg flag match ``want``;
        return every mapping as read for it (other mergeable ones included).

        Raises VerificationError naming each backend that disagrees.
        """
        maps, mismatched = self.observer.mismatches(ref, facts)
        problems = []
        for view in maps.backends:
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
        return maps


def _selected(ref: VmRef, observed: Sequence[BackendView],
              backend: str | None) -> list[BackendView]:
    """The backends to act on: all, or the one named. Raises UsageError."""
    if backend is None:
        return list(observed)
    views = [v for v in observed if v.backend.id == backend]
    if not views:
        known = ", ".join(v.backend.id for v in observed)
        raise UsageError(f"domain {ref.name} has no memory backend {backend!r} "
                         f"(it has: {known or 'none'})")
    return views


def _plan_backends(ref: VmRef, views: Sequence[BackendView], merge: bool, *,
                   single: bool) -> tuple[list[MergeChange], list[BackendView]]:
    """Backends already as asked (or skipped as ineligible), and those to act on.

    Raises PolicyError for an ineligible backend named on its own (``single``).
    """
    changes: list[MergeChange] = []
    todo: list[BackendView] = []
    for view in views:
        b = view.backend
        if merge and b.ineligible_reason:
            if single:
                raise PolicyError(f"{ref.name}/{b.id} cannot be merged: {b.ineligible_reason}")
            changes.append(MergeChange(ref.name, b.id, b.merge, b.merge,
                                       skipped=b.ineligible_reason))
        elif b.merge == merge and view.mg_flag in (merge, None):
            changes.append(MergeChange(ref.name, b.id, b.merge, merge))
        else:
            todo.append(view)
    return changes, todo


# ---------------------------------------------------------------- the one path
def _pinned(ref: VmRef) -> str:
    """The UUID pins the domain found, unless it is QEMU's all-zero default."""
    return ref.uuid if ref.uuid and ref.uuid.strip("0-") else ref.name


def enable(ctl: Controller, config: Config, ident: str, *, audit: AuditLog | None,
           backend: str | None = None, reason: str = "vmshare enable") -> MergeResult:
    """Make one VM's RAM mergeable if policy allows: the host switch, what the
    domain can never do, and trust groups over every VM on the host.

    Raises PolicyError (host switch off, nosharepages, confidential guest),
    TrustGroupConflict (naming the mergeable VM of another trust group),
    DomainNotFound, DomainNotRunning, UsageError, VerificationError, and the
    hypervisor's errors.
    """
    ref = ctl.hv.lookup(ident)
    req = merge_request(ctl.hv, config, ref, observer=ctl.observer)
    forced: list[str] = []
    if req.forced_past:
        forced.append(f"{req.forced_past} of trust group "
                      f"{req.mergeable_now[req.forced_past]!r} is mergeable, but the "
                      f"policy of {ref.name} (trust group {req.decision.group!r}) has force")
        reason += f"; forced: {forced[0]}"
    # The survey behind the request read this VM's facts and backends a
    # moment ago: act on them rather than read them again.
    if req.view.backends is not None:
        facts, observed = req.view.facts, req.view.backends
    else:
        facts = ctl.running(_pinned(ref))[1]
        observed = tuple(ctl.observer.backends(facts.ref, facts))
    result = ctl.act(facts, observed, True, backend=backend, decision=req.decision,
                     mergeable_now=req.mergeable_now, exposed=req.exposed, audit=audit,
                     reason=reason)
    return replace(result, forced=tuple(forced) + result.forced)


def disable(ctl: Controller, ident: str, *, audit: AuditLog | None,
            backend: str | None = None, force: bool = False,
            reason: str = "vmshare disable") -> MergeResult:
    """Make one VM's RAM unmergeable. Never blocked by policy; refused when the
    host lacks the memory to un-share its pages, unless ``force`` (then the
    result and the audit reason say so).

    Raises UnmergeRefused, DomainNotFound, DomainNotRunning, UsageError,
    VerificationError (NotFullyUnmergeable: mappings outside the RAM
    backends stay mergeable), and the hypervisor's errors.
    """
    ref, facts = ctl.running(ident)
    return ctl.act(facts, ctl.observer.backends(ref, facts), False, backend=backend,
                   force=force, audit=audit, reason=reason)


def to_decision(ctl: Controller, ident: str, decision: Decision,
                mergeable_now: Mapping[str, str], *, audit: AuditLog | None,
                reason: str, event: str | None = None,
                exposed: Mapping[str, int] | None = None) -> MergeResult:
    """Bring one running VM to a decision already planned over the whole host
    (the daemon: ``policy.plan`` with trust groups). The VM is read afresh;
    an unmerge is never forced. ``mergeable_now`` maps the other mergeable
    VMs to their trust groups. Same errors as ``enable`` and ``disable``.
    """
    ref, facts = ctl.running(ident)
    others = {n: g for n, g in mergeable_now.items() if n != ref.name}
    return ctl.act(facts, ctl.observer.backends(ref, facts), decision.merge,
                   decision=decision, mergeable_now=others if decision.merge else None,
                   exposed=exposed, audit=audit, reason=reason, event=event)

