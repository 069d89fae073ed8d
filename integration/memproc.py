"""A real process with known private anonymous memory, for tests against kernel KSM.

Usage: python -m integration.memproc --identical PAGES --unique PAGES --zero PAGES
       [--seed N] [--no-madvise]
Maps MAP_PRIVATE|MAP_ANONYMOUS memory, fills it (identical pages: same for every
process with the same seed, all distinct from each other; unique pages: distinct
everywhere; zero pages: written with zeros so they are resident), marks it
MADV_MERGEABLE, prints "ready <address hex> <pages>" and waits for stdin to close.
Sending "mremap\n" moves the mapping (mremap MAYMOVE) and prints the new address.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import mmap
import os
import sys

PAGE = 4096
MADV_MERGEABLE = 12
MADV_DONTFORK = 10
MADV_HUGEPAGE = 14
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def page_content(seed: bytes, index: int) -> bytes:
    block = hashlib.sha256(seed + index.to_bytes(8, "little")).digest()
    return block * (PAGE // len(block))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identical", type=int, default=0)
    ap.add_argument("--unique", type=int, default=0)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-madvise", action="store_true")
    ap.add_argument("--dontfork", action="store_true", help="MADV_DONTFORK, as QEMU does")
    ap.add_argument("--read-only", type=int, default=0, metavar="PAGES",
                    help="a second, THP-advised mapping that is only read (maps the "
                         "huge zero page); its address and size follow on the ready line")
    a = ap.parse_args()
    total = a.identical + a.unique + a.zero
    buf = mmap.mmap(-1, total * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(a.identical):
        buf[i * PAGE:(i + 1) * PAGE] = page_content(b"identical-%d" % a.seed, i)
    own = os.urandom(16)
    for i in range(a.unique):
        j = a.identical + i
        buf[j * PAGE:(j + 1) * PAGE] = page_content(own, i)
    for i in range(a.zero):
        j = a.identical + a.unique + i
        buf[j * PAGE:(j + 1) * PAGE] = bytes(PAGE)
    if not a.no_madvise and total:
        buf.madvise(MADV_MERGEABLE)
    if a.dontfork and total:
        buf.madvise(MADV_DONTFORK)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if total else 0
    extra = ""
    if a.read_only:
        ro = mmap.mmap(-1, a.read_only * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        ro.madvise(MADV_HUGEPAGE)
        if a.dontfork:
            ro.madvise(MADV_DONTFORK)
        if not a.no_madvise:
            ro.madvise(MADV_MERGEABLE)
        for i in range(a.read_only):
            ro[i * PAGE]          # read fault only
        extra = f" {ctypes.addressof(ctypes.c_char.from_buffer(ro)):x} {a.read_only}"
    print(f"ready {addr:x} {total}{extra}", flush=True)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    for line in sys.stdin:
        if line.strip() == "mremap" and total:
            # Reserve a new place, then move the pages there (the kernel keeps
            # them, and KSM must follow the move: the 2009 mremap fix).
            target = libc.mmap(None, total * PAGE, 0, 0x22, -1, 0)
            new = libc.mremap(addr, total * PAGE, total * PAGE,
                              MREMAP_MAYMOVE | MREMAP_FIXED, target)
            if new in (None, ctypes.c_void_p(-1).value):
                print(f"error mremap errno {ctypes.get_errno()}", flush=True)
                continue
            addr = new
            print(f"moved {addr:x} {total}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
