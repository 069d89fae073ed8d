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

One scan, its buffers and the memory check before it: ``vmshare.prediction.scanning``.
A scan holds the resident memory it scanned (the engine's contract). Soft-dirty
tracking (where the kernel has it) is the default of ``predict`` and
``run_until_converged`` and opt-in for ``LiveScanner``: live sources then
re-read only pages written since the previous scan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from vmshare.engine import EngineConfig, KsmCounters, KsmEngine
from vmshare.errors import DomainNotRunning, ProcessGone, UsageError
from vmshare.ksm.procfs import ProcFs
from vmshare.model import PAGE_SIZE, VmRef
from vmshare.prediction.scanning import ScanArena, ScanStats, plan_scan, scan_sources
from vmshare.sources import (
    LiveProcessSource,
    PageSource,
    RawImageSource,
    open_dump,
    private_anonymous_vmas,
)
from vmshare.sources.visible import KernelVisiblePages

log = logging.getLogger(__name__)

DEFAULT_MAX_SCANS = 5
#: progress(fraction of the whole job, label)
ProgressFn = Callable[[float, str], None]


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
                        soft_dirty: bool = True, settle: bool = True,
                        low_memory: bool = False) -> tuple[int, bool, ScanStats | None]:
    """Scan until the merge state repeats or (with ``settle``, the default) the
    engine has settled: a further scan of unchanged memory would repeat its
    state (``KsmEngine.settled``), so that confirmation scan is not run and the
    answer is the same. Or exactly ``scans`` times.

    Returns (scans run, converged, stats of the last scan). Every scan sees
    the memory anew: a live guest may have changed in between. With
    ``soft_dirty`` (default) live processes are rescanned incrementally: only
    pages written since the previous scan are read and hashed again (see
    ``vmshare.sources.live``: one extra write fault per page in the guest, and
    a write racing the clear of the dirty bits is seen only when repeated).
    ``low_memory``: keep no copy of live memory even where it would fit
    (``vmshare.prediction.scanning.plan_scan``).
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
            plan = plan_scan(sources, arena, low_memory=low_memory)
            arena.reserve(plan.arena_bytes)
            stats = scan_sources(engine, sources, progress=step, arena=arena,
                                 reread=plan.reread)
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
            settle: bool = True, low_memory: bool = False) -> Prediction:
    """Run the engine over ``targets`` until it converges; one engine per trust group.

    ``soft_dirty``: incremental rescans of live processes (run_until_converged).
    ``settle``: stop at a settled scan, without the confirmation scan
    (run_until_converged); the answer is the same, one scan sooner.
    ``low_memory``: keep no copy of live memory (run_until_converged).

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
                                                     soft_dirty=soft_dirty, settle=settle,
                                                     low_memory=low_memory)
        results.append(_group_result(engine, members, group, done, converged, stats))
    notes: list[str] = []
    for t in targets:
        notes.extend(t.notes)
    return Prediction(config, tuple(results), tuple(notes))


# ------------------------------------------------------------------ trust groups
def trust_groups(hv: Any, targets: Sequence[Target], config: Any) -> tuple[dict[str, str],
                                                                          list[str]]:
    """Each target's trust group: domains by vmshare.policy.rules (domain metadata,
    then the config's ``[vm."NAME"]`` table, then the host default); dumps and
    processes have no policy and fall in the host's default group (noted).

    Raises PolicyError for malformed domain metadata, HypervisorError.
    """
    from vmshare.policy.rules import effective
    from vmshare.policy.sources import vm_policy

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
                 soft_dirty: bool = False, low_memory: bool = False) -> None:
        if not targets:
            raise UsageError("nothing to scan: give at least one domain")
        check_unique(targets)
        self.targets = list(targets)
        self.config = config
        self.soft_dirty = soft_dirty
        self.low_memory = low_memory
        self.engine = KsmEngine(config)
        self.arena = ScanArena(soft_dirty=soft_dirty)
        self.passes = 0

    def scan(self, progress: Callable[[float], None] | None = None) -> ScanPass:
        """One full pass. Raises what the sources raise; the engine is then
        replaced by a fresh one (what it knew is no longer trustworthy)."""
        sources = _open_all(self.targets)
        try:
            plan = plan_scan(sources, self.arena, low_memory=self.low_memory)
            self.arena.reserve(plan.arena_bytes)
        except BaseException:
            _close_all(sources)
            raise                         # nothing was read: the engine stays valid
        try:
            stats = scan_sources(self.engine, sources, progress=progress,
                                 arena=self.arena, reread=plan.reread)
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
