"""What each outside event means for one VM. Pure mappings, no I/O.

Three sources say that something happened to a VM: libvirt's domain
lifecycle events, QMP events (through libvirt's pass-through or a plain
QEMU's socket) and the libvirt hook's spool entries. Each becomes a
``Trigger``: apply the VM's policy (idempotent), or forget the VM, and, for
events after which its memory must merge again from scratch, which
resetting event it was (vmshare.observe.remerge.RESETTING_EVENTS).

Numeric libvirt codes are the stable public ABI (virDomainEventType and its
detail enums); tests check them against the libvirt module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Action = Literal["apply", "forget"]

# virDomainEventType
EV_DEFINED, EV_UNDEFINED, EV_STARTED, EV_SUSPENDED, EV_RESUMED, EV_STOPPED, \
    EV_SHUTDOWN, EV_PMSUSPENDED, EV_CRASHED = range(9)
# virDomainEventStartedDetailType
STARTED_BOOTED, STARTED_MIGRATED, STARTED_RESTORED, STARTED_FROM_SNAPSHOT, \
    STARTED_WAKEUP = range(5)
# virDomainEventResumedDetailType
RESUMED_UNPAUSED, RESUMED_MIGRATED, RESUMED_FROM_SNAPSHOT, RESUMED_POSTCOPY, \
    RESUMED_POSTCOPY_FAILED = range(5)

EVENT_NAMES = {EV_DEFINED: "defined", EV_UNDEFINED: "undefined", EV_STARTED: "started",
               EV_SUSPENDED: "suspended", EV_RESUMED: "resumed", EV_STOPPED: "stopped",
               EV_SHUTDOWN: "shutdown", EV_PMSUSPENDED: "pmsuspended",
               EV_CRASHED: "crashed"}
_STARTED_RESETS = {STARTED_MIGRATED: "migrate-in", STARTED_RESTORED: "restore",
                   STARTED_FROM_SNAPSHOT: "restore"}
_RESUMED_RESETS = {RESUMED_MIGRATED: "migrate-in", RESUMED_FROM_SNAPSHOT: "restore"}

# QMP events the daemon subscribes to through libvirt's pass-through. Not
# MIGRATION: QEMU sends it for a restore as well (a restore is an incoming
# migration from a file) and it comes before libvirt's own lifecycle event,
# which says which of the two it was (STARTED_MIGRATED or STARTED_RESTORED).
# Plain QEMU (qmp_watch) has no such event and uses MIGRATION.
QMP_EVENTS: tuple[str, ...] = ("RESET", "MEMORY_DEVICE_SIZE_CHANGE",
                               "DEVICE_DELETED", "BALLOON_CHANGE", "RESUME")


@dataclass(frozen=True)
class Trigger:
    """Reconcile ``vm`` (by name; uuid when known) because of ``event``.

    ``resets`` names the resetting event, if this was one. ``check_incoming``:
    the event (QMP MIGRATION completed) fires on both ends of a migration;
    it resets only on the destination, which the reconciler checks
    (query-status is not "postmigrate").
    """

    vm: str
    action: Action
    event: str
    resets: str | None = None
    uuid: str | None = None
    check_incoming: bool = False


def lifecycle_trigger(vm: str, uuid: str | None, event: int, detail: int) -> Trigger | None:
    """The trigger for a VIR_DOMAIN_EVENT_ID_LIFECYCLE callback, or None to ignore it."""
    label = f"libvirt:{EVENT_NAMES.get(event, str(event))}/{detail}"
    if event == EV_STARTED:
        return Trigger(vm, "apply", label, _STARTED_RESETS.get(detail), uuid)
    if event == EV_RESUMED:
        return Trigger(vm, "apply", label, _RESUMED_RESETS.get(detail), uuid)
    if event == EV_STOPPED:
        return Trigger(vm, "forget", label, None, uuid)
    return None


def device_added_trigger(vm: str, uuid: str | None, alias: str) -> Trigger:
    """VIR_DOMAIN_EVENT_ID_DEVICE_ADDED: a new DIMM is a new, mergeable-by-default backend."""
    memory = alias.startswith(("dimm", "nvdimm", "virtiomem", "virtio-mem", "memory"))
    return Trigger(vm, "apply", f"libvirt:device-added/{alias}",
                   "hotplug" if memory else None, uuid)


def qmp_trigger(vm: str, uuid: str | None, event: str,
                data: Mapping[str, Any] | None) -> Trigger | None:
    """The trigger for one QMP event (name and ``data``), or None to ignore it."""
    data = data or {}
    label = f"qmp:{event}"
    if event == "RESET":
        return Trigger(vm, "apply", label, "reset", uuid)
    if event == "MIGRATION":
        status = data.get("status")
        if status == "completed":
            return Trigger(vm, "apply", f"{label}/completed", "migrate-in", uuid,
                           check_incoming=True)
        return None
    if event == "MEMORY_DEVICE_SIZE_CHANGE":
        return Trigger(vm, "apply", label, "hotplug", uuid)
    if event == "DEVICE_DELETED":
        path = str(data.get("path", "")) + " " + str(data.get("device", ""))
        memory = "dimm" in path or "mem" in path
        return Trigger(vm, "apply", label, "hotplug" if memory else None, uuid)
    if event in ("BALLOON_CHANGE", "RESUME"):
        return Trigger(vm, "apply", label, None, uuid)
    return None


class HookSequence:
    """Turns the hook's calls into triggers. A restore or an incoming migration
    shows up as ``restore`` (or ``migrate``) before ``started``; the reset is
    reported when the QEMU process exists, at ``started``."""

    def __init__(self) -> None:
        self._coming: dict[str, str] = {}

    def feed(self, domain: str, uuid: str | None, operation: str,
             sub_operation: str) -> Trigger | None:
        label = f"hook:{operation}/{sub_operation}"
        if operation == "restore":
            self._coming[domain] = "restore"
            return None
        if operation == "migrate":
            self._coming[domain] = "migrate-in"
            return None
        if operation in ("started", "attach"):
            return Trigger(domain, "apply", label, self._coming.pop(domain, None), uuid)
        if operation == "reconnect":
            return Trigger(domain, "apply", label, None, uuid)
        if operation in ("stopped", "release"):
            self._coming.pop(domain, None)
            return Trigger(domain, "forget", label, None, uuid)
        return None


class TriggerSink:
    """Turns the libvirt adapter's raw events into triggers for ``deliver``."""

    def __init__(self, deliver: Callable[[Trigger], None],
                 disconnected: Callable[[str], None]) -> None:
        self.deliver = deliver
        self.on_disconnect = disconnected

    def lifecycle(self, name: str, uuid: str | None, event: int, detail: int) -> None:
        trigger = lifecycle_trigger(name, uuid, event, detail)
        if trigger is not None:
            self.deliver(trigger)

    def device_added(self, name: str, uuid: str | None, alias: str) -> None:
        self.deliver(device_added_trigger(name, uuid, alias))

    def qmp_event(self, name: str, uuid: str | None, event: str,
                  data: dict[str, Any]) -> None:
        if event not in QMP_EVENTS:
            return      # MIGRATION: libvirt's lifecycle event names it (see QMP_EVENTS)
        trigger = qmp_trigger(name, uuid, event, data)
        if trigger is not None:
            self.deliver(trigger)

    def disconnected(self, reason: str) -> None:
        self.on_disconnect(reason)


def backoff_delays(maximum: float, first: float = 0.5, factor: float = 2.0):  # type: ignore[no-untyped-def]
    """Reconnect delays: first, first*factor, ... capped at ``maximum``, forever."""
    delay = min(first, maximum)
    while True:
        yield delay
        delay = min(delay * factor, maximum)
