"""Prometheus text exposition (format 0.0.4) of a HostView. Pure, no I/O.

Metric names keep the kernel's counter names; HELP texts are the meanings
defined once in vmshare.model. Monotonic kernel counters (full_scans,
pages_scanned, pages_skipped) are Prometheus counters with a ``_total``
suffix; everything else is a gauge.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmshare.model import COUNTER_MEANINGS, PAGE_SIZE, VM_FIGURE_MEANINGS
from vmshare.observe.host import HostView

MONOTONIC = {"full_scans", "pages_scanned", "pages_skipped"}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[str] = []

    def add(self, value: float, labels: Iterable[tuple[str, str]] = ()) -> None:
        self.samples.append(f"{self.name}{_labels(labels)} {_fmt(value)}")

    def render(self) -> list[str]:
        if not self.samples:
            return []
        return [f"# HELP {self.name} {_escape_help(self.help)}",
                f"# TYPE {self.name} {self.kind}", *self.samples]


def exposition(host: HostView, tuner_pid: int | None = None) -> str:
    """Render the host's KSM counters, knobs and per-VM figures, and whether a
    vmshare tuner (``tuner_pid``: vmshare.tuner.loop.tuner_holder) owns the knobs."""
    families: list[_Family] = []
    up = _Family("vmshare_ksm_available", "gauge", "1 if kernel KSM exists on this host")
    up.add(1 if host.ksm_available else 0)
    families.append(up)
    tuner = _Family("vmshare_ksm_tuner_running", "gauge",
                    "1 while a vmshare tuner (vmshare tune or daemon --tune) owns run, "
                    "pages_to_scan and sleep_millisecs")
    tuner.add(0 if tuner_pid is None else 1)
    families.append(tuner)
    for name, value in sorted(host.counters.items()):
        if name in MONOTONIC:
            fam = _Family(f"vmshare_ksm_{name}_total", "counter", COUNTER_MEANINGS[name])
        else:
            fam = _Family(f"vmshare_ksm_{name}", "gauge", COUNTER_MEANINGS.get(name, name))
        fam.add(value)
        families.append(fam)
    for knob in ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing",
                 "use_zero_pages", "merge_across_nodes"):
        if isinstance(host.knobs.get(knob), int):
            fam = _Family(f"vmshare_ksm_knob_{knob}", "gauge", f"KSM knob {knob}")
            fam.add(int(host.knobs[knob]))
            families.append(fam)

    vm_fams = {key: _Family(f"vmshare_vm_{key}", "gauge", VM_FIGURE_MEANINGS[key])
               for key in ("ram_bytes", "resident_pages", "ksm_pages", "saved_bytes",
                           "zero_pages", "rmap_items", "process_profit_bytes")}
    shares = _Family("vmshare_vm_shares_with_bytes", "gauge", VM_FIGURE_MEANINGS["shares_with"])
    mergeable = _Family("vmshare_vm_mergeable_backends", "gauge",
                        "backends whose QEMU merge property is on")
    for vm in host.vms:
        if vm.facts.pid is None:
            continue
        labels = (("vm", vm.name), ("uuid", vm.facts.ref.uuid))
        values = {"ram_bytes": vm.ram_bytes, "resident_pages": vm.resident_pages,
                  "ksm_pages": vm.ksm_pages, "saved_bytes": vm.saved_bytes,
                  "zero_pages": vm.ksm_stat.ksm_zero_pages,
                  "rmap_items": vm.ksm_stat.ksm_rmap_items,
                  "process_profit_bytes": vm.ksm_stat.ksm_process_profit}
        for key, value in values.items():
            vm_fams[key].add(value, labels)
        mergeable.add(sum(1 for b in vm.backends if b.backend.merge), labels)
        for peer, pages in sorted(vm.shares_with_pages.items()):
            shares.add(pages * PAGE_SIZE, (*labels, ("peer", peer)))
    families.extend(vm_fams.values())
    families.extend([shares, mergeable])
    other = _Family("vmshare_other_saved_bytes", "gauge",
                    "pages_sharing not attributed to a listed VM, in bytes")
    if host.ksm_available:
        other.add(round(host.other_saved_pages * PAGE_SIZE))
        families.append(other)
    lines: list[str] = []
    for fam in families:
        lines.extend(fam.render())
    return "\n".join(lines) + "\n"
