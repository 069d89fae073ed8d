"""Prediction: what kernel KSM would save if the given memory were mergeable.

Drives the userspace engine over targets (vmshare.prediction.targets: page
sources for libvirt/QEMU domains' eligible RAM backends, read live from
/proc/<pid>/mem, guest memory dumps and any process's private anonymous
memory; re-exported here, the names callers use) and returns the figures
with the kernel's counter names. Nothing here prints.

Each scan re-opens every live source, so a mapping that moved, a guest that
was restored into a new QEMU process (new pid) or a resized backend arrives
with a new ``Region.generation`` and the engine drops what it knew of the old
one. ``LiveScanner`` keeps one engine across passes (``vmshare scan``);
``predict`` runs a fresh engine until its counters stop changing.

One scan and its bounded read buffer: ``vmshare.prediction.scanning``
(memory: the buffer plus the engine's 13 bytes a page, whatever the size of
the guest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from vmshare.engine import EngineConfig, KsmCounters, KsmEngine
from vmshare.errors import UsageError
from vmshare.model import PAGE_SIZE
from vmshare.prediction.readring import check_buffer_bytes, new_ring
from vmshare.prediction.scanning import (
    DEFAULT_BUFFER_BYTES,
    ScanStats,
    default_workers,
    scan_sources,
)
from vmshare.prediction.targets import (
    Target,
    check_unique,
    close_all,
    domain_target,
    dump_target,
    open_all,
    pid_target,
    trust_groups,
)

__all__ = ["DEFAULT_MAX_SCANS", "GroupPrediction", "LiveScanner", "Prediction", "ProgressFn",
           "ScanPass", "SourcePrediction", "Target", "check_unique", "domain_target",
           "dump_target", "pid_target", "predict", "run_until_converged", "trust_groups"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SCANS = 5
#: progress(fraction of the whole job, label)
ProgressFn = Callable[[float, str], None]


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
                        settle: bool = True, buffer_bytes: int = DEFAULT_BUFFER_BYTES
                        ) -> tuple[int, bool, ScanStats | None]:
    """Scan until the merge state repeats or (with ``settle``, the default) the
    engine has settled: a further scan of unchanged memory would repeat its
    state (``KsmEngine.settled``), so that confirmation scan is not run and the
    answer is the same. Or exactly ``scans`` times.

    Returns (scans run, converged, stats of the last scan). Every scan sees
    the memory anew: a live guest may have changed in between.
    ``buffer_bytes``: the read ring (vmshare.prediction.scanning).
    """
    limit = scans if scans is not None else max_scans
    if limit < 1:
        raise UsageError(f"the number of scans must be >= 1, not {limit}")
    ring = new_ring(buffer_bytes, default_workers())     # one read ring for every scan
    previous: tuple[int, ...] | None = None
    stats: ScanStats | None = None
    converged = False
    for i in range(1, limit + 1):
        def step(frac: float, i: int = i) -> None:
            if progress is not None:
                progress((i - 1 + frac) / limit, f"scan {i}/{limit}")
        sources = open_all(targets)
        try:
            stats = scan_sources(engine, sources, progress=step, buffer_bytes=buffer_bytes,
                                 ring=ring)
        finally:
            close_all(sources)
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
            progress: ProgressFn | None = None, settle: bool = True,
            buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> Prediction:
    """Run the engine over ``targets`` until it converges; one engine per trust group.

    ``settle``: stop at a settled scan, without the confirmation scan
    (run_until_converged); the answer is the same, one scan sooner.
    ``buffer_bytes``: the read ring of each scan (vmshare.prediction.scanning).

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
                                                     settle=settle,
                                                     buffer_bytes=buffer_bytes)
        results.append(_group_result(engine, members, group, done, converged, stats))
    notes: list[str] = []
    for t in targets:
        notes.extend(t.notes)
    return Prediction(config, tuple(results), tuple(notes))


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
    rescans behave as the kernel's incremental scans do.
    """

    def __init__(self, targets: Sequence[Target], config: EngineConfig, *,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        if not targets:
            raise UsageError("nothing to scan: give at least one domain")
        check_unique(targets)
        self.targets = list(targets)
        self.config = config
        self.buffer_bytes = check_buffer_bytes(buffer_bytes)
        self.engine = KsmEngine(config)
        self.passes = 0

    def scan(self, progress: Callable[[float], None] | None = None) -> ScanPass:
        """One full pass. Raises what the sources raise; the engine is then
        replaced by a fresh one (what it knew is no longer trustworthy)."""
        sources = open_all(self.targets)
        try:
            stats = scan_sources(self.engine, sources, progress=progress,
                                 buffer_bytes=self.buffer_bytes)
        except BaseException:
            self.engine = KsmEngine(self.config)
            raise
        finally:
            close_all(sources)
        self.passes += 1
        group = _group_result(self.engine, self.targets, None, self.passes, False, stats)
        notes = tuple(n for t in self.targets for n in t.notes)
        return ScanPass(self.passes, self.engine.counters(), stats, group.sources, notes)
