"""Engine throughput against xxh3_64 of the same bytes hashed in C (the
engine's own hash64 over each 16 MiB view, no engine around it).

Synthetic guest RAM: 3 sources; 40% of pages duplicated across all 3 sources,
10% zero, the rest unique. The engine is fed as the scan feeds it (runs not
retained; the pages to compare read again, here copied from the image into
one reused buffer, as the scan's fetch reads them).
Prints both speeds and their ratio, measured side by side in one run, for
each scan: 1 (hashing only), 2 (merging), 3 (steady rescan) fed on one
thread; then the merging scan hashed by two threads, as the scan's readers
hash what they read (against xxh3 on one thread still); then the
merging scan of one source of the issue's mix (2,000 repeated contents,
which the engine's store of representatives holds whole; the 3-source
image's 35,000 shared contents overflow it and are read again).
Usage: engine_throughput.py [MiB]
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine
from vmshare.engine import KsmEngine
from vmshare.engine._pages import hash64
from vmshare.model import PAGE_SIZE, PageRun, Region
from vmshare.prediction.scanning import DEFAULT_BUFFER_BYTES

CHUNK = 16 << 20


def make_image(total_mib: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    per = total_mib * (1 << 20) // 3 // PAGE_SIZE
    ndup, nzero = int(per * 0.4), int(per * 0.1)
    shared = rng.integers(0, 256, (ndup, PAGE_SIZE), dtype=np.uint8)
    out = {}
    for s in range(3):
        img = np.empty((per, PAGE_SIZE), dtype=np.uint8)
        order = rng.permutation(per)
        img[order[:ndup]] = shared
        img[order[ndup:ndup + nzero]] = 0
        rest = order[ndup + nzero:]
        img[rest] = rng.integers(0, 256, (rest.size, PAGE_SIZE), dtype=np.uint8)
        out[f"vm{s}"] = img.reshape(-1)
    return out


def make_template_image(total_mib: int, seed: int = 1) -> dict[str, np.ndarray]:
    """One source of the issue's mix (tests/page_mix.py): 40% copies of 2,000
    templates, 10% zero, the rest unique."""
    n = total_mib * (1 << 20) // PAGE_SIZE
    rng = np.random.default_rng(seed)
    a = np.zeros((n, PAGE_SIZE // 8), dtype=np.uint64)
    kind = rng.random(n)
    a[:, 0] = np.where(kind < 0.4, rng.integers(0, 2000, n), np.arange(n) + 10_000)
    a[:, 1] = 7
    a[kind >= 0.9] = 0
    return {"mix": a.view(np.uint8).reshape(-1)}


def template_merging_ratio(mib: int) -> float:
    """Scans 1 and 2 of the template mix; the merging scan's ratio."""
    images = make_template_image(mib)
    _rows(images)
    e = KsmEngine()
    engine_scan(e, images)
    th = hash_only(images)
    te = engine_scan(e, images)
    nbytes = sum(i.size for i in images.values())
    print(f"template mix (one source, {nbytes / 2**30:.2f} GiB, 2,000 repeated contents): "
          f"merging scan {nbytes / th / 1e9:.2f} vs {nbytes / te / 1e9:.2f} GB/s, "
          f"ratio {th / te:.2f}, sharing={e.counters().pages_sharing}")
    _ROWS.clear()
    return th / te


