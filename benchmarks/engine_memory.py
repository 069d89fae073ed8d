"""Engine memory per scanned page: peak RSS increase over the data size.

Runs in a fresh subprocess: builds the synthetic image of engine_throughput.py
(data resident first), runs a warm-up engine over 3 MiB of the same kind
(so the one-time costs are paid before the baseline: code pages of numpy and
the engine faulted in, lazily imported modules such as numpy.ma; about 2 MB,
printed), resets the peak-RSS counter (/proc/self/clear_refs 5) so the
baseline already holds the data, runs 3 scans and reports
(VmHWM - VmRSS at baseline) / pages. The fed buffers are the image itself (the
engine keeps references to a scan's runs until end_scan, never copies): that is
data, not engine overhead. Usage: engine_memory.py [MiB]
"""

from __future__ import annotations

import subprocess
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(mib: int) -> None:
    from engine_throughput import engine_scan, make_image  # type: ignore[import-not-found]

    from vmshare.engine import KsmEngine
    from vmshare.model import PAGE_SIZE

    images = make_image(mib)
    pages = sum(i.size for i in images.values()) // PAGE_SIZE
    before = _status("VmRSS")
    warm, small = KsmEngine(), make_image(3, seed=1)
    for _ in range(3):
        engine_scan(warm, small)
    del warm, small
    e = KsmEngine()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                     # VmHWM := VmRSS
    base = _status("VmRSS")
    print(f"one-time costs paid by the warm-up (3 MiB, 3 scans): "
          f"{(base - before) / 2**20:.1f} MiB")
    for scan in range(1, 4):
        engine_scan(e, images)
        grow = _status("VmHWM") - base
        print(f"scan {scan}: peak RSS over data {grow / 2**20:.1f} MiB = "
              f"{grow / pages:.1f} bytes/page ({pages} pages); aim <= 24")


def main() -> None:
    mib = sys.argv[1] if len(sys.argv) > 1 else "1024"
    if len(sys.argv) > 2 and sys.argv[2] == "--child":
        child(int(mib))
        return
    subprocess.run([sys.executable, __file__, mib, "--child"], check=True)


if __name__ == "__main__":
    main()
