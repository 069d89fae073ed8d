"""Temporary trees shaped like /sys/kernel/mm/ksm and /proc, for unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

KERNEL_KNOBS = {
    "run": "0", "pages_to_scan": "100", "sleep_millisecs": "20", "merge_across_nodes": "1",
    "max_page_sharing": "256", "use_zero_pages": "0", "stable_node_chains_prune_millisecs":
    "2000", "smart_scan": "1", "advisor_mode": "[none] scan-time", "advisor_max_cpu": "70",
    "advisor_min_pages_to_scan": "500", "advisor_max_pages_to_scan": "30000",
    "advisor_target_scan_time": "200",
}
KERNEL_COUNTERS = {
    "pages_shared": "10", "pages_sharing": "30", "pages_unshared": "5", "pages_volatile": "1",
    "pages_skipped": "0", "pages_scanned": "1000", "full_scans": "3", "general_profit": "4096",
    "ksm_zero_pages": "0", "stable_node_chains": "0", "stable_node_dups": "0",
}


def make_sysfs(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, value in {**KERNEL_KNOBS, **KERNEL_COUNTERS}.items():
        (root / name).write_text(value + "\n")
    return root


PRESENT = 1 << 63
EXCLUSIVE = 1 << 56
KPF_KSM = 1 << 21
KPF_ZERO = 1 << 24


class FakeProc:
    """A /proc tree with pagemap files per pid and host kpageflags/kpagecount."""

    def __init__(self, root: Path, npfns: int = 4096) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.flags = np.zeros(npfns, dtype=np.uint64)
        self.counts = np.zeros(npfns, dtype=np.uint64)
        self.flush()
        (root / "meminfo").write_text(
            "MemTotal:       24000000 kB\nMemFree:        20000000 kB\n"
            "MemAvailable:   20000000 kB\n")

    def flush(self) -> None:
        (self.root / "kpageflags").write_bytes(self.flags.tobytes())
        (self.root / "kpagecount").write_bytes(self.counts.tobytes())

    def add_process(self, pid: int, base: int, entries: list[int], smaps: str = "",
                    ksm_stat: str = "", start_time: int = 12345) -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        with open(d / "pagemap", "wb") as f:   # sparse: entries only at the base
            f.seek(base // 4096 * 8)
            f.write(np.array(entries, dtype=np.uint64).tobytes())
        (d / "smaps").write_text(smaps)
        (d / "ksm_stat").write_text(ksm_stat)
        fields = ["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 10
        (d / "stat").write_text(f"{pid} (qemu-system-x86) " + " ".join(fields) + "\n")
        (d / "cmdline").write_bytes(b"qemu-system-x86_64\0-name\0guest=vm\0")