def hash_only(images: dict[str, np.ndarray]) -> float:
    out = np.empty(CHUNK // PAGE_SIZE, dtype=np.uint64)
    t = time.perf_counter()
    for img in images.values():
        mv = memoryview(img)  # type: ignore[arg-type]
        for o in range(0, len(mv), CHUNK):
            part = mv[o:o + CHUNK]
            hash64(part, out[:len(part) // PAGE_SIZE])
    return time.perf_counter() - t


_ROWS: dict[int, np.ndarray] = {}


def _rows(images: dict[str, np.ndarray]) -> np.ndarray:
    """Every page of the image by scan position (made once, outside the timing:
    the engine's fetch reads pages again from here)."""
    key = id(images)
    if key not in _ROWS:
        _ROWS[key] = np.concatenate([img.reshape(-1, PAGE_SIZE) for img in images.values()])
    return _ROWS[key]


def engine_scan(e: KsmEngine, images: dict[str, np.ndarray],
                pool: ThreadPoolExecutor | None = None) -> float:
    """One scan, fed on this thread; with ``pool``, hashed by its threads as
    the scan's readers hash (``_feed_hashed``)."""
    rows = _rows(images)
    held = [np.empty((0, PAGE_SIZE), dtype=np.uint8)]

    def fetch(pos: npt.NDArray[np.int64]) -> memoryview:
        # as the scan's own fetch (prediction.scanning.source_fetch): the pages
        # read again into one buffer reused by every call
        if held[0].shape[0] < pos.size:    # a bytearray, as source_fetch's
            held[0] = np.frombuffer(bytearray(pos.size * PAGE_SIZE),
                                    dtype=np.uint8).reshape(-1, PAGE_SIZE)
        out = held[0][:pos.size]
        np.take(rows, pos, axis=0, out=out, mode="clip")   # clip: unbuffered
        return memoryview(out.reshape(-1))  # type: ignore[arg-type]
    t = time.perf_counter()
    e.begin_scan({s: [Region("pc.ram", img.size)] for s, img in images.items()},
                 store_pages=DEFAULT_BUFFER_BYTES // PAGE_SIZE)
    views = [(s, o // PAGE_SIZE, memoryview(img)[o:o + CHUNK])  # type: ignore[arg-type]
             for s, img in images.items() for o in range(0, img.size, CHUNK)]
    if pool is None:
        for s, first, view in views:
            e.feed(PageRun(s, "pc.ram", first, view), retain=False)
    else:
        _feed_hashed(e, views, pool)
    e.end_scan(fetch)
    return time.perf_counter() - t


def _feed_hashed(e: KsmEngine, views: list[tuple[str, int, memoryview]],
                 pool: ThreadPoolExecutor, window: int = 4) -> None:
    """As the scan's readers hand runs over: each view hashed (and its
    zero-checksum pages checked) by a pool thread, at most ``window`` ahead,
    fed in order with its checksums (alone in a first scan)."""
    keep = e.needs_bytes

    def work(view: memoryview) -> tuple[npt.NDArray[np.uint64], bool]:
        h = e.checksums(view)
        return h, keep and e.zeros_hold(view, h)
    View = tuple[str, int, memoryview]
    Hashed = tuple[npt.NDArray[np.uint64], bool]
    pending: deque[tuple[View, Future[Hashed]]] = deque()
    todo = iter(views)
    for v in itertools.islice(todo, window):
        pending.append((v, pool.submit(work, v[2])))
    while pending:
        (s, first, view), job = pending.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(work, nxt[2])))
        h, zeros = job.result()
        if keep:
            e.feed(PageRun(s, "pc.ram", first, view), retain=False, checksums=h,
                   zeros_checked=zeros)
        else:
            e.feed_checksums(s, "pc.ram", first, h)


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    images = make_image(mib)
    nbytes = sum(i.size for i in images.values())
    e = KsmEngine()
    _rows(images)
    print(machine())
    print(f"image {nbytes / 2**30:.2f} GiB, {nbytes // PAGE_SIZE} pages, 3 sources "
          f"(fed as 16 MiB views of the image; engine_memory.py for memory)")
    print(f"{'scan':>4} {'xxh3 C GB/s':>11} {'engine GB/s':>12} {'ratio':>6}  counters")
    tot_h = tot_e = 0.0
    ratios: list[float] = []
    first_two = (0.0, 0.0)
    for scan in range(1, 4):
        th = hash_only(images)
        te = engine_scan(e, images)
        tot_h += th
        tot_e += te
        if scan == 2:
            first_two = (tot_h, tot_e)
        c = e.counters()
        ratios.append(th / te)
        print(f"{scan:>4} {nbytes / th / 1e9:>11.2f} {nbytes / te / 1e9:>12.2f} "
              f"{th / te:>6.2f}  shared={c.pages_shared} sharing={c.pages_sharing} "
              f"unshared={c.pages_unshared} volatile={c.pages_volatile}")
    h2, e2 = first_two
    print(f" 1-2 {nbytes * 2 / h2 / 1e9:>11.2f} {nbytes * 2 / e2 / 1e9:>12.2f} "
          f"{h2 / e2:>6.2f}  (to the converged answer: the engine settles at scan 2)")
    print(f" all {nbytes * 3 / tot_h / 1e9:>11.2f} {nbytes * 3 / tot_e / 1e9:>12.2f} "
          f"{tot_h / tot_e:>6.2f}")
    with ThreadPoolExecutor(2) as pool:     # as the scan runs: two readers hash
        e2r = KsmEngine()
        engine_scan(e2r, images, pool)
        th = hash_only(images)
        te = engine_scan(e2r, images, pool)
    print(f"  2, hashed by 2 threads as the scan's readers hash: {nbytes / te / 1e9:.2f} GB/s, "
          f"ratio {th / te:.2f} (against xxh3 on one thread)")
    _ROWS.clear()
    del images
    tm = template_merging_ratio(mib)
    print(f"summary: engine vs xxh3 in C: scan 1 {ratios[0]:.2f}, merging scan {ratios[1]:.2f} "
          f"(aim >= 0.5; hashed by 2 threads {th / te:.2f}), steady rescan {ratios[2]:.2f} "
          f"(aim >= 0.8), to the answer {h2 / e2:.2f}; merging scan of the template mix {tm:.2f}")


if __name__ == "__main__":
    main()
