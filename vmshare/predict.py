"""Prediction: what kernel KSM would save if the given memory were mergeable.

Builds page sources for libvirt/QEMU domains (their eligible RAM backends,
read live from /proc/<pid>/mem), guest memory dumps (``open_dump``) and any
process's private anonymous memory, drives the userspace engine over them
and returns the figures with the kernel's counter names. Nothing here prints.

Each scan re-opens every live source, so a mapping that moved, a guest that
was restored into a new QEMU process (new pid) or a resized backend arrives
with a new ``Region.generation`` and the engine drops what it knew of the old
one. ``LiveScanner`` keeps one engine across passes (``vmshare scan``);
``predict`` runs a fresh engine until its counters stop changing.

Buffers: the engine references fed bytes until ``end_scan`` while sources
reuse one buffer per run, so each run is copied once. A scan therefore holds
the resident memory it scanned (the engine's contract, not a choice here).
With soft-dirty tracking (``ScanArena(soft_dirty=True)``: the default of
``predict``/``run_until_converged``, opt-in for ``LiveScanner``) live sources
read straight into copies kept between scans and re-read only pages written
since the previous scan; the engine reuses the checksums of the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from vmshare.dumps import (
    DEFAULT_CHUNK_PAGES,
    LiveProcessSource,
    PageSource,
    RawImageSource,
    open_dump,
    private_anonymous_vmas,
)
from vmshare.dumps.live import (
    LivePageRun,
    SoftDirtyMirror,
    TrackedPageRun,
    anon_buffer,
    soft_dirty_supported,
)
from vmshare.engine import EngineConfig, KsmCounters, KsmEngine
from vmshare.errors import DomainNotRunning, MemoryRefused, ProcessGone, UsageError
from vmshare.ksm.procfs import KPF_THP, KPF_ZERO_PAGE, PM_PFN_MASK, ProcFs, headroom
from vmshare.model import PAGE_SIZE, PageRun, Region, VmRef

log = logging.getLogger(__name__)

DEFAULT_MAX_SCANS = 5
#: progress(fraction of the whole job, label)
ProgressFn = Callable[[float, str], None]
_WORDS_PER_PAGE = PAGE_SIZE // 8


# ------------------------------------------------------------------ targets
@dataclass
class Target:
    """One named thing to scan: ``open()`` gives a fresh page source per scan
    (None when it has nothing eligible right now), named ``name``."""

    name: str
    kind: str                                   # "domain" | "dump" | "pid"
    open: Callable[[], PageSource | None]
    group: str | None = None
    notes: list[str] = field(default_factory=list)


def zero_rows(data: memoryview) -> np.ndarray[Any, np.dtype[np.intp]]:
    """Indices of the all-zero pages in ``data``: a cheap first/last-word filter,
    then whole pages checked over contiguous stretches of candidates (views, no
    copies)."""
    words = np.frombuffer(data, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
    maybe = np.flatnonzero((words[:, 0] == 0) & (words[:, -1] == 0))
    if maybe.size == 0:
        return maybe
    parts = []
    for block in np.split(maybe, np.flatnonzero(np.diff(maybe) != 1) + 1):
        rows = words[int(block[0]):int(block[-1]) + 1]
        parts.append(block if not rows.any() else block[~rows.any(axis=1)])
    return np.concatenate(parts)


class KernelVisiblePages:
    """A live source without the all-zero pages kernel KSM never counts.

    * An untouched anonymous page that was only read maps the kernel's shared
      (huge) zero page: pagemap calls it present, but KSM never scans it (it
      is not an anonymous page; no rmap item).
    * An all-zero page inside a transparent huge page (KPF_THP): to merge any
      subpage KSM must split the THP, and since Linux 6.12 splitting an
      anonymous THP maps its zero-filled subpages to the shared zero page
      instead of keeping them. A THP with zero subpages always gets split
      (its zero subpages match each other), so they end up as zero-page
      mappings: memory saved, but counted in neither pages_sharing nor
      ksm_zero_pages. ``thp_zero_pages`` counts them (last scan).

    Only all-zero pages can be either, so only those are looked up: their PFN
    from the pagemap entries the live source read in the same pass
    (``LivePageRun.pagemap``, through its held descriptor), then KPF_ZERO_PAGE
    and KPF_THP in kpageflags.
    """

    def __init__(self, inner: LiveProcessSource, procfs: ProcFs, *,
                 thp_split: bool = True) -> None:
        self.inner = inner
        self.name = inner.name
        self.procfs = procfs
        self.thp_split = thp_split       # False: keep THP zero subpages (dump-like view)
        self.thp_zero_pages = 0

    def regions(self) -> list[Region]:
        return self.inner.regions()

    def runs(self, chunk_pages: int = DEFAULT_CHUNK_PAGES) -> Iterator[LivePageRun]:
        self.thp_zero_pages = 0
        for run in self.inner.runs(chunk_pages):
            zero = zero_rows(run.data)
            if zero.size == 0:
                yield run
                continue
            flags = self.procfs.kpageflags(run.pagemap[zero] & PM_PFN_MASK)
            on_zero_page = (flags & np.uint64(1 << KPF_ZERO_PAGE)) != 0
            thp_zero = ((flags & np.uint64(1 << KPF_THP)) != 0) & ~on_zero_page
            if not self.thp_split:
                thp_zero[:] = False
            self.thp_zero_pages += int(thp_zero.sum())
            drop = zero[on_zero_page | thp_zero]
            if drop.size == 0:
                yield run
                continue
            keep = np.ones(run.npages, dtype=np.int8)
            keep[drop] = 0
            edges = np.diff(keep, prepend=np.int8(0), append=np.int8(0))
            for a, b in zip(np.flatnonzero(edges == 1).tolist(),
                            np.flatnonzero(edges == -1).tolist(), strict=True):
                first, data = run.first_page + a, run.data[a * PAGE_SIZE:b * PAGE_SIZE]
                if isinstance(run, TrackedPageRun):
                    yield TrackedPageRun(run.source, run.region, first, data,
                                         run.pagemap[a:b], run.unchanged[a:b])
                else:
                    yield LivePageRun(run.source, run.region, first, data, run.pagemap[a:b])

    def resident_bytes(self) -> int:
        return self.inner.resident_bytes()

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> KernelVisiblePages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dump_target(path: str, *, raw: bool = False) -> Target:
    """A dump file; opened (and validated) once now so a bad file fails early.

    ELF cores and kdump files are recognised by content; with ``raw`` the file
    is a plain RAM image (pmemsave). A file that is neither, without ``raw``,
    is an error rather than silently read as raw memory.
    Raises DumpError (missing, unreadable or malformed dump).
    """
    def opener() -> PageSource:
        if raw:
            return RawImageSource(path, path)
        return open_dump(path, path, raw_ok=False)

    opener().close()
    return Target(path, "dump", opener)


def pid_target(pid: int, procfs: ProcFs | None = None) -> Target:
    """Private anonymous memory of process ``pid`` (its mappings re-read every scan).

    Raises UsageError for a non-positive pid, ProcessGone, AccessDenied.
    """
    if pid <= 0:
        raise UsageError(f"not a process id: {pid}")
    pf = procfs or ProcFs()
    name = f"pid:{pid}"

    def opener() -> PageSource:
        vmas = private_anonymous_vmas(pid, pf)
        return KernelVisiblePages(LiveProcessSource(pid, vmas, name=name, procfs=pf), pf)

    try:
        opener().close()      # fail now on a dead pid or EPERM
    except ProcessGone as exc:
        raise ProcessGone(f"no running process with pid {pid}") from exc
    return Target(name, "pid", opener)


def domain_target(hv: Any, observer: Any, ident: str, procfs: ProcFs | None = None, *,
                  thp_split: bool = True) -> Target:
    """A running domain's eligible RAM backends, read live from its QEMU process.

    ``thp_split=False`` feeds the all-zero pages inside THPs too (see
    KernelVisiblePages): the guest's content exactly as a dump holds it.

    Ineligible backends (shared, file, memfd, hugetlb, nosharepages) and
    confidential guests are skipped with a note. Raises DomainNotFound,
    DomainNotRunning, HypervisorError, ProcessGone, AccessDenied.
    """
    pf = procfs or ProcFs()
    ref: VmRef = hv.lookup(ident)
    target = Target(ref.name, "domain", lambda: None)

    def opener() -> PageSource | None:
        facts = hv.facts(ref)
        if facts.pid is None:
            raise DomainNotRunning(f"domain {ref.name} is not running")
        target.notes.clear()
        if facts.launch_security:
            target.notes.append(f"{ref.name}: skipped: confidential guest (launchSecurity); "
                                "its memory is encrypted and never read")
            return None
        vmas, ids = [], {}
        for view in observer.backends(facts.ref, facts):
            bid = view.backend.id
            if view.ineligible_reason is not None:
                target.notes.append(f"{ref.name}: backend {bid} skipped: "
                                    f"{view.ineligible_reason}")
            elif view.vma is None:
                target.notes.append(f"{ref.name}: backend {bid} skipped: its mapping was "
                                    f"not found in QEMU process {facts.pid}")
            else:
                vmas.append(view.vma)
                ids[view.vma.start] = bid
        if not vmas:
            target.notes.append(f"{ref.name}: no eligible RAM backend; nothing scanned")
            return None
        return KernelVisiblePages(
            LiveProcessSource(facts.pid, vmas, name=ref.name, backend_ids=ids, procfs=pf), pf,
            thp_split=thp_split)

    target.open = opener
    first = opener()           # fail now on a stopped domain or EPERM
    if first is not None:
        first.close()
    return target


def check_unique(targets: Sequence[Target]) -> None:
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            raise UsageError(f"{t.name} is listed twice")
        seen.add(t.name)


# ------------------------------------------------------------------ scanning
@dataclass(frozen=True)
class ScanStats:
    pages_fed: int
    seconds: float
    zero_content: dict[str, int]     # pages whose bytes were all zero, per source


class ScanArena:
    """Buffers for one scan's page copies, reused by the next scan.

    The engine keeps references to fed bytes until ``end_scan`` and sources
    reuse their read buffer, so each run is copied; copying into buffers that
    were already faulted in by the previous scan costs a memcpy, not a page
    fault per page. Runs are packed, so many small runs do not waste chunks.
    """

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_PAGES * PAGE_SIZE, *,
                 soft_dirty: bool = False) -> None:
        self.chunk_bytes = chunk_bytes
        self._buffers: list[Any] = []
        #: with soft_dirty (on a kernel that tracks it), live process sources keep
        #: their pages here between scans and read only what was written since
        #: (vmshare.dumps.live); without tracking a mirror would save nothing
        self.mirror: SoftDirtyMirror | None = \
            SoftDirtyMirror() if soft_dirty and soft_dirty_supported() else None
        self._index = 0
        self._used = 0

    def reset(self) -> None:
        """Start a new scan: the previous scan's end_scan has released its views."""
        self._index = 0
        self._used = 0

    def reserve(self, nbytes: int) -> None:
        """Room for ``nbytes`` of copies, populated now in one mapping (one kernel
        loop, before reading starts) rather than chunk by chunk while reading."""
        have = self.buffer_bytes
        if nbytes > have:
            self._buffers.append(anon_buffer(-(-(nbytes - have) // self.chunk_bytes)
                                             * self.chunk_bytes))

    def take(self, n: int) -> memoryview:
        """A writable view of ``n`` bytes, valid until the next ``reset``."""
        if n > self.chunk_bytes:
            return memoryview(bytearray(n))
        while self._index < len(self._buffers) and \
                self._used + n > len(self._buffers[self._index]):
            self._index += 1
            self._used = 0
        if self._index == len(self._buffers):
            self._buffers.append(anon_buffer(self.chunk_bytes))   # populated: no faults
        view = memoryview(self._buffers[self._index])[self._used:self._used + n]
        self._used += n
        return view

    @property
    def buffer_bytes(self) -> int:
        return sum(len(b) for b in self._buffers)

    def copy(self, data: memoryview) -> memoryview:
        view = self.take(len(data))
        view[:] = data
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of page copies held: the arena's buffers and the mirror's pages."""
        return self.buffer_bytes + (self.mirror.held_bytes if self.mirror is not None else 0)


_DONE = object()
_QUEUE_RUNS = 4
#: engine state and scan temporaries per page of every region scanned (measured
#: peak 22-23 bytes: benchmarks/engine_memory.py), with room to spare
ENGINE_BYTES_PER_PAGE = 32


def check_scan_memory(sources: Sequence[PageSource], arena: ScanArena,
                      procfs: ProcFs | None = None) -> int:
    """Refuse a scan whose page copies would not fit in available memory; returns
    the bytes of copies the arena will hold (for ``ScanArena.reserve``).

    A scan holds a copy of every page it reads until its end (the engine's byte
    comparisons need them): the resident pages of live sources (read from
    pagemap now), every page a dump's regions span, and the engine's per-page
    state. What the arena already holds from an earlier scan is reused. The
    need is compared with MemAvailable, keeping the larger of 256 MiB and 5% of
    RAM free (vmshare.ksm.procfs.headroom). Raises MemoryRefused naming both
    figures, ProcfsError.
    """
    data = in_arena = pages = 0
    for s in sources:
        span = sum(r.size for r in s.regions())
        pages += span // PAGE_SIZE
        if isinstance(s, (LiveProcessSource, KernelVisiblePages)):
            resident = s.resident_bytes()
            data += resident
            if arena.mirror is None:       # else the mirror keeps them
                in_arena += resident
        else:
            data += span
            in_arena += span
    need = max(0, data - arena.nbytes) + pages * ENGINE_BYTES_PER_PAGE
    room = headroom(procfs or ProcFs(), need)
    if not room.ok:
        mib = 2**20
        raise MemoryRefused(
            f"scanning {', '.join(s.name for s in sources)} would hold about "
            f"{need // mib:,} MiB (a copy of the {data // mib:,} MiB of pages read, and the "
            f"engine's state) but {room.available_bytes // mib:,} MiB is available "
            f"(MemAvailable) and {room.margin_bytes // mib:,} MiB must stay free; "
            "scan fewer at once (trust groups are scanned one after another) or free memory")
    return in_arena


def scan_sources(engine: KsmEngine, sources: Sequence[PageSource], *,
                 progress: Callable[[float], None] | None = None,
                 arena: ScanArena | None = None) -> ScanStats:
    """One full engine scan over ``sources`` (scan order: as given).

    Reading (a system call that releases the GIL) runs in a helper thread
    ahead of the engine's hashing, one bounded queue apart. Live process
    memory is read straight into the arena; other sources' runs are copied
    there (their read buffers are reused). Raises what the
    sources raise (DumpError, ProcessGone, AccessDenied, ProcfsError); the
    engine is then left mid-scan and must be discarded.
    """
    t0 = time.perf_counter()
    arena = arena if arena is not None else ScanArena()
    arena.reset()
    regions = {s.name: s.regions() for s in sources}
    base: dict[tuple[str, str], int] = {}
    total = 0
    for name, regs in regions.items():
        for r in regs:
            base[(name, r.key)] = total
            total += r.size // PAGE_SIZE
    zero: dict[str, int] = {s.name: 0 for s in sources}
    q: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_RUNS)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for s in sources:
                live = s.inner if isinstance(s, KernelVisiblePages) else s
                direct = isinstance(live, LiveProcessSource)
                if isinstance(live, LiveProcessSource):
                    live.mirror = arena.mirror
                    live.read_into = arena.take     # read straight into the arena
                for run in s.runs():
                    if direct or isinstance(run, TrackedPageRun):
                        item: PageRun = run      # arena or mirror bytes: outlive the scan
                    else:
                        item = PageRun(s.name, run.region, run.first_page,
                                       arena.copy(run.data))
                    if not put(item):
                        return
            put(_DONE)
        except BaseException as exc:   # handed to the scanning thread
            put(exc)

    fed = 0
    engine.begin_scan(regions)
    thread = threading.Thread(target=reader, name="vmshare-scan-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, PageRun)
            engine.feed(item, item.unchanged if isinstance(item, TrackedPageRun) else None)
            zero[item.source] += zero_rows(item.data).size   # here: the reader is the bottleneck
            fed += item.npages
            if progress is not None and total:
                progress((base[(item.source, item.region)] + item.first_page + item.npages)
                         / total)
    finally:
        stop.set()
        thread.join()
    engine.end_scan()
    return ScanStats(fed, time.perf_counter() - t0, zero)


def _open_all(targets: Sequence[Target]) -> list[PageSource]:
    opened: list[PageSource] = []
    try:
        for t in targets:
            src = t.open()
            if src is not None:
                opened.append(src)
    except BaseException:
        _close_all(opened)
        raise
    return opened


def _close_all(sources: Iterable[PageSource]) -> None:
    for s in sources:
        s.close()


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class SourcePrediction:
    """One source's figures after the last scan (kernel meanings, per source)."""

    name: str
    kind: str
    pages: int                     # pages read (resident/present) in the last scan
    ksm_pages: int                 # pages that would map a KSM page
    saved: Fraction                # fair share in pages: (k-1)/k per page on a k-way KSM page
    zero_pages: int                # pages use_zero_pages would map to the zero page
    zero_content_pages: int        # pages whose content was all zero (any setting)
    unshared_pages: int
    shares_with: dict[str, int]    # pages on a KSM page the other source maps too

    @property
    def saved_bytes(self) -> int:
        return round(self.saved * PAGE_SIZE)


@dataclass(frozen=True)
class GroupPrediction:
    group: str | None              # trust group, None without --trust-groups
    counters: KsmCounters
    scans: int
    converged: bool
    sources: tuple[SourcePrediction, ...]

    @property
    def saved_bytes(self) -> int:
        return self.counters.pages_sharing * PAGE_SIZE


@dataclass(frozen=True)
class Prediction:
    config: EngineConfig
    groups: tuple[GroupPrediction, ...]
    notes: tuple[str, ...] = ()

    def totals(self) -> dict[str, int]:
        """Kernel counter names summed over groups (separate trees, so sums are exact)."""
        keys = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "ksm_zero_pages", "stable_node_chains", "stable_node_dups")
        return {k: sum(getattr(g.counters, k) for g in self.groups) for k in keys}


