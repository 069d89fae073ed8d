"""A scripted in-memory Hypervisor for fast tests of everything above the adapters.

Type-checked against the ``Hypervisor`` Protocol (the assignment at the end),
so the fake cannot drift from the seam it stands in for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vmshare.errors import DomainNotFound, DomainNotRunning, MonitorError
from vmshare.hypervisor.base import Hypervisor
from vmshare.model import RamBackend, VmFacts, VmRef


@dataclass
class FakeVm:
    ref: VmRef
    pid: int | None
    backends: list[RamBackend] = field(default_factory=list)
    nosharepages: bool = False
    launch_security: bool = False
    # The kernel side of a qom-set: (backend_id, merge) -> None, e.g. rewrite smaps.
    on_set_merge: Callable[[str, bool], None] | None = None
    # A QEMU that disagrees after qom-set: "property" accepts the command but
    # its merge property keeps the old value (and the kernel side is not
    # called); "mg" changes the property but the kernel's mg flag stays (the
    # kernel side is not called).
    disagree: str | None = None


class FakeHypervisor:
    uri = "fake:///"

    def __init__(self, vms: list[FakeVm]) -> None:
        self.vms = {v.ref.name: v for v in vms}
        self.calls: list[tuple[str, str, bool]] = []
        # Reads per VM name, so tests can catch the same read done twice.
        self.reads: Counter[tuple[str, str]] = Counter()

    def list_vms(self) -> list[VmRef]:
        return sorted((v.ref for v in self.vms.values()), key=lambda r: r.name)

    def lookup(self, ident: str) -> VmRef:
        for v in self.vms.values():
            if ident in (v.ref.name, v.ref.uuid, str(v.ref.domain_id)):
                return v.ref
        raise DomainNotFound(f"no domain named {ident!r} (name, UUID or id) on {self.uri}")

    def facts(self, vm: VmRef) -> VmFacts:
        self.reads["facts", vm.name] += 1
        v = self.vms[vm.name]
        return VmFacts(ref=v.ref, pid=v.pid, nosharepages=v.nosharepages,
                       launch_security=v.launch_security,
                       memory_bytes=sum(b.size for b in v.backends))

    def ram_backends(self, vm: VmRef) -> list[RamBackend]:
        self.reads["ram_backends", vm.name] += 1
        v = self.vms[vm.name]
        if v.pid is None:
            raise DomainNotRunning(f"domain {vm.name} is not running")
        return list(v.backends)

    def set_merge(self, vm: VmRef, backend_id: str, merge: bool) -> None:
        v = self.vms[vm.name]
        for i, b in enumerate(v.backends):
            if b.id == backend_id:
                self.calls.append((vm.name, backend_id, merge))
                if v.disagree == "property":
                    return
                v.backends[i] = replace(b, merge=merge)
                if v.on_set_merge and v.disagree != "mg":
                    v.on_set_merge(backend_id, merge)
                return
        raise MonitorError(f"QMP qom-set on domain {vm.name} failed: DeviceNotFound",
                           command="qom-set")

    def qmp(self, vm: VmRef, command: str, arguments: dict[str, Any] | None = None) -> Any:
        raise MonitorError(f"fake hypervisor has no QMP command {command}", command=command)

    def close(self) -> None:
        pass


# mypy checks the fake against the Protocol here (tests/fakes is type-checked).
_CHECKED: type[Hypervisor] = FakeHypervisor
