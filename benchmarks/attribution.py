"""Attribution speed: `status` attribution of a 1 GiB guest-sized mapping as a
ratio to a plain read of that mapping's pagemap entries, measured in one run.

Two real processes each map SIZE MiB of private anonymous memory (half of it
identical across them, the rest unique), kernel KSM merges them (every knob
saved and restored, everything unmerged afterwards), then we time, best of N:
  plain:  reading the mapping's pagemap entries (what any tool must do)
  attrib: vmshare.observe.attribution.attribute over the same mapping (pagemap +
          kpageflags + kpagecount look-ups + fair-share arithmetic)
Run as root:  .venv/bin/python benchmarks/attribution.py [SIZE_MIB] [REPEATS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.ksm_fixtures import MemProc, converge, ksm_session, start_memproc
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.observe.attribution import attribute


def best(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    from benchmarks.common import machine
    print(machine())
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    pages = size_mib * 256
    procfs = ProcFs()
    procs: list[MemProc] = []
    with ksm_session(KsmSysfs(), pages_to_scan=100000, sleep_millisecs=0) as sysfs:
        try:
            _measure(sysfs, procfs, procs, size_mib, repeats, pages)
        finally:
            for p in procs:
                p.stop()
    return 0


def _measure(sysfs: KsmSysfs, procfs: ProcFs, procs: list[MemProc], size_mib: int,
             repeats: int, pages: int) -> None:
    print(f"filling 2 processes x {size_mib} MiB ...", flush=True)
    for _ in range(2):
        procs.append(start_memproc(identical=pages // 2, unique=pages - pages // 2, seed=9,
                                   dontfork=True))
    t = time.perf_counter()
    counters = converge(sysfs, timeout=600)
    print(f"kernel KSM converged in {time.perf_counter() - t:.1f} s: "
          f"pages_shared={counters['pages_shared']:,} "
          f"pages_sharing={counters['pages_sharing']:,}")
    p = procs[0]

    def plain() -> None:
        procfs.pagemap(p.pid, p.address, p.pages)

    zero = procfs.zero_pfn()

    def attrib() -> None:   # what `status` does for QEMU guest RAM (MADV_DONTFORK)
        attribute({"vm": procfs.pagemap(p.pid, p.address, p.pages)},
                  procfs.kpageflags, procfs.kpagecount, unforked_zero_pfn=zero)

    def attrib_flags() -> None:   # the general path: KSM bit read from kpageflags
        attribute({"vm": procfs.pagemap(p.pid, p.address, p.pages)},
                  procfs.kpageflags, procfs.kpagecount)

    fig = attribute({"vm": procfs.pagemap(p.pid, p.address, p.pages)},
                    procfs.kpageflags, procfs.kpagecount).per_vm["vm"]
    t_plain = best(plain, repeats)
    t_attr = best(attrib, repeats)
    t_flags = best(attrib_flags, repeats)
    print(f"mapping: {size_mib} MiB, {fig.resident_pages:,} resident, "
          f"{fig.ksm_pages:,} KSM pages, saved {fig.saved_pages:,.1f} pages")
    print(f"plain pagemap read            : {t_plain * 1e3:8.2f} ms")
    print(f"attribution (guest RAM, dc)   : {t_attr * 1e3:8.2f} ms  "
          f"ratio {t_attr / t_plain:.2f}x (aim: at most 3x)")
    print(f"attribution (with kpageflags) : {t_flags * 1e3:8.2f} ms  "
          f"ratio {t_flags / t_plain:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
