"""Collect one metrics snapshot (vmshare.present.metrics.Snapshot): the host view,
each VM's policy decision (its trust group, whether it should merge), ksmd's CPU
time and whether a vmshare tuner runs. Used by `vmshare metrics` and the daemon.

What fails is recorded in the snapshot, one line per part, and the rest is
still collected: with libvirt down the kernel's counters are still served; a
VM that vanishes mid-collection is left out.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Sequence

from vmshare.config import Config
from vmshare.errors import VmshareError
from vmshare.hypervisor.base import Hypervisor
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.observe.host import HostView, Observer
from vmshare.policy.sources import survey
from vmshare.present.metrics import Snapshot, VmPolicyFacts
from vmshare.tuner.loop import KsmdClock, tuner_holder

log = logging.getLogger("vmshare.daemon.exporter")


class SnapshotSource:
    """Takes snapshots of one host for the exporter; ``scope``: domain name globs
    (none: every domain)."""

    def __init__(self, hv: Hypervisor, sysfs: KsmSysfs, procfs: ProcFs, config: Config, *,
                 scope: Sequence[str] = ()) -> None:
        self.hv = hv
        self.sysfs = sysfs
        self.procfs = procfs
        self.config = config
        self.scope = tuple(scope)
        self.observer = Observer(hv, sysfs, procfs)
        self.clock = KsmdClock(procfs)

    def __call__(self) -> Snapshot:
        errors: list[str] = []
        host = self._host(errors)
        policy: dict[str, VmPolicyFacts] = {}
        if host.vms:
            try:
                everyone = self.hv.list_vms()
                refs = [v.facts.ref for v in host.vms if v.facts.pid is not None]
                for view in survey(self.hv, self.config, refs, observer=self.observer,
                                   others=everyone):
                    policy[view.ref.name] = VmPolicyFacts(view.decision.group,
                                                          view.decision.merge)
            except VmshareError as exc:
                errors.append(f"policy: {exc}")
        ksmd: float | None = None
        if host.ksm_available:
            try:
                ksmd = self.clock.seconds()
            except VmshareError as exc:
                errors.append(f"ksmd CPU: {exc}")
        tuner: int | None = None
        try:
            tuner = tuner_holder()
        except VmshareError as exc:
            errors.append(f"tuner lock: {exc}")
        for problem in errors:
            log.warning("metrics: %s", problem)
        return Snapshot(host=host, taken_at=time.time(), tuner_pid=tuner,
                        ksmd_cpu_seconds=ksmd, policy=policy, errors=tuple(errors))

    def _names(self) -> list[str] | None:
        if not self.scope:
            return None
        return [r.name for r in self.hv.list_vms()
                if any(fnmatch.fnmatchcase(r.name, g) for g in self.scope)]

    def _host(self, errors: list[str]) -> HostView:
        try:
            names = self._names()
            if names == []:
                return self._kernel_only(errors)
            return self.observer.host(names)
        except VmshareError as exc:
            errors.append(f"VMs: {exc}")
            return self._kernel_only(errors)

    def _kernel_only(self, errors: list[str]) -> HostView:
        try:
            ok = self.sysfs.available()
            return HostView(counters=self.sysfs.counters() if ok else {},
                            knobs=self.sysfs.knobs() if ok else {}, vms=(), ksm_available=ok)
        except VmshareError as exc:
            errors.append(f"KSM: {exc}")
            return HostView(counters={}, knobs={}, vms=(), ksm_available=False)
