"""The one seam between vmshare and a hypervisor (libvirt, or QEMU over QMP).

Adapters implement ``Hypervisor``; everything above talks only to this
protocol, so a scripted fake and the real thing are interchangeable.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from vmshare.config import VmPolicy
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


@runtime_checkable
class PolicyStore(Protocol):
    """An optional ability: the domain carries vmshare's policy in its own
    definition (libvirt domain metadata). Plain QEMU has no such place."""

    def get_policy(self, vm: VmRef, *, config: bool = False) -> VmPolicy | None:
        """The domain's policy element, or None. Raises PolicyError when malformed."""
        ...

    def set_policy(self, vm: VmRef, policy: VmPolicy | None, *, live: bool,
                   config: bool) -> None:
        """Write (or with None remove) the element in the live and/or persistent
        definition."""
        ...