def _group_result(engine: KsmEngine, targets: Sequence[Target], group: str | None,
                  scans: int, converged: bool, stats: ScanStats | None) -> GroupPrediction:
    per = engine.per_source()
    sw = engine.shares_with()
    out = []
    for t in targets:
        ps = per.get(t.name)
        out.append(SourcePrediction(
            name=t.name, kind=t.kind,
            pages=ps.pages_seen if ps else 0, ksm_pages=ps.ksm_pages if ps else 0,
            saved=ps.saved if ps else Fraction(0), zero_pages=ps.zero_pages if ps else 0,
            zero_content_pages=stats.zero_content.get(t.name, 0) if stats else 0,
            unshared_pages=ps.unshared_pages if ps else 0,
            shares_with=dict(sorted(sw.get(t.name, {}).items()))))
    return GroupPrediction(group, engine.counters(), scans, converged, tuple(out))


def run_until_converged(engine: KsmEngine, targets: Sequence[Target], *,
                        scans: int | None = None, max_scans: int = DEFAULT_MAX_SCANS,
                        progress: Callable[[float, str], None] | None = None,
                        soft_dirty: bool = True, settle: bool = True
                        ) -> tuple[int, bool, ScanStats | None]:
    """Scan until the merge state repeats or (with ``settle``, the default) the
    engine has settled: a further scan of unchanged memory would repeat its
    state (``KsmEngine.settled``), so that confirmation scan is not run and the
    answer is the same. Or exactly ``scans`` times.

    Returns (scans run, converged, stats of the last scan). Every scan sees
    the memory anew: a live guest may have changed in between. With
    ``soft_dirty`` (default) live processes are rescanned incrementally: only
    pages written since the previous scan are read and hashed again (see
    ``vmshare.dumps.live``: one extra write fault per page in the guest, and
    a write racing the clear of the dirty bits is seen only when repeated).
    """
    limit = scans if scans is not None else max_scans
    if limit < 1:
        raise UsageError(f"the number of scans must be >= 1, not {limit}")
    previous: tuple[int, ...] | None = None
    stats: ScanStats | None = None
    converged = False
    arena = ScanArena(soft_dirty=soft_dirty)
    for i in range(1, limit + 1):
        def step(frac: float, i: int = i) -> None:
            if progress is not None:
                progress((i - 1 + frac) / limit, f"scan {i}/{limit}")
        sources = _open_all(targets)
        try:
            arena.reserve(check_scan_memory(sources, arena))
            stats = scan_sources(engine, sources, progress=step, arena=arena)
        finally:
            _close_all(sources)
        state = engine.counters().merge_state()
        # settled: a further scan of unchanged memory would repeat this state, so
        # it is not run (the answer is the same; see KsmEngine.settled)
        converged = state == previous or (settle and engine.settled)
        if converged and scans is None:
            return i, True, stats
        previous = state
    return limit, converged, stats


