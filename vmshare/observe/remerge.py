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

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshare.errors import AccessDenied, VmshareError
from vmshare.records.schema import (
    RecordError,
    decode,
    get_bool,
    get_int,
    get_map,
    get_number,
    get_opt_int,
    get_opt_str,
    get_str,
    printable,
)

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


class StateFileError(RecordError):
    """The daemon's state file is not a state document this version can read."""


class StateVersionError(StateFileError):
    """The state file was written by a newer vmshare (a higher ``version``)."""


_PENDING_STR = ("id", "event", "reason", "ident")


def _check_vm(name: str, entry: Any, where: str) -> None:
    what = f"{where}: vms.{printable(name, 60)}"
    if not isinstance(entry, dict):
        raise StateFileError(f"{what} is not an object")
    get_opt_str(entry, "uuid", StateFileError, what)
    get_opt_int(entry, "pid", StateFileError, what, minimum=0)
    if "ksm_pages" in entry:
        get_int(entry, "ksm_pages", StateFileError, what, minimum=0)
    if "observed" in entry:
        get_number(entry, "observed", StateFileError, what)
    if entry.get("remerge") is not None and RemergeRecord.from_json(entry["remerge"]) is None:
        raise StateFileError(f"{what}: 'remerge' is not a re-merge record")
    pending = get_map(entry, "pending", StateFileError, what, required=False)
    if pending:
        pwhat = f"{what}.pending"
        get_bool(pending, "merge", StateFileError, pwhat)
        for key in _PENDING_STR:
            if key in pending:
                get_str(pending, key, StateFileError, pwhat)
        before = get_map(pending, "before", StateFileError, pwhat, required=False)
        if not all(isinstance(v, bool) for v in before.values()):
            raise StateFileError(f"{pwhat}: 'before' maps backends to non-booleans")


def parse_state(data: bytes, where: str) -> dict[str, Any]:
    """Validate one state document (the format of vmshare.daemon.state).

    Raises StateVersionError for a ``version`` above STATE_VERSION and
    StateFileError for anything else that is not a version-1 document.
    """
    doc = decode(data, StateFileError, where, max_bytes=MAX_STATE_BYTES)
    if not isinstance(doc, dict):
        raise StateFileError(f"{where}: not a JSON object")
    version = get_int(doc, "version", StateFileError, where, default=STATE_VERSION)
    if version > STATE_VERSION:
        raise StateVersionError(f"{where}: written by a newer vmshare (state version "
                                f"{version}; this one reads {STATE_VERSION})")
    if version < 1:
        raise StateFileError(f"{where}: unknown state version {version}")
    vms = get_map(doc, "vms", StateFileError, where)
    for name, entry in vms.items():
        _check_vm(name, entry, where)
    return doc


def load_state(path: Path) -> dict[str, Any] | None:
    """The validated state document at ``path``; None when there is none.

    Raises StateFileError (StateVersionError for a newer version) or
    AccessDenied.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise AccessDenied(f"cannot read the daemon state file {path}: permission "
                           "denied") from exc
    except OSError as exc:
        raise StateFileError(f"cannot read the daemon state file {path}: "
                             f"{exc.strerror}") from exc
    return parse_state(raw, str(path))


def empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "vms": {}}


def read_state(path: Path) -> dict[str, Any]:
    """The daemon's state document; an empty one when missing or unusable.

    Never raises: status must work when the daemon never ran. A corrupt or
    newer file is logged at WARNING (the daemon keeps a copy when it
    replaces one; see vmshare.daemon.state).
    """
    try:
        return load_state(path) or empty_state()
    except VmshareError as exc:
        log.warning("ignoring the daemon state file: %s", exc)
        return empty_state()


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
        try:
            state_file = load_config().daemon.state_file
        except VmshareError as exc:
            log.warning("no re-merge progress: %s", exc)
            return annotate_status(doc, {"vms": {}}, now)
    return annotate_status(doc, read_state(state_file), now)
