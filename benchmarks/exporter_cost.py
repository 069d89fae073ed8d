"""The exporter's cost on big hosts: what one metrics snapshot's attribution costs
for 1, 4 and 16 GiB of guest-sized mappings, and what that means at 256 GiB.

Two real processes of SIZE/2 each (half their pages identical across them, the
rest unique, MADV_DONTFORK like QEMU's guest RAM) are merged by kernel KSM (every
knob saved and restored, everything unmerged afterwards); then, best of N, the
wall-clock and CPU time of the attribution a snapshot runs over them (pagemap,
kpagecount look-ups, fair shares: vmshare.observe.attribution.attribute, as
`status` and the exporter call it). The CPU per GiB is fitted over the sizes and
extrapolated to 256 GiB, and the share of one core printed at the default
snapshot interval (30 s) without and with the default CPU budget (1% of a core:
the Refresher then waits longer between snapshots).

Run as root:  .venv/bin/python benchmarks/exporter_cost.py [SIZES_GIB ...]
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.ksm_fixtures import MemProc, converge, ksm_session, start_memproc
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.observe.attribution import attribute

INTERVAL = 30.0      # the exporter's default snapshot interval, seconds
BUDGET = 0.01        # its default CPU budget: 1% of one core
REPEATS = 3


def one_size(size_gib: float, procfs: ProcFs) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one snapshot's attribution over SIZE GiB."""
    pages = int(size_gib * 262144) // 2
    procs: list[MemProc] = []
    with ksm_session(KsmSysfs(), pages_to_scan=100000, sleep_millisecs=0) as sysfs:
        try:
            for _ in range(2):
                procs.append(start_memproc(identical=pages // 2, unique=pages - pages // 2,
                                           seed=9, dontfork=True))
            converge(sysfs, timeout=900)
            zero = procfs.zero_pfn()

            def snapshot() -> None:
                attribute({f"vm{i}": procfs.pagemap(p.pid, p.address, p.pages)
                           for i, p in enumerate(procs)},
                          procfs.kpageflags, procfs.kpagecount, unforked_zero_pfn=zero)

            best_wall, best_cpu = float("inf"), float("inf")
            for _ in range(REPEATS):
                t, c = time.perf_counter(), time.thread_time()
                snapshot()
                best_cpu = min(best_cpu, time.thread_time() - c)
                best_wall = min(best_wall, time.perf_counter() - t)
            return best_wall, best_cpu
        finally:
            for p in procs:
                p.stop()


def main() -> int:
    from benchmarks.common import machine
    print(machine())
    sizes = [float(a) for a in sys.argv[1:]] or [1.0, 4.0, 16.0]
    if os.geteuid() != 0:
        raise SystemExit("run as root: kernel KSM knobs, kpagecount")
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    print(f"machine: {model}, {os.cpu_count()} cores, kernel {platform.release()}, "
          f"{time.strftime('%Y-%m-%d')}")
    procfs = ProcFs()
    rows = []
    for size in sizes:
        wall, cpu = one_size(size, procfs)
        rows.append((size, wall, cpu))
        print(f"{size:6g} GiB: snapshot attribution {wall * 1e3:8.1f} ms wall, "
              f"{cpu * 1e3:8.1f} ms CPU ({cpu / size * 1e3:.1f} ms CPU per GiB)", flush=True)
    # least-squares slope through the origin: CPU per GiB
    per_gib = sum(s * c for s, _, c in rows) / sum(s * s for s, _, _ in rows)
    cpu_256 = per_gib * 256
    unbudgeted = cpu_256 / INTERVAL
    effective = max(INTERVAL, cpu_256 / BUDGET)    # the Refresher's rule
    print(f"\nfitted: {per_gib * 1e3:.1f} ms CPU per GiB of guest RAM")
    print(f"256 GiB: {cpu_256:.2f} s CPU per snapshot; every {INTERVAL:g} s that would be "
          f"{unbudgeted:.1%} of one core; with the {BUDGET:.0%} budget a snapshot is taken "
          f"every {effective:.0f} s: {cpu_256 / effective:.2%} of one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
