"""The whole `vmshare predict --pid P` command (a fresh process, start to
answer) against kernel ksmd (pages_to_scan=100000, sleep_millisecs=0) reaching
the same converged answer, on the same 1 GiB process, side by side in one run.

Content (tests/page_mix.py): 40% copies of 2,000 page templates, 50% unique,
10% zero, shuffled. The command runs twice: "first" (nothing of vmshare in
the page cache's warm state beyond the import) and "again". Reported apart:
its minor page faults and what they cost at this machine's measured rate.
ksmd's time: from run=1 until the process's merged pages (ksm_stat's
ksm_merging_pages) hold over a full scan; ksmd also scans any other
mergeable memory on the host (printed). Every KSM knob is saved and
restored and everything is unmerged afterwards.
With ``--thp`` the process's memory is madvised HUGEPAGE (as QEMU does with
guest RAM): its all-zero subpages, which KSM never sees, cut every read into
many runs, and ksmd splits the huge pages it merges.
With ``--cold`` the page cache is dropped (sync, then vm.drop_caches=3: the
whole host's, as after a boot) just before the first run, so the command
also reads Python, numpy and vmshare from disk: the first run as on a
machine where nothing ran before.
Run as root, under the shared lock:
  benchmarks/engine_vs_ksmd.py [--thp] [--cold] [SIZE_MIB]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bytecode, fault_cost, machine, run_predict
from integration.ksm_fixtures import ksm_session
from tests.page_mix import mix_process
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs

MIB = 2**20


def ksmd_time(sysfs: KsmSysfs, pid: int, timeout: float = 300.0) -> tuple[float, int, int]:
    """Seconds from run=1 until the process's merged pages hold over a full
    scan; (seconds, merged pages, pages ksmd scanned per full scan)."""
    procfs = ProcFs()
    t0 = time.perf_counter()
    sysfs.set("run", 1)
    sysfs.wait_full_scans(2, timeout=timeout)
    last = procfs.ksm_stat(pid).ksm_merging_pages
    while True:
        scanned0 = sysfs.read_int("pages_scanned")
        sysfs.wait_full_scans(1, timeout=timeout)
        now = procfs.ksm_stat(pid).ksm_merging_pages
        if now == last:
            return time.perf_counter() - t0, now, sysfs.read_int("pages_scanned") - scanned0
        last = now


def main() -> int:
    args = [a for a in sys.argv[1:] if a not in ("--thp", "--cold")]
    thp, cold = "--thp" in sys.argv[1:], "--cold" in sys.argv[1:]
    size_mib = int(args[0]) if args else 1024
    pages = size_mib * MIB // 4096
    print(machine())
    per_fault = fault_cost()
    with mix_process(pages, mergeable=True, thp=thp) as (pid, _), \
            ksm_session(KsmSysfs(), pages_to_scan=100000, sleep_millisecs=0) as sysfs:
        thp_mib = sum(v.anon_huge_bytes for v in ProcFs().smaps(pid)) // MIB
        runs = []
        for label in ("first", "again"):
            if cold and label == "first":
                label = "first, cold page cache"
                bytecode()                    # written to disk before the drop
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            runs.append((label, run_predict("--pid", str(pid))))
        t_kernel, merged, scanned = ksmd_time(sysfs, pid)
    print(f"content: {size_mib} MiB in one process (40% copies of 2,000 templates, "
          f"50% unique, 10% zero){', madvised HUGEPAGE' if thp else ''}; in THPs when the "
          f"command ran: {thp_mib} MiB")
    for label, c in runs:
        t = c.output["totals"]
        print(f"vmshare predict ({label}): {c.seconds:.2f} s, peak RSS {c.max_rss / MIB:.0f} MiB "
              f"(aim <= 256), {c.minor_faults:,} minor faults (~{c.minor_faults * per_fault:.3f} s "
              f"at {per_fault * 1e6:.2f} us each), {c.output['groups'][0]['scans']} scans, "
              f"pages_shared+pages_sharing={t['pages_shared'] + t['pages_sharing']:,}")
    print(f"ksmd: {t_kernel:.2f} s, the process's merged pages {merged:,}; "
          f"{scanned:,} pages scanned per full scan (the process has {pages:,})")
    ratios = ", ".join(f"{label} {t_kernel / c.seconds:.2f}x" for label, c in runs)
    diff = max(abs(c.output["totals"]["pages_shared"] + c.output["totals"]["pages_sharing"]
                   - merged) for _, c in runs)
    print(f"summary: predict vs ksmd {ratios} (aim >= 2.5x); peak RSS "
          f"{max(c.max_rss for _, c in runs) / MIB:.0f} MiB (aim <= 256); merged pages "
          f"within {diff} of ksmd's (the command also reads the process's heap)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
