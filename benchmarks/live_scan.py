"""The engine's time to the converged answer over 1 GiB of a live process
against the read floor: two sequential reads of the same memory (the answer
needs every page read twice: the unstable tree admits a page only if its
checksum held over a scan), measured side by side in one run, best of N.

Content: tests/page_mix.py (40% copies of 2,000 templates, 50% unique, 10%
zero). The engine: ``predict`` in this process (imports paid before), its
reading split over the cores; its CPU time (all threads) is printed too, a
figure other work on the machine moves less. Also side by side: one read
through the filter that drops the all-zero pages kernel KSM never counts
(KernelVisiblePages) against the bare read. ``--thp``: the mix madvised
HUGEPAGE (THP memory, where the filter must ask /proc/kpageflags). Run as root:
  benchmarks/live_scan.py [SIZE_MIB] [REPEATS] [--thp]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine
from tests.page_mix import mix_process
from vmshare.engine import EngineConfig
from vmshare.ksm.procfs import ProcFs
from vmshare.model import PAGE_SIZE
from vmshare.prediction.predict import pid_target, predict
from vmshare.sources.visible import KernelVisiblePages


def read_once(pid: int, filtered: bool = False) -> tuple[float, int]:
    """One sequential read of the process's memory (16 MiB reads into one
    buffer), bare or through the zero-page filter."""
    src = pid_target(pid, ProcFs()).open()
    assert isinstance(src, KernelVisiblePages)
    with src:
        t = time.perf_counter()
        n = sum(r.npages for r in (src.runs() if filtered else src.inner.runs()))
        return time.perf_counter() - t, n


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--thp"]
    thp = "--thp" in sys.argv[1:]
    size_mib = int(args[0]) if args else 1024
    repeats = int(args[1]) if len(args) > 1 else 3
    print(machine())
    floor, engine, cpu, bare, filtered = [], [], [], [], []
    with mix_process(size_mib * 256, thp=thp) as (pid, _):
        for _ in range(repeats):
            t1, n = read_once(pid)
            t2, _ = read_once(pid)
            floor.append(t1 + t2)
            bare.append(t1)
            filtered.append(read_once(pid, filtered=True)[0])
            t, c = time.perf_counter(), time.process_time()
            result = predict([pid_target(pid, ProcFs())], EngineConfig())
            engine.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    gib = n * PAGE_SIZE / 2**30
    bf, be = min(floor), min(engine)
    print(f"{n:,} pages ({gib:.2f} GiB) of a live process{' (THP)' if thp else ''}, "
          f"best of {repeats}")
    print(f"one read: bare {min(bare):.3f} s, through the zero-page filter "
          f"{min(filtered):.3f} s")
    print(f"read floor (two sequential reads): {bf:.3f} s ({2 * gib / bf:.2f} GiB/s)")
    print(f"engine to the answer ({result.groups[0].scans} scans, "
          f"pages_sharing {result.totals()['pages_sharing']:,}): {be:.3f} s, "
          f"CPU {min(cpu):.3f} s")
    print(f"summary: engine / read floor {be / bf:.2f} (aim <= 2); all runs: engine "
          f"{', '.join(f'{x:.2f}' for x in engine)} s, floor "
          f"{', '.join(f'{x:.2f}' for x in floor)} s; one read bare {min(bare):.2f} s, "
          f"filtered {min(filtered):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
