"""Act on the kernel's KSM knobs: validate every value, unmerge only after the
free-memory check, apply a batch all or nothing (rolled back on failure).

The CLI (``vmshare ksm``) and the tuner both change knobs through here.
"""

from __future__ import annotations

import logging

from vmshare.errors import KnobError, UnmergeRefused, VmshareError
from vmshare.ksm.procfs import Headroom, ProcFs, headroom
from vmshare.ksm.sysfs import KNOBS, KsmSysfs
from vmshare.model import PAGE_SIZE

log = logging.getLogger("vmshare.control.knobs")


def host_unmerge_headroom(sysfs: KsmSysfs, procfs: ProcFs) -> Headroom:
    """Memory needed to unmerge everything (run=2): one page per pages_sharing."""
    return headroom(procfs, sysfs.read_int("pages_sharing") * PAGE_SIZE)


def unmerge_all(sysfs: KsmSysfs, procfs: ProcFs, *, force: bool = False) -> int:
    """run=2 after checking the host can hold every un-shared copy.

    Returns how many pages were sharing before. Raises UnmergeRefused unless
    ``force``; KnobError/AccessDenied from the kernel.
    """
    room = host_unmerge_headroom(sysfs, procfs)
    if not room.ok and not force:
        raise UnmergeRefused(
            f"unmerging all KSM pages needs {room.need_bytes // 2**20} MiB plus a "
            f"{room.margin_bytes // 2**20} MiB margin, but only "
            f"{room.available_bytes // 2**20} MiB is available; unmerge VMs one at a "
            "time ('vmshare disable DOMAIN') or pass --force")
    before = room.need_bytes // PAGE_SIZE
    sysfs.unmerge()
    return before


def apply_knobs(sysfs: KsmSysfs, procfs: ProcFs, assignments: dict[str, str], *,
                allow_unmerge: bool = False, force: bool = False
                ) -> list[tuple[str, int | str, int | str]]:
    """Validate every assignment, then apply them all or none.

    merge_across_nodes and max_page_sharing can change only while nothing is
    merged: with ``allow_unmerge`` KSM is unmerged first (run=2, after the
    memory check) and its run state restored afterwards; without it the
    change is refused. On any failure every knob already written is put
    back. Returns (knob, before, after) for each assignment.

    Raises KnobError, UnmergeRefused, AccessDenied, KsmUnavailable.
    """
    sysfs.require()
    parsed = {name: sysfs.validate(name, value) for name, value in assignments.items()}
    snapshot = sysfs.snapshot()
    before = dict(snapshot.values)
    missing = [n for n in parsed if n not in before]
    if missing:
        raise KnobError(f"this kernel has no KSM knob {', '.join(missing)}")
    guarded = [n for n, v in parsed.items() if KNOBS[n].needs_unmerged and before[n] != v]
    unmerged = False
    if guarded and sysfs.read_int("pages_shared") > 0:
        if not allow_unmerge:
            raise KnobError(f"{', '.join(guarded)} can change only while no pages are "
                            "merged; pass --unmerge to unmerge first (then KSM resumes)")
        unmerge_all(sysfs, procfs, force=force)
        unmerged = True
    order = [n for n in parsed if n != "run"] + (["run"] if "run" in parsed else [])
    try:
        for name in order:
            sysfs.set(name, parsed[name])
        if unmerged and "run" not in parsed and before["run"] != 2:
            sysfs.set("run", before["run"])
    except VmshareError:
        try:
            sysfs.restore(snapshot)
        except VmshareError as exc:
            log.error("could not roll back KSM knobs: %s", exc)
        raise
    return [(n, before[n], sysfs.read_knob(n)) for n in parsed]
