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

from integration.ksm_fixtures import MemProc, converge, ksm_session, start_memproc
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import PAGE_SIZE, Vma
from vmshare.prediction.predict import Target, run_until_converged
from vmshare.sources import LiveProcessSource


def target(p: MemProc, name: str) -> Target:
    vma = Vma(p.address, p.address + p.pages * PAGE_SIZE, "rw-p", 0, "")
    return Target(name, "pid", lambda: LiveProcessSource(p.pid, [vma], name=name))


def main() -> int:
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    per = size_mib * 256 // 4
    procs: list[MemProc] = []
    with ksm_session(KsmSysfs(), pages_to_scan=100000, sleep_millisecs=0) as sysfs:
        try:
            _compare(sysfs, procs, size_mib, per)
        finally:
            for p in procs:
                p.stop()
    return 0


def _compare(sysfs: KsmSysfs, procs: list[MemProc], size_mib: int, per: int) -> None:
    for _ in range(4):
        procs.append(start_memproc(identical=per // 2, unique=per // 4,
                                   zero=per - per // 2 - per // 4, seed=5))
    targets = [target(p, f"p{i}") for i, p in enumerate(procs)]
    engine = KsmEngine(EngineConfig())
    t0 = time.perf_counter()
    scans, converged, _ = run_until_converged(engine, targets, max_scans=8)
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()      # from run=1 until pages_sharing holds over a full scan
    kc = converge(sysfs, timeout=300, min_scans=2)
    t_kernel = time.perf_counter() - t0
    ec = engine.counters()
    print(f"content: {size_mib} MiB in 4 processes (1/2 identical, 1/4 unique, 1/4 zero)")
    print(f"engine: {t_engine:.2f} s, {scans} scans (converged={converged}), "
          f"pages_sharing={ec.pages_sharing:,} pages_shared={ec.pages_shared:,}")
    print(f"ksmd:   {t_kernel:.2f} s, {kc['full_scans']} full scans, "
          f"pages_sharing={kc['pages_sharing']:,} pages_shared={kc['pages_shared']:,}")
    print(f"engine speed-up over ksmd: {t_kernel / t_engine:.2f}x, aim >= 2x "
          f"(same answer: {ec.pages_sharing == kc['pages_sharing']})")


if __name__ == "__main__":
    raise SystemExit(main())
