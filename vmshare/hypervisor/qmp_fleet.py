"""Plain QEMU processes found by socket globs, behind one ``Hypervisor``.

``poll_socket`` runs one short QMP session on a socket (identity, run state,
pid, backends, the events seen meanwhile) and returns a ``Snapshot``: QEMU's
QMP server serves one client at a time, so nothing here holds a session
(the CLI's ``vmshare --qmp`` and operators' own tools need the socket too).
``QmpFleet`` puts the latest snapshot of every watched socket behind the
``Hypervisor`` Protocol so that policy, trust groups and observation work
over plain QEMU as over libvirt; each call opens its own short session.
The daemon's ``qmp_watch`` does the polling and turns changes into triggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

from vmshare.errors import DomainNotFound, HypervisorError
from vmshare.hypervisor.base import AddressedHypervisor, Hypervisor
from vmshare.hypervisor.qmp import ZERO_UUID, QmpHypervisor
from vmshare.model import RamBackend, VmFacts, VmRef

log = logging.getLogger("vmshare.hypervisor.qmp_fleet")

POLL_DEADLINE_S = 3.0
EVENT_GRACE_S = 0.02
# Which of two sockets naming the same VM is "the" VM (a migration on one host).
_STATUS_RANK = {"running": 0, "paused": 1, "suspended": 1, "prelaunch": 2, "inmigrate": 3,
                "postmigrate": 4}


@dataclass(frozen=True)
class Snapshot:
    path: str
    name: str
    uuid: str
    pid: int
    status: str
    backends: tuple[str, ...]
    migrated_in: bool = False    # this process completed an incoming migration

    @property
    def ref(self) -> VmRef:
        return VmRef(name=self.name, uuid=self.uuid, domain_id=None, running=True)


async def poll_socket(path: str, deadline: float = POLL_DEADLINE_S
                      ) -> tuple[Snapshot, list[dict[str, Any]]]:
    """One short session: identity, run state, pid, backends, events seen meanwhile.

    Raises HypervisorError (DeadlineExceeded when busy) when it cannot.
    """
    q = QmpHypervisor(path, deadline)
    try:
        name_r = await q.execute("query-name")
        uuid_r = await q.execute("query-uuid")
        status_r = await q.execute("query-status")
        memdevs = await q.execute("query-memdev")
        migrate_r = await q.execute("query-migrate")
        pid = q.peer_pid or 0
        events: list[dict[str, Any]] = []
        gen = cast(AsyncGenerator[dict[str, Any], None], q.events())
        with contextlib.suppress(TimeoutError, StopAsyncIteration, HypervisorError):
            while True:
                events.append(await asyncio.wait_for(gen.__anext__(), EVENT_GRACE_S))
        await gen.aclose()
    finally:
        await q.aclose()
    name = name_r.get("name") if isinstance(name_r, dict) else None
    if not isinstance(name, str) or not name:
        name = os.path.splitext(os.path.basename(path))[0]
    uuid = uuid_r.get("UUID") if isinstance(uuid_r, dict) else None
    status = status_r.get("status") if isinstance(status_r, dict) else None
    ids = tuple(sorted(str(m.get("id")) for m in memdevs if isinstance(m, dict))) \
        if isinstance(memdevs, list) else ()
    # The source of a completed migration reports its statistics ("ram",
    # "total-time"); the destination reports the bare status.
    migrated_in = isinstance(migrate_r, dict) and migrate_r.get("status") == "completed" \
        and "ram" not in migrate_r and status != "postmigrate"
    return Snapshot(path, name, uuid if isinstance(uuid, str) else ZERO_UUID, pid,
                    str(status or "unknown"), ids, migrated_in), events


class QmpFleet:
    """``Hypervisor`` over every watched QMP socket (one VM each).

    Refs are the sockets' latest snapshots; a VM is addressed by name, UUID
    or socket path (``ident_of`` gives the path, so two sockets naming the
    same VM during a migration on one host stay apart). Calls use the
    synchronous QmpHypervisor facade: run them off the event loop.
    """

    def __init__(self, deadline: float = 10.0) -> None:
        self.uri = "qmp+fleet:"
        self.deadline = deadline
        self.snapshots: dict[str, Snapshot] = {}

    def _preferred(self) -> dict[str, Snapshot]:
        best: dict[str, Snapshot] = {}
        for snap in sorted(self.snapshots.values(), key=lambda s: s.path):
            cur = best.get(snap.name)
            if cur is None or _STATUS_RANK.get(snap.status, 5) < _STATUS_RANK.get(cur.status, 5):
                best[snap.name] = snap
        return best

    def list_vms(self) -> list[VmRef]:
        return sorted((s.ref for s in self._preferred().values()), key=lambda r: r.name)

    def _snap(self, ident: str) -> Snapshot:
        if ident in self.snapshots:
            return self.snapshots[ident]
        for snap in self._preferred().values():
            if ident == snap.name or (snap.uuid != ZERO_UUID and ident == snap.uuid):
                return snap
        raise DomainNotFound(f"no watched QEMU runs {ident!r}")

    def _hv(self, vm: VmRef) -> tuple[QmpHypervisor, VmRef]:
        """A short-lived adapter on the VM's socket, and the ref it knows the VM by."""
        snap = self._by_ref(vm)
        return QmpHypervisor(snap.path, self.deadline), snap.ref

    def _by_ref(self, vm: VmRef) -> Snapshot:
        return self._snap(vm.uuid if vm.uuid.startswith("/") else vm.name)

    def lookup(self, ident: str) -> VmRef:
        snap = self._snap(ident)
        if ident == snap.path:   # keep the path in the ref so later calls reach this socket
            return VmRef(name=snap.name, uuid=snap.path, domain_id=None, running=True)
        return snap.ref

    def ident_of(self, vm: VmRef) -> str:
        return self._by_ref(vm).path

    def facts(self, vm: VmRef) -> VmFacts:
        hv, ref = self._hv(vm)
        return hv.facts(ref)

    def ram_backends(self, vm: VmRef) -> list[RamBackend]:
        hv, ref = self._hv(vm)
        return hv.ram_backends(ref)

    def set_merge(self, vm: VmRef, backend_id: str, merge: bool) -> None:
        hv, ref = self._hv(vm)
        hv.set_merge(ref, backend_id, merge)

    def qmp(self, vm: VmRef, command: str, arguments: dict[str, Any] | None = None) -> Any:
        hv, ref = self._hv(vm)
        return hv.qmp(ref, command, arguments)

    def close(self) -> None:
        pass


# Checked by mypy: the fleet is a Hypervisor with addresses of its own.
_AS_HYPERVISOR: type[Hypervisor] = QmpFleet
_AS_ADDRESSED: type[AddressedHypervisor] = QmpFleet
