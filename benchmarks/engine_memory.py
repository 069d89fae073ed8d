"""Engine memory per scanned page: peak RSS increase over the data size.

Builds the same synthetic image as engine_throughput.py (data resident first),
then samples RSS (/proc/self/statm) every millisecond while the engine runs to
convergence, and reports (peak RSS - RSS with the data loaded) / pages.
Usage: engine_memory.py [MiB]
"""

from __future__ import annotations

import os
import sys
import threading

from engine_throughput import engine_scan, make_image  # type: ignore[import-not-found]

from vmshare.engine import KsmEngine
from vmshare.model import PAGE_SIZE


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    images = make_image(mib)
    pages = sum(i.size for i in images.values()) // PAGE_SIZE
    base = rss_now()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak[0] = max(peak[0], rss_now())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    e = KsmEngine()
    for scan in range(1, 4):
        engine_scan(e, images)
        grow = max(peak[0], rss_now()) - base
        print(f"scan {scan}: peak RSS over data {grow / 2**20:.1f} MiB = "
              f"{grow / pages:.1f} bytes/page ({pages} pages); aim <= 24")
    stop.set()
    t.join()


if __name__ == "__main__":
    main()
