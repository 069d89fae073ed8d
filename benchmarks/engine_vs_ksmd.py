"""Time to the converged answer for the same 1 GiB: the userspace engine
(reading the memory live, every scan) versus kernel ksmd at
pages_to_scan=100000, sleep_millisecs=0, measured side by side in one run.

Content: four real processes of SIZE/4 MiB private anonymous memory each,
half of it identical across them, a quarter unique, a quarter zero.
Every KSM knob is saved and restored and everything is unmerged afterwards.
Run as root:  .venv/bin/python benchmarks/engine_vs_ksmd.py [SIZE_MIB]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.ksm_fixtures import MemProc, start_memproc
from vmshare.dumps import LiveProcessSource
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import PAGE_SIZE, Vma
from vmshare.predict import Target, run_until_converged


def kernel_converged(sysfs: KsmSysfs, timeout: float = 300) -> tuple[float, dict[str, int]]:
    """Seconds from run=1 until pages_sharing is unchanged over a full scan."""
    t0 = time.perf_counter()
    sysfs.set("run", 1)
    sysfs.wait_full_scans(2, timeout=timeout)
    last = sysfs.read_int("pages_sharing")
    while True:
        sysfs.wait_full_scans(1, timeout=timeout)
        now = sysfs.read_int("pages_sharing")
        if now == last:
            return time.perf_counter() - t0, sysfs.counters()
        last = now


def target(p: MemProc, name: str) -> Target:
    vma = Vma(p.address, p.address + p.pages * PAGE_SIZE, "rw-p", 0, "")
    return Target(name, "pid", lambda: LiveProcessSource(p.pid, [vma], name=name))


def main() -> int:
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    per = size_mib * 256 // 4
    sysfs = KsmSysfs()
    snap = sysfs.snapshot()
    procs: list[MemProc] = []
    try:
        sysfs.unmerge()
        for name, value in (("pages_to_scan", 100000), ("sleep_millisecs", 0),
                            ("max_page_sharing", 256), ("use_zero_pages", 0),
                            ("smart_scan", 0), ("merge_across_nodes", 1)):
            sysfs.set(name, value)
        for _ in range(4):
            procs.append(start_memproc(identical=per // 2, unique=per // 4,
                                       zero=per - per // 2 - per // 4, seed=5))
        targets = [target(p, f"p{i}") for i, p in enumerate(procs)]
        engine = KsmEngine(EngineConfig())
        t0 = time.perf_counter()
        scans, converged, _ = run_until_converged(engine, targets, max_scans=8)
        t_engine = time.perf_counter() - t0
        t_kernel, kc = kernel_converged(sysfs)
        ec = engine.counters()
        print(f"content: {size_mib} MiB in 4 processes (1/2 identical, 1/4 unique, 1/4 zero)")
        print(f"engine: {t_engine:.2f} s, {scans} scans (converged={converged}), "
              f"pages_sharing={ec.pages_sharing:,} pages_shared={ec.pages_shared:,}")
        print(f"ksmd:   {t_kernel:.2f} s, {kc['full_scans']} full scans, "
              f"pages_sharing={kc['pages_sharing']:,} pages_shared={kc['pages_shared']:,}")
        print(f"engine speed-up over ksmd: {t_kernel / t_engine:.2f}x, aim >= 2x "
              f"(same answer: {ec.pages_sharing == kc['pages_sharing']})")
    finally:
        for p in procs:
            p.stop()
        sysfs.unmerge()
        sysfs.restore(snap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