def predict(targets: Sequence[Target], config: EngineConfig, *,
            groups: dict[str, str] | None = None, scans: int | None = None,
            max_scans: int = DEFAULT_MAX_SCANS,
            progress: ProgressFn | None = None, soft_dirty: bool = True,
            settle: bool = True) -> Prediction:
    """Run the engine over ``targets`` until it converges; one engine per trust group.

    ``soft_dirty``: incremental rescans of live processes (run_until_converged).
    ``settle``: stop at a settled scan, without the confirmation scan
    (run_until_converged); the answer is the same, one scan sooner.

    ``groups`` maps target names to trust groups (None: one engine for all).
    Raises UsageError (no targets, a name twice, bad scan count) and what the
    sources raise (DumpError, ProcessGone, AccessDenied, HypervisorError).
    """
    if not targets:
        raise UsageError("nothing to predict: give domains, --dump files or --pid processes")
    check_unique(targets)
    if groups is None:
        buckets: dict[str | None, list[Target]] = {None: list(targets)}
    else:
        buckets = {}
        for t in targets:
            buckets.setdefault(groups[t.name], []).append(t)
    results: list[GroupPrediction] = []
    n = len(buckets)
    for gi, (group, members) in enumerate(sorted(buckets.items(), key=lambda kv: kv[0] or "")):
        engine = KsmEngine(config)

        def step(frac: float, label: str, gi: int = gi, group: str | None = group) -> None:
            if progress is not None:
                prefix = f"group {group}: " if group is not None else ""
                progress((gi + frac) / n, prefix + label)
        done, converged, stats = run_until_converged(engine, members, scans=scans,
                                                     max_scans=max_scans, progress=step,
                                                     soft_dirty=soft_dirty, settle=settle)
        results.append(_group_result(engine, members, group, done, converged, stats))
    notes: list[str] = []
    for t in targets:
        notes.extend(t.notes)
    return Prediction(config, tuple(results), tuple(notes))


