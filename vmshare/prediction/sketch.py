"""Content sketches: a content-based sample of a VM's pages, made by reading them
through the page sources (live /proc/<pid>/mem, dumps).

Each page is hashed (xxh3-128, the engine's ``_pages.hash128``) and the 16-byte
hash is hashed again under the fleet key (SipHash-2-4, ``siphash24``, computed
here over numpy arrays): the *sample value*. A page is kept when its sample
value is under the threshold (rate x 2**64), so a content is sampled in every
VM or in none, with probability equal to the rate and independently of other
contents (SipHash is a keyed pseudo-random function); without the key nobody
can tell which content a value stands for, nor choose contents that will be
sampled. All-zero pages are counted apart, exactly, and so is each content on
``HEAVY_MIN`` or more of the VM's pages (its *heavy* contents, sampled or not:
a few contents repeated thousands of times would otherwise carry most of the
sharing and make the estimate lumpy; vmshare.engine.sampled). The sample keeps,
per value, the content's page count in this VM.

Bounded size: a VM's sample keeps at most ``max_entries`` values; when more
contents fall under the threshold, the sample keeps the smallest values and
the threshold drops to the next one (the sample is then exactly a sample at
that lower rate: thresholds nest), so a sketch's size does not grow with RAM
beyond the cap.

File format, key and storage rules: vmshare.records.sketchfile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from vmshare.engine._pages import hash128
from vmshare.ksm.procfs import ProcFs
from vmshare.model import PAGE_SIZE
from vmshare.prediction.targets import Target
from vmshare.records.sketchfile import (
    Sketch,
    SketchKey,
    VmSketch,
    rate_threshold,
    restrict,
)
from vmshare.sources import LiveProcessSource, PageSource
from vmshare.sources.base import FileSource
from vmshare.sources.visible import KernelVisiblePages

U64 = npt.NDArray[np.uint64]
#: one content in 16 sampled: 160 KiB of sketch per GiB of distinct content;
#: estimates within a few % at 1 GiB (README: estimates)
DEFAULT_RATE = 1 / 16
#: at most this many samples per VM (12 MiB): the rate drops above 16 GiB
DEFAULT_MAX_ENTRIES = 1 << 20
#: a content on this many of a VM's pages is counted exactly (heavy): the
#: sample's variance then comes only from contents on fewer pages
HEAVY_MIN = 8
#: at most this many heavy contents per VM (the most repeated)
HEAVY_CAP = 1 << 16

_C = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)
_ZERO = np.zeros(2, np.uint64)
hash128(bytes(PAGE_SIZE), _ZERO)
ZERO_HASH = (int(_ZERO[0]), int(_ZERO[1]))


def _rotl(x: U64, r: int) -> U64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _rounds(v: list[U64], n: int) -> None:
    for _ in range(n):
        v[0] += v[1]
        v[1] = _rotl(v[1], 13) ^ v[0]
        v[0] = _rotl(v[0], 32)
        v[2] += v[3]
        v[3] = _rotl(v[3], 16) ^ v[2]
        v[0] += v[3]
        v[3] = _rotl(v[3], 21) ^ v[0]
        v[2] += v[1]
        v[1] = _rotl(v[1], 17) ^ v[2]
        v[2] = _rotl(v[2], 32)


def siphash24(key: SketchKey, lo: U64, hi: U64) -> U64:
    """SipHash-2-4 under ``key`` of each 16-byte message lo || hi (little-endian
    words), one result per element."""
    k = (np.uint64(key.k0), np.uint64(key.k1))
    n = lo.size
    v = [np.full(n, np.uint64(_C[i]) ^ k[i % 2], np.uint64) for i in range(4)]
    with np.errstate(over="ignore"):
        for m in (lo, hi, np.full(n, np.uint64(16 << 56), np.uint64)):
            v[3] ^= m
            _rounds(v, 2)
            v[0] ^= m
        v[2] ^= np.uint64(0xFF)
        _rounds(v, 4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def sample(values: U64, threshold: int, cap: int, heavy_min: int = HEAVY_MIN,
           heavy_cap: int = HEAVY_CAP) -> tuple[VmSketch, int]:
    """A VM's sample from its pages' sample values (zero pages already taken out):
    its heavy contents (>= ``heavy_min`` pages, the ``heavy_cap`` most repeated)
    counted exactly, and the other contents under the threshold, at most ``cap``
    of them (the threshold then drops: see the module docstring). Returns the
    sketch (no name) and the threshold its sample obeys."""
    uniq, counts = np.unique(values, return_counts=True)
    heavy = np.zeros(uniq.size, bool)
    many = np.flatnonzero(counts >= heavy_min)
    if many.size > heavy_cap:
        many = many[np.argsort(-counts[many], kind="stable")[:heavy_cap]]
    heavy[many] = True
    keep = ~heavy & (uniq < np.uint64(threshold))
    sv, sc = uniq[keep], counts[keep]
    if sv.size > cap:
        threshold = int(sv[cap])
        sv, sc = sv[:cap], sc[:cap]
    vm = VmSketch("", None, 0, 0, 0, sv, sc.astype(np.uint32), uniq[heavy],
                  counts[heavy].astype(np.uint32))
    return vm, threshold


def sketch_pages(source: PageSource, key: SketchKey, threshold: int,
                 cap: int = DEFAULT_MAX_ENTRIES) -> tuple[VmSketch, int]:
    """Sample one source's pages; returns its sketch (named as the source, no
    group, ``started`` unset) and the threshold its sample obeys. Holds 8 bytes
    per page read until the end (to find the heavy contents)."""
    parts: list[U64] = []
    pages = zeros = 0
    for run in source.runs():
        n = len(run.data) // PAGE_SIZE
        h = np.empty(2 * n, np.uint64)
        hash128(run.data, h)
        lo, hi = h[0::2], h[1::2]
        zero = (lo == np.uint64(ZERO_HASH[0])) & (hi == np.uint64(ZERO_HASH[1]))
        nz = int(np.count_nonzero(zero))
        pages += n
        zeros += nz
        if nz:
            lo, hi = lo[~zero], hi[~zero]
        parts.append(siphash24(key, np.ascontiguousarray(lo), np.ascontiguousarray(hi)))
    allv = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    vm, thr = sample(allv, threshold, cap)
    return replace(vm, name=source.name, pages=pages, zero_pages=zeros), thr


def process_started(pid: int, procfs: ProcFs | None = None) -> int:
    """When process ``pid`` started, Unix seconds (to within a second: the boot
    time comes from /proc/uptime). Raises ProcessGone, ProcfsError."""
    pf = procfs or ProcFs()
    return int(pf.boot_time() + pf.start_time(pid) / os.sysconf("SC_CLK_TCK"))


def started_at(source: PageSource, procfs: ProcFs | None = None) -> int:
    """When what the source reads began: the process's start (live), the dump's mtime."""
    inner = source.inner if isinstance(source, KernelVisiblePages) else source
    if isinstance(inner, LiveProcessSource):
        return process_started(inner.pid, procfs)
    if isinstance(inner, FileSource):
        return int(os.stat(inner.path).st_mtime)
    return 0


def sketch_targets(targets: Sequence[Target], key: SketchKey, *, host: str,
                   rate: float = DEFAULT_RATE, max_entries: int = DEFAULT_MAX_ENTRIES,
                   groups: dict[str, str] | None = None, procfs: ProcFs | None = None,
                   progress: Callable[[float, str], None] | None = None) -> Sketch:
    """One sketch of ``targets`` (a host's sketch: one entry per target, with its
    trust group from ``groups``). Raises what the sources raise, SketchError."""
    threshold = rate_threshold(rate)
    vms: list[VmSketch] = []
    low = threshold
    for i, t in enumerate(targets):
        if progress is not None:
            progress(i / max(1, len(targets)), f"sketching {t.name}")
        src = t.open()
        if src is None:
            continue
        try:
            vm, thr = sketch_pages(src, key, threshold, max_entries)
            started = started_at(src, procfs)
        finally:
            src.close()
        low = min(low, thr)
        vms.append(replace(vm, name=t.name, group=(groups or {}).get(t.name, t.group),
                           started=started))
    if progress is not None:
        progress(1.0, "done")
    return Sketch(host, key.key_id, threshold, low, int(time.time()),
                  tuple(restrict(v, low) for v in vms))
