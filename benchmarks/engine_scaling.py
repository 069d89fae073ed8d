"""Scaling of the whole `vmshare predict --pid P` command (a fresh process,
start to answer) at 256 MiB, 1 GiB and 4 GiB of a live process: time and
peak RSS, side by side in one run; and the memory it needs beyond its
bounded buffers, per page: the growth of the peak between the two largest
sizes, over the pages added (the buffers and fixed costs cancel; from the
smallest size too, printed beside it, where the read ring may not have been
allocated whole).

Content: tests/page_mix.py (40% copies of 2,000 templates, 50% unique, 10%
zero). Run as root:  benchmarks/engine_scaling.py [MiB ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Command, fault_cost, machine, pages_sharing, run_predict
from tests.page_mix import mix_process

MIB = 2**20


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or [256, 1024, 4096]
    print(machine())
    per_fault = fault_cost()
    rows: list[tuple[int, int, Command]] = []
    print(f"{'size':>8} {'pages':>10} {'seconds':>8} {'s/GiB':>6} {'peak RSS':>9} "
          f"{'faults':>8} {'fault s':>7} {'sharing':>10}")
    for mib in sizes:
        with mix_process(mib * 256) as (pid, _):
            c = run_predict("--pid", str(pid))
        pages = int(c.output["groups"][0]["sources"][0]["pages"])
        rows.append((mib, pages, c))
        print(f"{mib:>5} MiB {pages:>10,} {c.seconds:>8.2f} {c.seconds / (mib / 1024):>6.2f} "
              f"{c.max_rss / MIB:>5.0f} MiB {c.minor_faults:>8,} "
              f"{c.minor_faults * per_fault:>7.3f} {pages_sharing(c):>10,}")
    (m0, p0, c0), (m1, p1, c1) = rows[0], rows[-1]
    per_all = (c1.max_rss - c0.max_rss) / max(1, p1 - p0)
    # the ring's chunks are allocated as the reader gets ahead of the engine: at
    # the smallest size not always all of them, so the slope between the two
    # largest sizes (ring whole at both) is the per-page figure
    mb, pb, cb = rows[-2] if len(rows) > 2 else rows[0]
    per_page = (c1.max_rss - cb.max_rss) / max(1, p1 - pb)
    linear = (c1.seconds / m1) / (c0.seconds / m0)
    table = ", ".join(f"{m} MiB {c.seconds:.2f} s / {c.max_rss / MIB:.0f} MiB" for m, _, c in rows)
    print(f"summary: {table}; "
          f"time per GiB at {m1} MiB / at {m0} MiB {linear:.2f} (linear: 1); "
          f"memory beyond the buffers {per_page:.1f} B/page from {mb} to {m1} MiB "
          f"({per_all:.1f} from {m0}) (aim <= 16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
