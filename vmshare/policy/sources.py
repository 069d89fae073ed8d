"""Gather what policy decisions need, then decide: the collect step for vmshare.policy.rules.

For each VM: its facts, its own policy (libvirt domain metadata, when the
adapter has ``get_policy``; plain QEMU has none and the config file still
applies), its config-file table, whether it is mergeable right now (any of
its eligible RAM backends has merge=on, read through Observer.backends), and
the decision: ``policy.effective`` per VM, then ``policy.plan`` over the
running VMs with the currently mergeable ones and their trust groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from vmshare.config import Config, HostPolicy, VmPolicy
from vmshare.errors import (
    DomainNotFound,
    DomainNotRunning,
    HypervisorError,
    PolicyError,
    ProcessGone,
)
from vmshare.hypervisor.base import Hypervisor, PolicyStore
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import Vma, VmFacts, VmRef
from vmshare.observe.host import BackendView, Observer
from vmshare.policy.rules import Decision, blocking_vm, effective, plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyView:
    """One VM's policy sources and decision, for ``policy show`` and the daemon."""

    ref: VmRef
    facts: VmFacts
    own: VmPolicy | None          # domain metadata
    table: VmPolicy | None        # [vm."NAME-or-UUID"] in the config file
    wish: Decision                # effective(), before trust groups
    decision: Decision            # after plan() (running VMs), else the wish
    mergeable_now: bool | None    # None: not running or unknown
    warnings: tuple[str, ...] = ()
    backends: tuple[BackendView, ...] | None = None   # as read for mergeable_now; None: not read
    # Mergeable mappings of its QEMU outside the RAM backends (VRAM, ROMs under
    # QEMU's mem-merge=on): they make the VM mergeable whatever its backends say.
    other_mergeable: tuple[Vma, ...] = ()

    @property
    def other_mergeable_bytes(self) -> int:
        return sum(v.size for v in self.other_mergeable)

    @property
    def running(self) -> bool:
        return self.facts.pid is not None


def vm_policy(hv: Hypervisor, ref: VmRef) -> VmPolicy | None:
    """The VM's own policy from its domain metadata, or None (none set, or an
    adapter without metadata). Raises PolicyError for a malformed element."""
    if not isinstance(hv, PolicyStore):
        return None
    return hv.get_policy(ref)


def table_policy(host: HostPolicy, ref: VmRef) -> VmPolicy | None:
    return host.vms.get(ref.name) or host.vms.get(ref.uuid)


def _default_observer(hv: Hypervisor) -> Observer:
    return Observer(hv, KsmSysfs(), ProcFs())


def is_mergeable_now(backends: Iterable[BackendView], other_mergeable_bytes: int = 0) -> bool:
    """Any eligible RAM backend of the running VM has merge=on, or any other
    mapping of its QEMU process is mergeable."""
    return other_mergeable_bytes > 0 or any(v.backend.merge and v.ineligible_reason is None
                                            for v in backends)


def survey(hv: Hypervisor, config: Config, refs: Iterable[VmRef], *,
           observer: Observer | None = None,
           others: Iterable[VmRef] | None = None) -> list[PolicyView]:
    """Policy views of ``refs``. Trust groups are planned over ``refs`` plus
    ``others`` (pass every VM on the host so a blocker outside ``refs`` counts).

    Per-VM trouble (a domain that vanished, a backend query that failed) is a
    warning on that VM, not an error; a malformed policy element is reported
    the same way and the VM treated as having none. Raises HypervisorError
    only for failures of the whole connection.
    """
    obs = observer or _default_observer(hv)
    wanted = list(refs)
    names = {r.name for r in wanted}
    extra = [r for r in (others or ()) if r.name not in names]
    views: list[PolicyView] = []
    for ref in wanted + extra:
        warnings: list[str] = []
        try:
            facts = obs.facts(ref)
        except (DomainNotRunning, ProcessGone) as exc:
            warnings.append(f"no QEMU process found: {exc}")
            facts = VmFacts(ref=ref, pid=None)
        except DomainNotFound:
            continue   # undefined since it was listed
        try:
            own = vm_policy(hv, facts.ref)
        except PolicyError as exc:
            warnings.append(f"ignoring its policy metadata: {exc}")
            own = None
        wish = effective(facts, own, config.host)
        mergeable: bool | None = None
        backends: tuple[BackendView, ...] | None = None
        strays: tuple[Vma, ...] = ()
        if facts.pid is not None:
            try:
                maps = obs.mappings(facts.ref, facts)
                backends, strays = maps.backends, maps.other_mergeable
                mergeable = is_mergeable_now(backends, maps.other_mergeable_bytes)
            except (HypervisorError, ProcessGone) as exc:
                warnings.append(f"cannot read its RAM backends: {exc}")
        views.append(PolicyView(facts.ref, facts, own, table_policy(config.host, facts.ref),
                                wish, wish, mergeable, tuple(warnings), backends, strays))
    mergeable_now = mergeable_groups(views)
    planned = {d.vm: d for d in plan([v.wish for v in views if v.running], mergeable_now)}
    out = [replace(v, decision=planned.get(v.ref.name, v.wish)) for v in views]
    return [v for v in out if v.ref.name in names]


def mergeable_groups(views: Iterable[PolicyView]) -> dict[str, str]:
    """Currently mergeable VMs -> their trust groups."""
    return {v.ref.name: v.wish.group for v in views if v.mergeable_now}


def exposed_vms(views: Iterable[PolicyView]) -> dict[str, int]:
    """VMs mergeable only outside their RAM backends -> the bytes that are."""
    return {v.ref.name: v.other_mergeable_bytes for v in views
            if v.other_mergeable_bytes and v.backends is not None
            and not is_mergeable_now(v.backends)}


@dataclass(frozen=True)
class MergeRequest:
    """What an operator's ``enable`` of one VM is checked against."""

    view: PolicyView
    decision: Decision               # the VM's trust group and force, merge=True
    mergeable_now: dict[str, str]    # other mergeable VMs -> trust groups
    forced_past: str | None          # the VM force let it ignore, if any
    exposed: dict[str, int] = field(default_factory=dict)   # see exposed_vms


def merge_request(hv: Hypervisor, config: Config, ref: VmRef, *,
                  observer: Observer | None = None) -> MergeRequest:
    """Check that ``ref`` may be made mergeable now.

    Raises PolicyError when the host-wide switch is off or the domain can
    never be merged. Trust groups are left to control.merge.Controller.act (it gets
    ``decision`` and ``mergeable_now``); ``forced_past`` names the VM of
    another group that force overrides, so the caller can say so.
    """
    views = survey(hv, config, hv.list_vms(), observer=observer)
    view = next((v for v in views if v.ref.uuid == ref.uuid or v.ref.name == ref.name), None)
    if view is None:
        raise DomainNotFound(f"domain {ref.name} vanished")
    if not config.host.enabled or view.facts.ineligible_reason:
        raise PolicyError(f"refusing to make {ref.name} mergeable: {view.wish.reason}")
    decision = replace(view.wish, merge=True)
    now = {name: group for name, group in mergeable_groups(views).items()
           if name != ref.name}
    forced_past = None
    if decision.forced:
        forced_past = blocking_vm(replace(decision, forced=False), now)
    return MergeRequest(view, decision, now, forced_past, exposed_vms(views))
