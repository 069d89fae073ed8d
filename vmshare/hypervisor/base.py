"""The one seam between vmshare and a hypervisor (libvirt, or QEMU over QMP).

Adapters implement ``Hypervisor``; everything above talks only to this
protocol, so a scripted fake and the real thing are interchangeable.
Abilities only some adapters have are second Protocols, checked with
``isinstance`` (they are runtime-checkable), never with getattr/hasattr:

* ``PolicyStore``: the domain carries vmshare's policy (libvirt metadata);
* ``AddressedHypervisor``: a VM has a stable address other than its name or
  UUID (``QmpFleet``: the socket path, which keeps two QEMUs of one VM apart
  during a migration on one host);
* ``DefinitionStore``: the domain has a persistent definition vmshare can
  bring to ``<nosharepages/>`` (``adopt``);
* ``DomainLifecycle``: start a transient domain from XML and destroy it
  (the demo and the tests).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from vmshare.config import VmPolicy
from vmshare.model import Adoption, RamBackend, VmFacts, VmRef

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


@runtime_checkable
class AddressedHypervisor(Protocol):
    """An optional ability: each VM has an address of its own that later calls
    (``lookup``) reach it by, unlike its name, which two processes may share."""

    def ident_of(self, vm: VmRef) -> str:
        """The address of ``vm``. Raises DomainNotFound when it is gone."""
        ...


@runtime_checkable
class DefinitionStore(Protocol):
    """An optional ability: domains have persistent definitions vmshare may
    change (libvirt). Plain QEMU has none: its options are its command line."""

    def adopt(self, vm: VmRef) -> Adoption:
        """Bring the persistent definition to ``<nosharepages/>`` (see
        vmshare.hypervisor.metadata). Raises DomainNotFound, PolicyError,
        DeadlineExceeded, HypervisorError."""
        ...


@runtime_checkable
class DomainLifecycle(Protocol):
    """An optional ability: start a transient domain and power one off."""

    def create_transient(self, xml: str) -> VmRef:
        """Start a transient domain from XML. Raises HypervisorError."""
        ...

    def destroy(self, vm: VmRef) -> None:
        """Power a domain off at once; one already gone is not an error."""
        ...


def ident_of(hv: Hypervisor, vm: VmRef) -> str:
    """The identifier that reaches ``vm`` again through ``hv.lookup``: the
    adapter's own address when it has one, else the UUID, else the name."""
    if isinstance(hv, AddressedHypervisor):
        return hv.ident_of(vm)
    return vm.uuid or vm.name
