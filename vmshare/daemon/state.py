"""The daemon's state file: what it last saw of each VM, written atomically.

One JSON document (format version 1)::

    {"version": 1, "vms": {"NAME": {
        "uuid": "...", "pid": 1234, "ksm_pages": 5120, "observed": 1795671366.8,
        "remerge": {"event": "restore", "time": ..., "previous_ksm_pages": ..., "pid": ...},
        "pending": {"id": "...", "merge": false, "event": "...", "reason": "...",
                    "before": {"pc.ram": true}}}}}

``pending`` is an action the daemon started and has not yet audited: if the
daemon dies between acting and auditing, the next start finds the action
done and writes its audit record once (the record id makes it idempotent).

Writes go through vmshare.records.atomic (a reader sees the old or the new
document, never half of one). The format is validated by
vmshare.observe.remerge.parse_state, which ``vmshare status`` reads too.
A corrupt file is kept as ``state.json.corrupt-<UTC time>`` (with a
WARNING) before the daemon starts over; a file of a newer version is
refused (StateVersionError), never rewritten as version 1.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmshare.observe.remerge import (
    RESETTING_EVENTS,
    STATE_VERSION,
    RemergeRecord,
    StateFileError,
    StateVersionError,
    empty_state,
    load_state,
    record_of,
)
from vmshare.records.atomic import AtomicWriteError, keep_copy, write_atomic

log = logging.getLogger("vmshare.daemon.state")

# Events of one kind for one QEMU process within this window are one event
# (the hook and libvirt both report a restore, for instance).
SAME_EVENT_WINDOW_S = 30.0
# Forget VMs not seen for this long (transient domains, deleted sockets).
FORGET_AFTER_S = 7 * 24 * 3600.0


class StateError(AtomicWriteError):
    """The daemon state file cannot be written (or a corrupt one cannot be kept)."""


_SPECIFICITY = {"qemu-restart": 1, "migrate-in": 2, "restore": 3}
NEW_PROCESS_EVENTS = frozenset(_SPECIFICITY)


class StateStore:
    """The state document in memory, saved after each change. Not thread-safe:
    the daemon changes it from one worker thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: dict[str, Any] = self._load()
        self.doc["version"] = STATE_VERSION

    def _load(self) -> dict[str, Any]:
        """The validated document; a corrupt one is copied aside first, then dropped.

        Raises StateVersionError (a newer vmshare's file) and StateError (a
        corrupt file that cannot be kept).
        """
        try:
            return load_state(self.path) or empty_state()
        except StateVersionError:
            raise
        except StateFileError as exc:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            try:
                copy = keep_copy(self.path, f"corrupt-{stamp}")
            except AtomicWriteError as copy_exc:
                raise StateError(f"{exc}; not replacing it, since no copy could be kept: "
                                 f"{copy_exc}") from copy_exc
            log.warning("%s; kept it as %s and started with an empty state", exc, copy)
            return empty_state()

    def vm(self, name: str) -> dict[str, Any]:
        vms: dict[str, Any] = self.doc["vms"]
        entry = vms.get(name)
        if not isinstance(entry, dict):
            entry = vms[name] = {}
        return entry

    def names(self) -> list[str]:
        return sorted(self.doc["vms"])

    def save(self) -> None:
        """Write the document. Raises StateError, AtomicWriteError or AccessDenied."""
        try:
            text = json.dumps(self.doc, sort_keys=True, indent=1, allow_nan=False)
        except ValueError as exc:   # a non-finite number: never write what we cannot read
            raise StateError(f"cannot write {self.path}: {exc}") from exc
        write_atomic(self.path, text.encode() + b"\n")

    # -- observations and events ------------------------------------------------

    def observe(self, name: str, uuid: str, pid: int, ksm_pages: int,
                now: float | None = None) -> RemergeRecord | None:
        """Remember the VM's KSM pages. A new QEMU pid for a known VM is itself a
        resetting event ("qemu-restart") unless an event already covers that pid;
        returns the record started, if any."""
        now = time.time() if now is None else now
        entry = self.vm(name)
        started = None
        old_pid = entry.get("pid")
        if isinstance(old_pid, int) and old_pid != pid:
            started = self.reset_event(name, "qemu-restart", pid, now=now)
        entry.update(uuid=uuid, pid=pid, ksm_pages=int(ksm_pages), observed=now)
        return started

    def reset_event(self, name: str, event: str, pid: int | None,
                    now: float | None = None, uuid: str | None = None) -> RemergeRecord | None:
        """Start a re-merge record: previous = the KSM pages last observed (of the
        previous QEMU process when the pid changed). A second report of the same
        reset (same pid, within SAME_EVENT_WINDOW_S) only refines the event name
        ("qemu-restart" becomes "migrate-in" becomes "restore") and returns None."""
        if event not in RESETTING_EVENTS:
            raise ValueError(f"{event!r} is not a resetting event")
        now = time.time() if now is None else now
        entry = self.vm(name)
        current = record_of(self.doc, name)
        # A reset that starts a new process cannot happen twice to one process:
        # a second report of it (however late) only refines the record.
        if current is not None and pid is not None and current.pid == pid \
                and (now - current.time < SAME_EVENT_WINDOW_S or event in NEW_PROCESS_EVENTS):
            # More specific names win: a restore is an incoming migration from a
            # file (QEMU reports MIGRATION completed for it), both are a new process.
            if _SPECIFICITY.get(event, 0) > _SPECIFICITY.get(current.event, 0):
                entry["remerge"] = RemergeRecord(event, current.time,
                                                 current.previous_ksm_pages, pid).to_json()
            return None
        previous = entry.get("ksm_pages")
        if previous is None and uuid and uuid.strip("0-"):
            # The same VM (by UUID) seen under another name, e.g. a migration's source.
            seen = [e for n, e in self.doc["vms"].items() if n != name and isinstance(e, dict)
                    and e.get("uuid") == uuid and isinstance(e.get("ksm_pages"), int)]
            if seen:
                previous = max(seen, key=lambda e: e.get("observed") or 0)["ksm_pages"]
        rec = RemergeRecord(event, now, previous if isinstance(previous, int) else 0, pid)
        entry["remerge"] = rec.to_json()
        if pid is not None:
            entry["pid"] = pid
        return rec

    # -- actions in flight -------------------------------------------------------

    def set_pending(self, name: str, pending: dict[str, Any] | None) -> None:
        entry = self.vm(name)
        if pending is None:
            entry.pop("pending", None)
        else:
            entry["pending"] = pending

    def pendings(self) -> dict[str, dict[str, Any]]:
        return {n: e["pending"] for n, e in self.doc["vms"].items()
                if isinstance(e, dict) and isinstance(e.get("pending"), dict)}

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        vms = self.doc["vms"]
        for name in list(vms):
            seen = vms[name].get("observed") if isinstance(vms[name], dict) else None
            if isinstance(seen, int | float) and now - seen > FORGET_AFTER_S \
                    and not vms[name].get("pending"):
                del vms[name]
