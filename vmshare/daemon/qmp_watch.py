"""Plain QEMU (no libvirt): watch QMP socket globs, poll each VM in short sessions.

QEMU's QMP server serves one client at a time; a second client waits for
its greeting until the first disconnects. The CLI (``vmshare --qmp SOCK``)
and operators' own tools need the socket too, so the daemon never holds a
session: each poll (about once a second) connects, reads the VM's name,
run state (query-status), pid (SO_PEERCRED) and memory backends, and
disconnects at once (a few milliseconds). Lifecycle events are derived from
what changed between polls:

* a socket appears: apply the VM's policy (a migration destination still
  waiting, run state ``inmigrate``, gets it then too, audited as
  "qmp:socket-appeared/inmigrate");
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
The sessions and ``QmpFleet`` (all watched VMs behind one ``Hypervisor``, so
that policy, trust groups and observation work over them as over libvirt)
live in vmshare.hypervisor.qmp_fleet; this module is the daemon's watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
from collections.abc import Callable

from vmshare.daemon.triggers import Trigger, qmp_trigger
from vmshare.errors import VmshareError
from vmshare.hypervisor.qmp_fleet import QmpFleet, Snapshot, poll_socket

__all__ = ["POLL_INTERVAL_S", "QmpWatcher", "Snapshot", "transitions"]

log = logging.getLogger("vmshare.daemon.qmp")

POLL_INTERVAL_S = 1.0


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
        # a destination still waiting for its migration gets the policy at once;
        # the "migrate-in" reset is recorded when the migration completes
        seen = "qmp:socket-appeared/inmigrate" if new.status == "inmigrate" \
            else "qmp:socket-appeared"
        return [Trigger(new.name, "apply", seen, None, ident)]
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
