"""Hypervisor adapters: libvirt (``libvirt.py``), plain QEMU over QMP (``qmp.py``)
and every plain QEMU a daemon watches behind one adapter (``qmp_fleet.py``).
The ``Hypervisor`` Protocol and the optional abilities some adapters add
(``PolicyStore``, ``AddressedHypervisor``, ``DomainLifecycle``) are in ``base.py``.

``connect`` picks one. The adapter modules are imported lazily, so a host
without libvirt-python can still drive a plain QEMU, and the reverse.
"""

from __future__ import annotations

from vmshare.errors import UsageError
from vmshare.hypervisor.base import DEFAULT_DEADLINE, Hypervisor

__all__ = ["DEFAULT_DEADLINE", "Hypervisor", "connect"]


def connect(uri: str | None = None, qmp_socket: str | None = None,
            deadline: float = DEFAULT_DEADLINE) -> Hypervisor:
    """A connected hypervisor adapter.

    ``qmp_socket`` selects a plain QEMU's QMP socket; otherwise ``uri`` (default
    ``qemu:///system``) selects libvirt. Both at once is a UsageError; so is a
    non-positive deadline. Connection errors: HypervisorError, AccessDenied,
    DeadlineExceeded (libvirt connects here; QMP connects on each call).
    """
    if uri is not None and qmp_socket is not None:
        raise UsageError("give either a libvirt URI or a QMP socket, not both")
    if (uri is not None and not uri.strip()) or (qmp_socket is not None
                                                 and not qmp_socket.strip()):
        raise UsageError("empty libvirt URI or QMP socket: leave the option out for the "
                         "default")
    if not deadline > 0:
        raise UsageError(f"deadline must be positive, not {deadline!r}")
    if qmp_socket is not None:
        from vmshare.hypervisor.qmp import QmpHypervisor
        return QmpHypervisor(qmp_socket, deadline)
    from vmshare.hypervisor.libvirt import LibvirtHypervisor
    return LibvirtHypervisor(uri or "qemu:///system", deadline)