# ------------------------------------------------------------------ trust groups
def trust_groups(hv: Any, targets: Sequence[Target], config: Any) -> tuple[dict[str, str],
                                                                          list[str]]:
    """Each target's trust group: domains by vmshare.policy (domain metadata,
    then the config's ``[vm."NAME"]`` table, then the host default); dumps and
    processes have no policy and fall in the host's default group (noted).

    Raises PolicyError for malformed domain metadata, HypervisorError.
    """
    from vmshare.policy import effective
    from vmshare.policy_source import vm_policy

    host = config.host
    groups: dict[str, str] = {}
    notes: list[str] = []
    for t in targets:
        if t.kind == "domain":
            ref = hv.lookup(t.name)
            facts = hv.facts(ref)
            groups[t.name] = effective(facts, vm_policy(hv, ref), host).group
        else:
            table = host.vms.get(t.name)
            groups[t.name] = table.group if table and table.group else host.default_group
            notes.append(f"{t.name}: a {t.kind} has no domain policy; trust group "
                         f"{groups[t.name]!r}")
    return groups, notes


# ------------------------------------------------------------------ live scanning
@dataclass(frozen=True)
class ScanPass:
    index: int
    counters: KsmCounters
    stats: ScanStats
    sources: tuple[SourcePrediction, ...]
    notes: tuple[str, ...]


