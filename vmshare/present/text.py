"""Presentation: turn observations into tables and JSON. Pure, no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from vmshare.model import COUNTER_MEANINGS, PAGE_SIZE
from vmshare.observe.host import BackendView, HostView, VmView

MiB = 2**20


def mib(nbytes: float) -> str:
    """A byte count for people: KiB below 1 MiB, GiB from 1 GiB, one decimal."""
    if abs(nbytes) < MiB:
        return f"{nbytes / 1024:,.1f} KiB"
    if abs(nbytes) < 1024 * MiB:
        return f"{nbytes / MiB:,.1f} MiB"
    return f"{nbytes / (1024 * MiB):,.2f} GiB"


# C0 and C1 controls (ESC, CR, LF, BEL...), DEL, the Unicode line and paragraph
# separators and the bidirectional overrides that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group(0)
    return _SHORT.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def visible(text: str) -> str:
    """``text`` with every control character shown as a Python-style escape
    (``\\n``, ``\\x1b``, ``\\u202e``), for text from guests and domains (names,
    XML-derived strings) on its way to a terminal or a log line: it can then
    neither move the cursor, recolour, rewrite the screen nor start a line
    that looks like another record. Backslashes are left as they are."""
    return _UNSAFE.sub(_escape_char, text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]],
          right: Sequence[int] = ()) -> str:
    """A plain aligned text table; columns in ``right`` are right-aligned.
    Cells are shown through ``visible``: a domain name cannot break the table."""
    headers = [visible(h) for h in headers]
    rows = [[visible(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    out = []
    for row in [headers, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _run_state(knobs: Mapping[str, int | str]) -> str:
    return {0: "stopped", 1: "running", 2: "stopped, unmerged"}.get(
        int(knobs.get("run", 0)), str(knobs.get("run")))


def host_summary(host: HostView) -> str:
    if not host.ksm_available:
        return "Kernel KSM: not available on this host (no /sys/kernel/mm/ksm)"
    c = host.counters
    sharing = c.get("pages_sharing", 0)
    lines = [
        f"Kernel KSM: {_run_state(host.knobs)} (run={host.knobs.get('run')}), "
        f"pages_to_scan={host.knobs.get('pages_to_scan')}, "
        f"sleep_millisecs={host.knobs.get('sleep_millisecs')}, "
        f"full_scans={c.get('full_scans', 0)}",
        f"Host saving: pages_sharing={sharing:,} ({mib(sharing * PAGE_SIZE)}) over "
        f"pages_shared={c.get('pages_shared', 0):,}; pages_unshared="
        f"{c.get('pages_unshared', 0):,}, pages_volatile={c.get('pages_volatile', 0):,}, "
        f"ksm_zero_pages={c.get('ksm_zero_pages', 0):,}",
    ]
    return "\n".join(lines)


def merge_state(vm: VmView) -> str:
    """on, off, on/off (mixed), n/a (ineligible backends), - (none); "partial"
    when every backend is off but other mappings of the QEMU process are
    mergeable (QEMU's mem-merge=on: VRAM, ROMs)."""
    if not vm.backends:
        return "-"
    states = {("on" if b.backend.merge else "off") if b.ineligible_reason is None
              else "n/a" for b in vm.backends}
    if vm.other_mergeable and "on" not in states:
        return "partial"
    return "/".join(sorted(states))


def status_table(host: HostView) -> str:
    rows = []
    for vm in host.vms:
        if vm.facts.pid is None:
            rows.append([vm.name, "-", "shut off" if not vm.warnings else "gone",
                         "", "", "", "", "", "", ""])
            continue
        reason = vm.facts.ineligible_reason
        rows.append([
            vm.name, str(vm.facts.pid), mib(vm.ram_bytes),
            mib(vm.resident_pages * PAGE_SIZE), f"{vm.ksm_pages:,}", mib(vm.saved_bytes),
            f"{vm.ksm_stat.ksm_zero_pages:,}", f"{vm.ksm_stat.ksm_rmap_items:,}",
            mib(vm.ksm_stat.ksm_process_profit), "n/a" if reason else merge_state(vm),
        ])
    text = table(["VM", "PID", "RAM", "RESIDENT", "KSM PAGES", "SAVED", "ZERO PAGES",
                  "RMAP ITEMS", "KERNEL PROFIT", "MERGE"], rows,
                 right=(1, 2, 3, 4, 5, 6, 7, 8))
    total = host.vm_saved_pages * PAGE_SIZE
    lines = [text, ""]
    if host.ksm_available:
        lines.append(f"VMs saved {mib(total)} of the host's "
                     f"{mib(host.counters.get('pages_sharing', 0) * PAGE_SIZE)}; "
                     f"other processes and unlisted VMs: {mib(host.other_saved_pages * PAGE_SIZE)}")
    for vm in host.vms:
        for warning in vm.warnings:
            lines.append(visible(f"warning: {vm.name}: {warning}"))
        if vm.facts.ineligible_reason and vm.facts.pid is not None:
            lines.append(visible(f"note: {vm.name} is not eligible: "
                                 f"{vm.facts.ineligible_reason}"))
    return "\n".join(lines).rstrip()


def matrix(host: HostView) -> str:
    names = [v.name for v in host.vms if v.facts.pid is not None]
    by_name = {v.name: v for v in host.vms}
    rows = []
    for a in names:
        row = [a]
        for b in names:
            pages = by_name[a].shares_with_pages.get(b, 0)
            row.append("-" if a == b else mib(pages * PAGE_SIZE))
        rows.append(row)
    return ("Guest RAM of each row's VM mapped to a KSM page the column's VM maps too:\n"
            + table(["SHARES WITH", *names], rows, right=tuple(range(1, len(names) + 1))))


def backend_json(b: BackendView) -> dict[str, Any]:
    """One RAM backend as `status --json` and `list --json` show it."""
    return {"id": b.backend.id, "type": b.backend.qom_type, "size": b.backend.size,
            "share": b.backend.share, "merge": b.backend.merge, "mg": b.mg_flag,
            "eligible": b.ineligible_reason is None,
            "ineligible_reason": b.ineligible_reason}


def vm_json(vm: VmView) -> dict[str, Any]:
    running = vm.facts.pid is not None
    return {
        "name": vm.name,
        "uuid": vm.facts.ref.uuid,
        "pid": vm.facts.pid,
        "running": running,
        "eligible": vm.facts.ineligible_reason is None,
        "ineligible_reason": vm.facts.ineligible_reason,
        "ram_bytes": vm.ram_bytes,
        "resident_pages": vm.resident_pages,
        "ksm_pages": vm.ksm_pages,
        "saved_bytes": vm.saved_bytes,
        "saved_pages": round(vm.saved_pages, 3),
        "zero_pages": vm.ksm_stat.ksm_zero_pages,
        "merging_pages": vm.ksm_stat.ksm_merging_pages,
        "rmap_items": vm.ksm_stat.ksm_rmap_items,
        "process_profit_bytes": vm.ksm_stat.ksm_process_profit,
        "thp_bytes": vm.thp_bytes,
        "shares_with": {k: v * PAGE_SIZE for k, v in sorted(vm.shares_with_pages.items())},
        "backends": [backend_json(b) for b in vm.backends],
        "other_mergeable_bytes": vm.other_mergeable_bytes,
        "warnings": list(vm.warnings),
    }


def status_json(host: HostView) -> dict[str, Any]:
    h: dict[str, Any] = dict(host.counters)
    h["ksm_available"] = host.ksm_available
    h["knobs"] = dict(host.knobs)
    h["page_size"] = PAGE_SIZE
    return {
        "host": h,
        "vms": [vm_json(v) for v in host.vms],
        "vm_saved_bytes": round(host.vm_saved_pages * PAGE_SIZE),
        "other_saved_bytes": round(host.other_saved_pages * PAGE_SIZE),
    }


def ksm_show(counters: Mapping[str, int], knobs: Mapping[str, int | str],
             knob_meanings: Mapping[str, str]) -> str:
    rows = [[k, str(v), knob_meanings.get(k, "")] for k, v in knobs.items()]
    rows += [[k, f"{v:,}", COUNTER_MEANINGS.get(k, "")] for k, v in counters.items()]
    return table(["NAME", "VALUE", "MEANING (kernel)"], rows, right=(1,))
