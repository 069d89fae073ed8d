"""The one seam between vmshare and a hypervisor (libvirt, or QEMU over QMP).

Adapters implement ``Hypervisor``; everything above talks only to this
protocol, so a scripted fake and the real thing are interchangeable.
"""

from __future__ import annotations

from typing import Any, Protocol

from vmshare.model import RamBackend, VmFacts, VmRef

DEFAULT_DEADLINE = 10.0   # seconds; every libvirt and QMP call has one


class Hypervisor(Protocol):
    """What vmshare needs from a hypervisor. All calls honour a deadline.

    Errors: DomainNotFound, DomainNotRunning, DeadlineExceeded, MonitorError,
    AccessDenied, HypervisorError (all from vmshare.errors).
    """

    uri: str

    def list_vms(self) -> list[VmRef]:
        """Every VM this hypervisor knows (running or not), sorted by name."""
        ...

    def lookup(self, ident: str) -> VmRef:
        """Find a VM by name, UUID or numeric id."""
        ...

    def facts(self, vm: VmRef) -> VmFacts:
        """Pid of its QEMU (verified to be that domain's), nosharepages, etc."""
        ...

    def ram_backends(self, vm: VmRef) -> list[RamBackend]:
        """The VM's memory backends: query-memdev joined with qom-list /objects."""
        ...

    def set_merge(self, vm: VmRef, backend_id: str, merge: bool) -> None:
        """qom-set /objects/<backend_id> merge <merge>. Does not verify."""
        ...

    def qmp(self, vm: VmRef, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        ...

    def close(self) -> None:
        ...
