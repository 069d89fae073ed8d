"""Lifecycle truth: how far a VM has merged again after an event that reset it.

KSM merges are facts about one process's pages. A restore, an incoming
migration, a QEMU restart, a guest reset or a memory hotplug starts the VM's
memory over (new process, new pages, or pages rewritten by the guest), and
everything merged before is lost until ksmd finds it again. The daemon
remembers, per VM, the KSM pages it last observed before such an event and
when the event happened (in its state file); this module turns that record
and the VM's current ``ksm_pages`` into progress an operator can read:

* ``since_seconds``: time since the event;
* ``previous_ksm_pages``: KSM pages observed before it;
* ``fraction``: current KSM pages over previous ones, capped at 1.0; None
  when nothing was merged before (there is nothing to get back).

Pure helpers plus one tolerant reader of the daemon's state file; the writer
is vmshare.daemon.state. No hypervisor or kernel access here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("vmshare.observe.remerge")

STATE_VERSION = 1
# Events after which a VM's memory has to be merged again from scratch.
RESETTING_EVENTS: tuple[str, ...] = ("restore", "migrate-in", "reset", "hotplug",
                                     "qemu-restart")
MAX_STATE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class RemergeRecord:
    """One resetting event of one VM: what it was, when, and what was merged before."""

    event: str
    time: float                 # wall clock, seconds since the epoch
    previous_ksm_pages: int
    pid: int | None = None      # the QEMU process after the event, when known

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "time": self.time,
                "previous_ksm_pages": self.previous_ksm_pages, "pid": self.pid}

    @classmethod
    def from_json(cls, doc: Any) -> RemergeRecord | None:
        """The record in ``doc``, or None when it is absent or malformed."""
        if not isinstance(doc, dict):
            return None
        event, when, prev = doc.get("event"), doc.get("time"), doc.get("previous_ksm_pages")
        pid = doc.get("pid")
        if not isinstance(event, str) or isinstance(when, bool) \
                or not isinstance(when, int | float) or isinstance(prev, bool) \
                or not isinstance(prev, int) or prev < 0:
            return None
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
            pid = None
        return cls(event, float(when), prev, pid)


def fraction(previous_ksm_pages: int, current_ksm_pages: int) -> float | None:
    """Share of the previously merged pages merged again, in [0, 1].

    None when nothing was merged before the event: a fraction of zero pages
    means nothing. Merging more than before counts as fully re-merged.
    """
    if previous_ksm_pages <= 0:
        return None
    if current_ksm_pages <= 0:
        return 0.0
    return min(1.0, current_ksm_pages / previous_ksm_pages)


def progress(record: RemergeRecord, current_ksm_pages: int,
             now: float | None = None) -> dict[str, Any]:
    """The ``remerge`` object of a VM in ``vmshare status --json``."""
    now = time.time() if now is None else now
    frac = fraction(record.previous_ksm_pages, current_ksm_pages)
    return {
        "event": record.event,
        "since_seconds": round(max(0.0, now - record.time), 1),
        "previous_ksm_pages": record.previous_ksm_pages,
        "fraction": None if frac is None else round(frac, 4),
    }


def read_state(path: Path) -> dict[str, Any]:
    """The daemon's state document; an empty one when missing or unreadable.

    Never raises: status must work when the daemon never ran. A corrupt file
    (which atomic writes should make impossible) is logged once at WARNING.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return {"version": STATE_VERSION, "vms": {}}
    except OSError as exc:
        log.warning("cannot read the daemon state file %s: %s", path, exc.strerror)
        return {"version": STATE_VERSION, "vms": {}}
    try:
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError("too large")
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("vms"), dict):
            raise ValueError("not a state document")
    except ValueError as exc:
        log.warning("ignoring the daemon state file %s: %s", path, exc)
        return {"version": STATE_VERSION, "vms": {}}
    return doc


def record_of(state: Mapping[str, Any], vm: str) -> RemergeRecord | None:
    entry = state.get("vms", {}).get(vm)
    return RemergeRecord.from_json(entry.get("remerge")) if isinstance(entry, dict) else None


def annotate_status(doc: dict[str, Any], state: Mapping[str, Any],
                    now: float | None = None) -> dict[str, Any]:
    """Add ``remerge`` (or None) to every VM of a ``status --json`` document, in place.

    A record is shown only for the QEMU process it was made for, when the
    record names one: a VM started afresh since has no re-merge to report.
    """
    for vm in doc.get("vms", []):
        rec = record_of(state, vm.get("name", ""))
        if rec is None or not vm.get("running") or (
                rec.pid is not None and vm.get("pid") not in (None, rec.pid)):
            vm["remerge"] = None
            continue
        vm["remerge"] = progress(rec, int(vm.get("ksm_pages") or 0), now)
    return doc


def describe(remerge: Mapping[str, Any] | None) -> str | None:
    """A short human line for one VM's ``remerge`` object."""
    if not remerge:
        return None
    since = remerge["since_seconds"]
    frac = remerge["fraction"]
    done = "nothing was merged before" if frac is None else f"{frac:.0%} re-merged"
    return (f"{remerge['event']} {since:.0f} s ago: {done} "
            f"(previously {remerge['previous_ksm_pages']:,} KSM pages)")


def status_lines(doc: Mapping[str, Any]) -> list[str]:
    """Lines for the human status table of an annotated document."""
    lines = []
    for vm in doc.get("vms", []):
        text = describe(vm.get("remerge"))
        if text:
            lines.append(f"re-merge: {vm['name']}: {text}")
    return lines


def status_for(doc: dict[str, Any], state_file: Path | None = None,
               now: float | None = None) -> dict[str, Any]:
    """Annotate a status document from the configured daemon state file.

    ``state_file`` defaults to ``[daemon] state_file`` of the host config
    (VMSHARE_CONFIG or /etc/vmshare/vmshare.toml); a config that does not
    load gives no records rather than failing status.
    """
    if state_file is None:
        from vmshare.config import load_config
        from vmshare.errors import VmshareError
        try:
            state_file = load_config().daemon.state_file
        except VmshareError as exc:
            log.warning("no re-merge progress: %s", exc)
            return annotate_status(doc, {"vms": {}}, now)
    return annotate_status(doc, read_state(state_file), now)
