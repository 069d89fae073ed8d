"""Live scan throughput: one engine pass over a running 1 GiB process's private
anonymous memory (read through /proc/<pid>/mem, as for a guest) as a ratio to
a plain read of the same memory, best of N, measured side by side in one run.

The process is not madvised mergeable, so kernel KSM is not involved.
Run as root:  .venv/bin/python benchmarks/live_scan.py [SIZE_MIB] [REPEATS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.ksm_fixtures import start_memproc
from vmshare.engine import EngineConfig, KsmEngine
from vmshare.model import PAGE_SIZE, Vma
from vmshare.prediction.scanning import scan_sources
from vmshare.sources import LiveProcessSource


def main() -> int:
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    pages = size_mib * 256
    p = start_memproc(identical=pages // 2, unique=pages // 4,
                      zero=pages - pages // 2 - pages // 4, madvise=False)
    try:
        vma = Vma(p.address, p.address + p.pages * PAGE_SIZE, "rw-p", 0, "")
        src = LiveProcessSource(p.pid, [vma], name="proc")
        plain, scan_first, scan_inc = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            n = sum(r.npages for r in src.runs())
            plain.append(time.perf_counter() - t)
            engine = KsmEngine(EngineConfig())
            t = time.perf_counter()
            scan_sources(engine, [src])
            scan_first.append(time.perf_counter() - t)
            t = time.perf_counter()
            scan_sources(engine, [src])      # incremental: merges happen
            scan_inc.append(time.perf_counter() - t)
        src.close()
        gib = n * PAGE_SIZE / 2**30
        bp, bf, bi = min(plain), min(scan_first), min(scan_inc)
        print(f"{n:,} pages ({gib:.2f} GiB) of a live process, best of {repeats}")
        print(f"plain read:              {bp:.3f} s  ({gib / bp:.2f} GiB/s)")
        print(f"engine scan, first pass: {bf:.3f} s  ({gib / bf:.2f} GiB/s)  "
              f"ratio {bp / bf:.2f}")
        print(f"engine scan, rescan:     {bi:.3f} s  ({gib / bi:.2f} GiB/s)  "
              f"ratio {bp / bi:.2f}")
    finally:
        p.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