class LiveScanner:
    """One engine kept across passes over live targets (``vmshare scan``).

    Each pass re-resolves every domain (pid, backends, mappings), so a moved
    mapping or a restored guest is a new region generation and the engine
    forgets the old one; unchanged pages keep their checksums and merges, so
    rescans behave as the kernel's incremental scans do. ``soft_dirty`` (off
    by default for this long-running use: it costs the guests a write fault
    per page after every pass) reads only pages written since the last pass.
    """

    def __init__(self, targets: Sequence[Target], config: EngineConfig, *,
                 soft_dirty: bool = False) -> None:
        if not targets:
            raise UsageError("nothing to scan: give at least one domain")
        check_unique(targets)
        self.targets = list(targets)
        self.config = config
        self.soft_dirty = soft_dirty
        self.engine = KsmEngine(config)
        self.arena = ScanArena(soft_dirty=soft_dirty)
        self.passes = 0

    def scan(self, progress: Callable[[float], None] | None = None) -> ScanPass:
        """One full pass. Raises what the sources raise; the engine is then
        replaced by a fresh one (what it knew is no longer trustworthy)."""
        sources = _open_all(self.targets)
        try:
            self.arena.reserve(check_scan_memory(sources, self.arena))
        except BaseException:
            _close_all(sources)
            raise                         # nothing was read: the engine stays valid
        try:
            stats = scan_sources(self.engine, sources, progress=progress,
                                 arena=self.arena)
        except BaseException:
            self.engine = KsmEngine(self.config)
            self.arena = ScanArena(soft_dirty=self.soft_dirty)   # its copies may be stale
            raise
        finally:
            _close_all(sources)
        self.passes += 1
        group = _group_result(self.engine, self.targets, None, self.passes, False, stats)
        notes = tuple(n for t in self.targets for n in t.notes)
        return ScanPass(self.passes, self.engine.counters(), stats, group.sources, notes)
