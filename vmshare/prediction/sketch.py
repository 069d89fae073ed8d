"""Content sketches: a content-based sample of a VM's pages, made by reading them
through the page sources (live /proc/<pid>/mem, dumps).

Two keyed values per page, both SipHash-2-4 under the fleet key (C loops in
vmshare.engine._pages):

* its *decision value*, from its *fingerprint*: 8 of its 8-byte words, one in
  each of 8 cache lines spread over the page (``FP_OFFSETS``). Reading those
  costs a fraction of reading the page. A page whose fingerprint words are
  all zero (an all-zero page, a sparse one) is decided by its whole content
  instead: its decision value is its identity. Only the high 32 bits count
  (thresholds are multiples of 2**32; the file stores 4 bytes per sample).
* its *identity*: SipHash of the xxh3-128 of the whole page, computed only
  for the pages that need it.

Equal pages have equal fingerprints, so every copy of a content has the same
decision value, in every VM: a fingerprint group (the contents sharing one
decision value) is sampled, everywhere, when its value is under the threshold
(rate x 2**64), with probability equal to the rate and independently of other
groups; without the key nobody can tell which content a value stands for,
nor choose contents that will be sampled. A VM's sample lists, for each
content of its sampled groups, its identity, its decision value and its page
count: so only those groups' pages are read whole. Also read whole, and
counted exactly: pages whose fingerprint words are zero (the all-zero pages
are counted apart), and every group on ``HEAVY_MIN`` or more of the VM's
pages (*exact* groups: each content in them is listed with its count,
sampled or not, the ``HEAVY_CAP`` most repeated at most; a few groups
repeated thousands of times would otherwise carry most of the sharing and
make the estimate lumpy). Contents of one group are sampled together, so the
variance is taken over groups (vmshare.engine.sampled).

Reading: a file source stored plainly (raw, ELF) is read in place, mapped
(fingerprints of every page, then whole pages only where needed); a live
process, a kdump file or anything else streams every page once and both
values are computed for all of them.

Bounded size: a VM's sample keeps at most ``max_entries`` contents; when more
fall under the threshold, the sample keeps the groups of smallest values and
the threshold drops to the first group left out (the sample is then exactly
a sample at that lower rate: thresholds nest), so a sketch's size does not
grow with RAM beyond the cap.

File format, key and storage rules: vmshare.records.sketchfile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from vmshare.engine._pages import fp_values, id_values, repeated
from vmshare.errors import DumpError
from vmshare.ksm.procfs import ProcFs
from vmshare.model import PAGE_SIZE, PageRun
from vmshare.prediction.scanning import default_workers
from vmshare.prediction.targets import Target
from vmshare.records.sketchfile import (
    DECISION_MASK,
    Sketch,
    SketchKey,
    VmSketch,
    rate_threshold,
    restrict,
)
from vmshare.sources import LiveProcessSource, PageSource
from vmshare.sources.base import FileSource, masked_runs
from vmshare.sources.visible import KernelVisiblePages

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
#: one fingerprint group in 16 sampled: about 250 KiB of sketch per GiB of
#: distinct content; estimates within a few % at 1 GiB (README: estimates)
DEFAULT_RATE = 1 / 16
#: at most this many samples per VM (16 MiB): the rate drops above 16 GiB
DEFAULT_MAX_ENTRIES = 1 << 20
#: a group on this many of a VM's pages is counted exactly (its contents are
#: listed whole): the sample's variance then comes only from smaller groups
HEAVY_MIN = 8
#: at most this many exactly counted contents per VM (the most repeated)
HEAVY_CAP = 1 << 16


def zero_identity(key: SketchKey) -> int:
    """The identity of the all-zero page under ``key``."""
    out = np.zeros(1, np.uint64)
    id_values(bytes(PAGE_SIZE), np.zeros(1, np.int64), key.k0, key.k1, out)
    return int(out[0])


@dataclass
class PageValues:
    """A VM's pages as the sample needs them: ``pages`` read; for the pages whose
    identity was computed, their decision value (high 32 bits), identity, and
    whether their group is exact (on ``HEAVY_MIN`` or more of the VM's pages)."""

    pages: int
    decision: U64
    identity: U64
    exact: npt.NDArray[np.bool_]


def _exact_groups(decision: U64, heavy_min: int) -> npt.NDArray[np.bool_]:
    """Which pages have a decision value that ``heavy_min`` or more pages have."""
    out = np.empty(decision.size, np.uint8)
    repeated(np.ascontiguousarray(decision), heavy_min, out)
    return out.view(np.bool_)


def _identities(runs: list[PageRun], starts: I64, pages: I64, key: SketchKey) -> U64:
    """Identities of the pages at global positions ``pages`` (ascending)."""
    out = np.empty(pages.size, np.uint64)
    cut = np.searchsorted(pages, starts)
    for r, run in enumerate(runs):
        a, b = int(cut[r]), int(cut[r + 1])
        if b > a:
            id_values(run.data, pages[a:b] - starts[r], key.k0, key.k1, out[a:b])
    return out


def _fingerprints(runs: list[PageRun], key: SketchKey) -> tuple[U64, npt.NDArray[np.bool_]]:
    n = sum(len(r.data) // PAGE_SIZE for r in runs)
    dec, sparse = np.empty(n, np.uint64), np.empty(n, np.uint8)
    at = 0
    for run in runs:
        k = len(run.data) // PAGE_SIZE
        fp_values(run.data, key.k0, key.k1, dec[at:at + k], sparse[at:at + k])
        at += k
    return dec, sparse.view(np.bool_)


def mapped_values(runs: list[PageRun], key: SketchKey, threshold: int,
                  heavy_min: int = HEAVY_MIN) -> PageValues:
    """Values of pages that can be read in place (mapped): fingerprints of all,
    identities of those that need them. Raises OSError (a mapped file shrank)."""
    dec, sparse = _fingerprints(runs, key)
    sizes = [len(r.data) // PAGE_SIZE for r in runs]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    where_sparse = np.flatnonzero(sparse).astype(np.int64)
    ident = np.zeros(dec.size, np.uint64)
    ident[where_sparse] = dec[where_sparse] = _identities(runs, starts, where_sparse, key)
    dec &= np.uint64(DECISION_MASK)
    exact = _exact_groups(dec, heavy_min)
    rest = ~sparse & ((dec < np.uint64(threshold)) | exact)
    at = np.flatnonzero(rest).astype(np.int64)
    ident[at] = _identities(runs, starts, at, key)
    where = np.flatnonzero(rest | sparse)
    return PageValues(dec.size, dec[where], ident[where], exact[where])


def streamed_values(source: PageSource, key: SketchKey, heavy_min: int = HEAVY_MIN
                    ) -> PageValues:
    """Values of every page of a source read as a stream (16 bytes a page kept),
    a read at a time (``masked_runs``: its pages kept, where a live source
    drops some)."""
    decs, idents, sparses = [], [], []
    for run, present in masked_runs(source):
        dec, sparse = _fingerprints([run], key)
        ident = np.empty(dec.size, np.uint64)
        id_values(run.data, np.arange(dec.size, dtype=np.int64), key.k0, key.k1, ident)
        if present is not None:
            dec, sparse, ident = dec[present], sparse[present], ident[present]
        decs.append(dec)
        idents.append(ident)
        sparses.append(sparse)
    if not decs:
        z = np.zeros(0, np.uint64)
        return PageValues(0, z, z, np.zeros(0, bool))
    dec, ident, sparse = np.concatenate(decs), np.concatenate(idents), np.concatenate(sparses)
    dec = np.where(sparse, ident, dec) & np.uint64(DECISION_MASK)
    return PageValues(dec.size, dec, ident, _exact_groups(dec, heavy_min))


def sample(pv: PageValues, threshold: int, cap: int, zero_id: int,
           heavy_cap: int = HEAVY_CAP) -> tuple[VmSketch, int]:
    """A VM's sample from its page values: all-zero pages counted, the contents of
    its exact groups (the ``heavy_cap`` most repeated) counted exactly, and the
    contents of the other groups under the threshold, at most ``cap`` of them
    (the threshold then drops: see the module docstring). Returns the sketch
    (no name) and the threshold it obeys."""
    zero = pv.identity == np.uint64(zero_id)
    keep = ~zero
    dec, ident, exact = pv.decision[keep], pv.identity[keep], pv.exact[keep]
    hv, hc = np.unique(ident[exact], return_counts=True)
    light = ~exact & (dec < np.uint64(threshold))
    if hv.size > heavy_cap:
        top = np.sort(np.argsort(-hc, kind="stable")[:heavy_cap])
        light |= exact & ~np.isin(ident, hv[top]) & (dec < np.uint64(threshold))
        hv, hc = hv[top], hc[top]
    sv, first, sc = np.unique(ident[light], return_index=True, return_counts=True)
    sd = dec[light][first]
    order = np.lexsort((sv, sd))
    sv, sd, sc = sv[order], sd[order], sc[order]
    if sv.size > cap:
        threshold = max(int(sd[cap]), 1 << 32)
        n = int(np.searchsorted(sd, np.uint64(threshold)))
        sv, sd, sc = sv[:n], sd[:n], sc[:n]
    vm = VmSketch("", None, 0, pv.pages, int(np.count_nonzero(zero)), sv,
                  sc.astype(np.uint32), hv, hc.astype(np.uint32), sd)
    return vm, threshold


def sketch_pages(source: PageSource, key: SketchKey, threshold: int,
                 cap: int = DEFAULT_MAX_ENTRIES) -> tuple[VmSketch, int]:
    """Sample one source's pages; returns its sketch (named as the source, no
    group, ``started`` unset) and the threshold its sample obeys. Reads a file
    stored plainly in place (mapped), anything else as a stream. Raises
    DumpError and what the source raises."""
    if isinstance(source, FileSource) and source.stored_extents() is not None:
        with source.mapped_runs() as runs:
            try:
                pv = mapped_values(runs, key, threshold)
            except OSError as exc:
                raise DumpError(f"{source.path}: the file shrank while it was read "
                                f"({exc.strerror})") from exc
    else:
        pv = streamed_values(source, key)
    vm, thr = sample(pv, threshold, cap, zero_identity(key))
    return replace(vm, name=source.name), thr


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
                   progress: Callable[[float, str], None] | None = None,
                   workers: int | None = None) -> Sketch:
    """One sketch of ``targets`` (a host's sketch: one entry per target, with its
    trust group from ``groups``). The sources are opened here, one after the
    other, and read by ``workers`` threads at once (default: one per idle core,
    as the exact scan's readers; the loops run without the GIL). Raises what
    the sources raise, SketchError."""
    threshold = rate_threshold(rate)
    opened: list[tuple[Target, PageSource]] = []
    try:
        for t in targets:
            src = t.open()
            if src is not None:
                opened.append((t, src))

        def one(item: tuple[Target, PageSource]) -> tuple[VmSketch, int, int]:
            vm, thr = sketch_pages(item[1], key, threshold, max_entries)
            return vm, thr, started_at(item[1], procfs)

        n = max(1, min(len(opened), workers or default_workers()))
        done: list[tuple[VmSketch, int, int]] = []
        with ThreadPoolExecutor(n, thread_name_prefix="vmshare-sketch") as pool:
            results = pool.map(one, opened) if n > 1 else map(one, opened)
            for i, result in enumerate(results):
                if progress is not None:
                    progress(i / max(1, len(opened)), f"sketched {opened[i][0].name}")
                done.append(result)
    finally:
        for _, src in opened:
            src.close()
    if progress is not None:
        progress(1.0, "done")
    low = min([threshold] + [thr for _, thr, _ in done])
    vms = [replace(restrict(vm, low), name=t.name, group=(groups or {}).get(t.name, t.group),
                   started=started) for (t, _), (vm, _, started) in zip(opened, done, strict=True)]
    return Sketch(host, key.key_id, threshold, low, int(time.time()), tuple(vms))
