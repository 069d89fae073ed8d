"""Plain QEMU (no libvirt): watch QMP socket globs, poll each VM in short sessions.

QEMU's QMP server serves one client at a time; a second client waits for
its greeting until the first disconnects. The CLI (``vmshare --qmp SOCK``)
and operators' own tools need the socket too, so the daemon never holds a
session: each poll (about once a second) connects, reads the VM's name,
run state (query-status), pid (SO_PEERCRED) and memory backends, and
disconnects at once (a few milliseconds). Lifecycle events are derived from
what changed between polls:

* a socket appears: apply the VM's policy;
* run state leaves ``inmigrate``: an incoming migration completed (the
  destination's RAM is new pages): "migrate-in"; a socket first seen after
  its incoming migration already completed (a migration takes well under a
  poll interval) is recognised by ``query-migrate``: a destination reports
  ``{"status": "completed"}`` with none of the source's statistics (``ram``);
* another QEMU pid behind the same socket: "qemu-restart";
* the set of memory backends changes: "hotplug";
* QMP events that arrive while a poll's session is open (RESET, MIGRATION,
  ...) are used too; a guest RESET between polls is not seen (QEMU keeps no
  record of it), a documented limit of polling;
* the socket is gone or refuses: forget the VM.

A poll that finds the socket busy (another client) just waits for the next.
``QmpFleet`` puts all watched VMs behind one ``Hypervisor`` so that policy,
trust groups and observation work over them as over libvirt.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, cast

from vmshare.daemon.triggers import Trigger, qmp_trigger
from vmshare.errors import DomainNotFound, HypervisorError, VmshareError
from vmshare.hypervisor.qmp import ZERO_UUID, QmpHypervisor
from vmshare.model import RamBackend, VmFacts, VmRef

log = logging.getLogger("vmshare.daemon.qmp")

POLL_INTERVAL_S = 1.0
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


def transitions(old: Snapshot | None, new: Snapshot | None, path: str) -> list[Trigger]:
    """Triggers implied by one socket's change between two polls. Pure."""
    if new is None:
        if old is None:
            return []
        return [Trigger(old.name, "forget", "qmp:socket-gone", None, old.uuid)]
    ident = new.path
    if old is None:
        if new.migrated_in:
            return [Trigger(new.name, "apply", "qmp:socket-appeared/migrated-in",
                            "migrate-in", ident)]
        return [Trigger(new.name, "apply", "qmp:socket-appeared", None, ident)]
    if old.pid != new.pid:
        resets = "migrate-in" if old.status == "inmigrate" and new.status != "inmigrate" \
            else "qemu-restart"
        return [Trigger(new.name, "apply", "qmp:new-process", resets, ident)]
    if old.status == "inmigrate" and new.status not in ("inmigrate", "prelaunch"):
        return [Trigger(new.name, "apply", f"qmp:incoming-migration/{new.status}",
                        "migrate-in", ident)]
    if old.backends != new.backends:
        return [Trigger(new.name, "apply", "qmp:backends-changed", "hotplug", ident)]
    if old.status != new.status and new.status == "running":
        return [Trigger(new.name, "apply", "qmp:running", None, ident)]
    return []


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


class QmpWatcher:
    """Polls the globs; keeps ``fleet.snapshots`` current; emits triggers."""

    def __init__(self, globs: tuple[str, ...], fleet: QmpFleet,
                 deliver: Callable[[Trigger], None], *,
                 interval: float = POLL_INTERVAL_S) -> None:
        self.globs = globs
        self.fleet = fleet
        self.deliver = deliver
        self.interval = interval

    def paths(self) -> list[str]:
        found: set[str] = set()
        for pattern in self.globs:
            found.update(glob.glob(pattern))
        return sorted(found)

    async def poll_once(self) -> list[Trigger]:
        out: list[Trigger] = []
        paths = self.paths()
        for path in sorted(set(paths) | set(self.fleet.snapshots)):
            old = self.fleet.snapshots.get(path)
            if path not in paths:
                new = None
            else:
                try:
                    new, events = await poll_socket(path)
                except (VmshareError, OSError) as exc:
                    busy = "greeting" in str(exc) or "no answer" in str(exc)
                    if busy and old is not None:
                        log.debug("%s busy, next poll: %s", path, exc)
                        continue
                    if old is not None:
                        log.info("%s: QEMU gone (%s)", path, exc)
                    new, events = None, []
                for ev in events:
                    name = new.name if new else path
                    t = qmp_trigger(name, path, str(ev.get("event")), ev.get("data"))
                    if t is not None:
                        out.append(t)
            out[:0] = transitions(old, new, path)
            if new is None:
                self.fleet.snapshots.pop(path, None)
            else:
                self.fleet.snapshots[path] = new
        for t in out:
            self.deliver(t)
        return out

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception:   # a bug in one poll must not end the watching
                log.exception("QMP poll failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
