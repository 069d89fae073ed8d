"""Reconcile: bring each running VM to its policy, once, and say what was done.

Collect (policy.sources.survey: facts, policy, what is mergeable now, trust
groups planned over the host), decide (policy.rules.effective + plan, done by
the survey), act through the one enable/disable path the CLI uses too
(control.merge.to_decision: trust groups, unmerge headroom, qom-set, audit,
verification). Reconciling a VM that already matches
its policy changes nothing and writes nothing: the daemon can be killed and
restarted, or told twice about one event, without repeating an action.

An action is written to the state file as ``pending`` before it is made and
cleared after; every audit record of it carries an id derived from that
pending entry. A daemon killed between acting and auditing finds the action
done on restart and writes its record then, once (``complete_pending``).

Errors are per VM: a VM that vanishes is one WARNING line (traceback at
DEBUG) and skipped; a refused unmerge (not enough free memory) or a trust
group conflict is logged and retried later, never forced.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshare.config import Config
from vmshare.control.lock import ControlBusy, control_lock
from vmshare.control.merge import (
    Controller,
    MergeChange,
    MergeResult,
    NotFullyUnmergeable,
    to_decision,
)
from vmshare.daemon.keyed_audit import KeyedAudit, record_id
from vmshare.daemon.state import StateStore
from vmshare.daemon.triggers import Trigger
from vmshare.errors import (
    DomainNotFound,
    DomainNotRunning,
    HypervisorError,
    PolicyError,
    ProcessGone,
    ProcfsError,
    TrustGroupConflict,
    UnmergeRefused,
    VerificationError,
    VmshareError,
)
from vmshare.hypervisor.base import Hypervisor, ident_of
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import VmRef
from vmshare.observe.host import Observer, history_sample, not_unmergeable_warning
from vmshare.policy.sources import PolicyView, exposed_vms, mergeable_groups, survey
from vmshare.records.audit import AuditLog
from vmshare.records.history_keeper import HistoryKeeper, retention

log = logging.getLogger("vmshare.daemon")
VM_LOG = logging.getLogger("vmshare.daemon.vm")

RETRY_AFTER_S = 30.0
_GONE = (DomainNotFound, DomainNotRunning, ProcessGone)


def vm_log(name: str) -> logging.Logger:
    """The child logger of one VM (dots in names would make a deeper hierarchy)."""
    return VM_LOG.getChild(name.replace(".", "_"))


@dataclass(frozen=True)
class Outcome:
    """What reconciling one VM came to.

    status: changed | unchanged | partial | refused | vanished | failed | forgotten |
    stopped | ignored. ``partial``: policy says unmergeable and the RAM backends
    are, but other mappings of the QEMU process (VRAM, ROMs under QEMU's
    mem-merge=on) stay mergeable until the domain is adopted and restarted.
    """

    vm: str
    status: str
    detail: str = ""
    changes: tuple[MergeChange, ...] = ()


class Reconciler:
    """Decide and act for VMs of one hypervisor. Synchronous: the daemon runs it
    in one worker thread, so calls never overlap."""

    def __init__(self, hv: Hypervisor, config: Config, *, state: StateStore,
                 audit_path: Path, procfs: ProcFs | None = None,
                 sysfs: KsmSysfs | None = None, clock: Callable[[], float] = time.time,
                 retry_after: float = RETRY_AFTER_S,
                 scope: Callable[[str], bool] | None = None) -> None:
        self.config = config
        self.state = state
        self.audit_path = audit_path
        self.procfs = procfs or ProcFs()
        self.sysfs = sysfs or KsmSysfs()
        self.clock = clock
        self.retry_after = retry_after
        self.retry: dict[str, float] = {}
        # Which VMs (by name) this daemon manages; the others still count for
        # trust groups (KSM is host-wide) but are never acted on or tracked.
        self.scope: Callable[[str], bool] = scope or (lambda _name: True)
        self._audit_ids: set[str] | None = None
        # VM name -> QEMU pid already warned about as not fully unmergeable
        # (the warning is worth one line per process, not one per reconcile).
        self._exposed_warned: dict[str, int | None] = {}
        settings = config.daemon
        self.history = HistoryKeeper(
            settings.history_db, settings.history_file, retention(settings),
            AuditLog(audit_path, actor="daemon"), clock=clock) \
            if settings.history_interval > 0 else None
        self._next_sample = 0.0
        self.hv = hv

    @property
    def hv(self) -> Hypervisor:
        return self._hv

    @hv.setter
    def hv(self, hv: Hypervisor) -> None:
        self._hv = hv
        self.observer = Observer(hv, self.sysfs, self.procfs)
        self.controller = Controller(hv, self.procfs, self.observer)

    def audit_ids(self) -> set[str]:
        if self._audit_ids is None:
            self._audit_ids = AuditLog(self.audit_path, "daemon").ids()
        return self._audit_ids

    def _ident(self, ref: VmRef) -> str:
        return ident_of(self.hv, ref)

    # -- entry points ------------------------------------------------------------

    def reconcile_all(self, event: str) -> list[Outcome]:
        """Every running VM. Raises HypervisorError only when the hypervisor
        itself cannot be listed (the caller reconnects)."""
        running = [v for v in self._survey() if v.running]
        groups = mergeable_groups(running)
        exposed = exposed_vms(running)
        views = [v for v in running if self.scope(v.ref.name)]
        # Unmerge first, then merge, keeping ``groups`` current: a VM of the
        # winning trust group is checked against the host as it is after the
        # losers were made unmergeable (not refused because of them), and two
        # trust groups are never mergeable at the same moment.
        done: dict[int, Outcome] = {}
        for i in sorted(range(len(views)),
                        key=lambda i: (views[i].decision.merge, views[i].ref.name)):
            v = views[i]
            outcome = done[i] = self._act(v, event, groups, exposed)
            if outcome.status == "partial":   # still mergeable, outside its RAM
                exposed[v.ref.name] = v.other_mergeable_bytes
            if outcome.status == "changed":
                if v.decision.merge:
                    groups[v.ref.name] = v.wish.group
                else:
                    groups.pop(v.ref.name, None)
        return [done[i] for i in range(len(views))]

    def _survey(self) -> list[PolicyView]:
        running = [r for r in self.hv.list_vms() if r.running]
        return survey(self.hv, self.config, running, observer=self.observer)

    def handle(self, trigger: Trigger) -> Outcome:
        """One VM, because of ``trigger``. Never raises for per-VM trouble."""
        vlog = vm_log(trigger.vm)
        if not self.scope(trigger.vm):
            vlog.debug("not managed by this daemon; ignoring %s", trigger.event)
            return Outcome(trigger.vm, "ignored", "outside the daemon's domain scope")
        if trigger.action == "forget":
            self.retry.pop(trigger.vm, None)
            vlog.info("stopped (%s); nothing to do until it runs again", trigger.event)
            return Outcome(trigger.vm, "forgotten", trigger.event)
        event = trigger.event
        try:
            ref = self.hv.lookup(trigger.uuid or trigger.vm)
            if trigger.resets and self._reset(ref, trigger) \
                    and trigger.resets not in event:
                event = f"{event} ({trigger.resets})"   # the audit names the reset
            views = self._survey()
        except _GONE as exc:
            return self._vanished(trigger.vm, exc)
        mine = [v for v in views if self._ident(v.ref) == self._ident(ref)]
        if not mine or not mine[0].running:
            return Outcome(trigger.vm, "stopped", "not running")
        return self._act(mine[0], event, mergeable_groups(views), exposed_vms(views))

    def due(self) -> list[str]:
        """VMs whose retry time has come (they are taken off the retry list)."""
        now = self.clock()
        names = [n for n, t in self.retry.items() if t <= now]
        for n in names:
            del self.retry[n]
        return sorted(names)

    # -- lifecycle truth -----------------------------------------------------------

    def _reset(self, ref: VmRef, trigger: Trigger) -> bool:
        """Record the resetting event; False when it did not reset this VM."""
        assert trigger.resets is not None
        facts = self.hv.facts(ref)
        if trigger.check_incoming:
            status = self.hv.qmp(facts.ref, "query-status")
            if isinstance(status, dict) and status.get("status") == "postmigrate":
                return False   # the source of a migration: its memory is unchanged
        rec = self.state.reset_event(ref.name, trigger.resets, facts.pid, now=self.clock(),
                                     uuid=facts.ref.uuid)
        if rec is not None:
            vm_log(ref.name).info("%s (%s): %d KSM pages were merged before; tracking "
                                  "re-merge", trigger.resets, trigger.event,
                                  rec.previous_ksm_pages)
        self.state.save()
        return True

    def observe(self) -> None:
        """Record every running VM's KSM pages (the 'before' of the next reset).

        A VM seen with a new QEMU pid starts a "qemu-restart" record, refined
        by the lifecycle event that explains it, if one comes.
        """
        host = self.observer.host()
        now = self.clock()
        for vm in host.vms:
            if vm.facts.pid is None or not self.scope(vm.name):
                continue
            rec = self.state.observe(vm.name, vm.facts.ref.uuid, vm.facts.pid, vm.ksm_pages,
                                     now=now)
            if rec is not None:
                vm_log(vm.name).info("new QEMU process %d: %d KSM pages were merged "
                                     "before; tracking re-merge", vm.facts.pid,
                                     rec.previous_ksm_pages)
        self.state.prune(now)
        self.state.save()
        if self.history is not None and now >= self._next_sample:
            self._next_sample = now + self.config.daemon.history_interval
            try:
                self.history.record(history_sample(host, now))
            except VmshareError as exc:
                log.warning("history not recorded: %s", exc)

    # -- acting --------------------------------------------------------------------

    def _act(self, view: PolicyView, event: str, groups: dict[str, str],
             exposed: dict[str, int]) -> Outcome:
        name = view.ref.name
        vlog = vm_log(name)
        decision = view.decision
        want = decision.merge
        try:
            # The survey just read them (the common, nothing-to-do path costs no
            # second read); acting reads them afresh in the Controller anyway.
            backends = view.backends if view.backends is not None \
                else self.observer.backends(view.ref, view.facts)
            before = {v.backend.id: v.backend.merge for v in backends}
            todo = [v.backend.id for v in backends
                    if (v.ineligible_reason is None or not want)
                    and (v.backend.merge != want or v.mg_flag not in (want, None))]
            if not todo:
                self.retry.pop(name, None)
                if not want and view.other_mergeable_bytes:
                    return self._exposed(view, not_unmergeable_warning(
                        view.facts, view.other_mergeable))
                vlog.debug("already %s (%s)", "mergeable" if want else "unmergeable",
                           decision.reason)
                return Outcome(name, "unchanged", decision.reason)
            key = hashlib.sha256(f"{view.ref.uuid}|{view.facts.pid}|{want}|{self.clock()}"
                                 .encode()).hexdigest()[:16]
            pending = {"id": key, "merge": want, "event": event, "reason": decision.reason,
                       "before": before, "ident": self._ident(view.ref),
                       "time": self.clock()}
            self.state.set_pending(name, pending)
            self.state.save()
            try:
                audit = KeyedAudit(self.audit_path, "daemon", key, self.audit_ids())
                # one act at a time per host, the CLI's and the daemon's alike
                with control_lock(f"vmshare daemon: reconcile {name}"):
                    result = to_decision(self.controller, self._ident(view.ref), decision,
                                         groups, audit=audit, exposed=exposed,
                                         reason=f"policy: {decision.reason}", event=event)
            finally:
                self.state.set_pending(name, None)
                self.state.save()
        except _GONE as exc:
            return self._vanished(name, exc)
        except NotFullyUnmergeable as exc:
            self.retry.pop(name, None)   # a retry cannot help: it needs a QEMU restart
            self._log_changes(name, exc.result, event, decision.reason)
            return self._exposed(view, str(exc), exc.result)
        except ControlBusy as exc:
            self.retry[name] = self.clock() + self.retry_after
            vlog.warning("busy, retrying in %.0f s: %s", self.retry_after, exc)
            return Outcome(name, "refused", str(exc))
        except UnmergeRefused as exc:
            self.retry[name] = self.clock() + self.retry_after
            vlog.warning("not made unmergeable yet, retrying in %.0f s: %s",
                         self.retry_after, exc)
            return Outcome(name, "refused", str(exc))
        except TrustGroupConflict as exc:
            self.retry[name] = self.clock() + self.retry_after
            vlog.warning("not made mergeable: %s", exc)
            return Outcome(name, "refused", str(exc))
        except (VerificationError, PolicyError, ProcfsError) as exc:
            self.retry[name] = self.clock() + self.retry_after
            vlog.error("%s", exc)
            vlog.debug("detail", exc_info=True)
            return Outcome(name, "failed", str(exc))
        except HypervisorError as exc:
            self.retry[name] = self.clock() + self.retry_after
            vlog.error("%s", exc)
            vlog.debug("detail", exc_info=True)
            return Outcome(name, "failed", str(exc))
        self.retry.pop(name, None)
        done = self._log_changes(name, result, event, decision.reason)
        return Outcome(name, "changed" if done else "unchanged", decision.reason, done)

    def _log_changes(self, name: str, result: MergeResult, event: str,
                     reason: str) -> tuple[MergeChange, ...]:
        # A backend acted on is a change even when QEMU's property already said
        # so (the kernel's mg flag disagreed and qom-set fixed it).
        done = tuple(c for c in result.changes if c.backend in result.acted)
        for c in done:
            vm_log(name).info("%s: merge %s -> %s (%s; %s)", c.backend, _onoff(c.before),
                              _onoff(c.after), event, reason)
        return done

    def _exposed(self, view: PolicyView, detail: str,
                 result: MergeResult | None = None) -> Outcome:
        """A VM policy keeps unmergeable whose QEMU still has mergeable mappings
        outside its RAM backends: one WARNING per QEMU process."""
        name = view.ref.name
        if self._exposed_warned.get(name) != view.facts.pid:
            self._exposed_warned[name] = view.facts.pid
            vm_log(name).warning("%s", detail)
        done = tuple(c for c in result.changes if c.backend in result.acted) if result else ()
        return Outcome(name, "partial", detail, done)

    def _vanished(self, name: str, exc: VmshareError) -> Outcome:
        self.retry.pop(name, None)
        vlog = vm_log(name)
        vlog.warning("vanished, skipped: %s", exc)
        vlog.debug("detail", exc_info=exc)
        return Outcome(name, "vanished", str(exc))

    def complete_pending(self) -> int:
        """Audit actions a previous run made but did not record (killed in between).

        Returns the number of records written. Each is written at most once,
        whatever happens: ids already in the log are skipped.
        """
        written = 0
        for name, p in self.state.pendings().items():
            try:
                ref = self.hv.lookup(str(p.get("ident") or name))
                facts = self.hv.facts(ref)
                views = self.observer.backends(ref, facts) if facts.pid else []
            except (VmshareError, OSError) as exc:
                vm_log(name).warning("cannot check an action of the previous run: %s", exc)
                views = []
            want = bool(p.get("merge"))
            raw_before = p.get("before")
            before: dict[str, Any] = raw_before if isinstance(raw_before, dict) else {}
            audit = KeyedAudit(self.audit_path, "daemon", str(p.get("id")), self.audit_ids())
            for v in views:
                b = v.backend
                if b.id in before and before[b.id] != want and b.merge == want:
                    target = f"{name}/{b.id}"
                    if record_id(audit.key, target, want) in self.audit_ids():
                        continue
                    audit.record("merge", target, before[b.id], want,
                                 f"policy: {p.get('reason', '')} (done before the daemon "
                                 "was restarted)", event=str(p.get("event")), vm=name)
                    written += 1
            self.state.set_pending(name, None)
        self.state.save()
        return written


def _onoff(value: bool) -> str:
    return "on" if value else "off"


@dataclass
class Stats:
    """Counters the daemon logs at exit and tests read."""

    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, outcomes: list[Outcome] | Outcome) -> None:
        for o in outcomes if isinstance(outcomes, list) else [outcomes]:
            self.outcomes[o.status] = self.outcomes.get(o.status, 0) + 1
