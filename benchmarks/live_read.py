"""Live read throughput of a process's memory vs a same-size file in page cache.

Runs side by side in one process and prints GB/s for each and their ratio:
  * live: LiveProcessSource over a child's resident private anonymous memory
    (pagemap lookup + /proc/<pid>/mem preadv, 16 MiB chunks, reused buffers);
  * file: RawImageSource over a file of the same size, already in page cache;
  * plain preadv of that file into one reused buffer (the floor).
Needs root (or ptrace rights over the child). Usage: live_read.py [MiB] [repeats]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from vmshare.model import PAGE_SIZE, Vma
from vmshare.sources import LiveProcessSource, RawImageSource

CHILD = textwrap.dedent("""
    import ctypes, mmap, os, sys
    size = int(sys.argv[1])
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block = os.urandom(1 << 20)
    for off in range(0, size, 1 << 20):
        m[off:off + (1 << 20)] = block
    print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
    sys.stdin.readline()
""")


def best_of(repeats: int, fn: Callable[[], int]) -> tuple[float, int]:
    best = float("inf")
    nbytes = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        nbytes = fn()
        best = min(best, time.perf_counter() - t0)
    return best, nbytes


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import machine
    print(machine())
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    size = mib << 20
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(size)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    addr = int(child.stdout.readline(), 16)
    try:
        with tempfile.NamedTemporaryFile(prefix="vmshare-bench-") as tmp:
            block = os.urandom(1 << 20)
            for _ in range(mib):
                tmp.write(block)
            tmp.flush()

            def live() -> int:
                with LiveProcessSource(child.pid, [Vma(addr, addr + size, "rw-p", 0, "")]) as s:
                    return sum(len(r.data) for r in s.runs())

            def file_source() -> int:
                with RawImageSource(tmp.name) as s:
                    return sum(len(r.data) for r in s.runs())

            def plain() -> int:
                buf = memoryview(bytearray(4096 * PAGE_SIZE))
                fd = os.open(tmp.name, os.O_RDONLY)
                total = 0
                try:
                    while (n := os.preadv(fd, [buf], total)) > 0:
                        total += n
                finally:
                    os.close(fd)
                return total

            plain()   # warm the page cache
            t_live, n_live = best_of(repeats, live)
            t_file, n_file = best_of(repeats, file_source)
            t_plain, n_plain = best_of(repeats, plain)
    finally:
        child.kill()
        child.wait()
    assert n_live == n_file == n_plain == size, (n_live, n_file, n_plain)
    gbs = {name: size / t / 1e9 for name, t in
           (("live", t_live), ("file", t_file), ("plain", t_plain))}
    print(f"{mib} MiB, best of {repeats}")
    print(f"live /proc/<pid>/mem (LiveProcessSource): {gbs['live']:6.2f} GB/s")
    print(f"page-cache file (RawImageSource):         {gbs['file']:6.2f} GB/s")
    print(f"page-cache file (plain preadv):           {gbs['plain']:6.2f} GB/s")
    print(f"ratio live / file source: {gbs['live'] / gbs['file']:.2f}")
    print(f"ratio live / plain read:  {gbs['live'] / gbs['plain']:.2f}")


if __name__ == "__main__":
    main()
