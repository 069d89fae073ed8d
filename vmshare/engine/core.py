"""KsmEngine: scan bookkeeping, per-page state arrays and the counters.

The merge decisions themselves are in ``vmshare.engine.merge`` (vectorised) and
``vmshare.engine.slowpath`` (groups simulated page by page); per-source figures
read after a scan in ``vmshare.engine.results``; the algorithm overview is in
``vmshare.engine``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from vmshare.engine import merge, results
from vmshare.engine.counters import EngineConfig, KsmCounters, ScanResult, count_scan
from vmshare.engine.feedcheck import FeedCheck, candidates
from vmshare.engine.hashing import (
    Hasher,
    default_hasher,
    hash_pages,
    run_checksums,
    zeros_hold,
)
from vmshare.engine.results import SourceSavings
from vmshare.engine.state import (
    HAS_CK,
    LONE,
    SEEN,
    STABLE_CK,
    ZERO,
    Fetch,
    NodeTable,
    RegionState,
    RunRef,
    release_freed_memory,
)
from vmshare.errors import UsageError
from vmshare.model import PAGE_SIZE, PageRun, Region


class KsmEngine:
    """The kernel's KSM merge algorithm over pages fed to it; no I/O of its own.

    One full scan is ``begin_scan(regions)``, any number of ``feed(run)`` in any
    order, then ``end_scan()``. Pages are processed in scan order (sources in the
    order of ``regions``, regions in listed order, page index) whatever the feed
    order, so results are deterministic.

    The rules beyond the kernel's own (the engine sees snapshots, not page
    tables) are in the package overview ("Snapshots, not page tables").

    Buffers passed to ``feed`` are referenced (never copied) until ``end_scan``
    returns and must not change before then.

    ``verify_merged`` (default: on only with a custom ``hasher``) re-verifies
    every merged page each scan instead of trusting its unchanged checksum.
    """

    def __init__(self, config: EngineConfig | None = None,
                 hasher: Hasher | None = None, *, verify_merged: bool | None = None) -> None:
        self.config = config or EngineConfig()
        self.hasher: Hasher = hasher or default_hasher
        # see "Trust and verification" in the package overview
        self.verify_merged = (hasher is not None) if verify_merged is None else verify_merged
        self.zero_hash = self.hasher(memoryview(bytes(PAGE_SIZE)))
        self.nodes = NodeTable()
        self._regions: dict[tuple[str, str], RegionState] = {}
        self._order: list[RegionState] = []
        self._runs: list[RunRef] = []
        self._base: dict[int, int] = {}     # id(RegionState) -> its first page's position
        self._check: FeedCheck | None = None
        self._unretained = 0            # pages fed this scan with retain=False
        self._needs_bytes = True        # see needs_bytes
        self._in_scan = False
        self._full_scans = 0
        self._pages_scanned = 0
        self._counters = KsmCounters()
        self._settled = False

    # -- scan protocol -------------------------------------------------------------

    def begin_scan(self, regions: Mapping[str, Sequence[Region]], *,
                   store_pages: int = 0) -> None:
        """Start a full scan over ``regions`` (source -> its regions, in scan order).

        Drops what is known of sources and regions not listed, and of regions whose
        generation or size changed. Raises UsageError if a scan is already open,
        a region key repeats within a source, or a size is not whole pages.

        ``store_pages`` > 0: pages are compared while they are fed, against the
        zero page and against a copy of the first page of each checksum group
        (at most ``store_pages`` copies; ``vmshare.engine.feedcheck``), so that
        ``end_scan`` reads again only what those could not decide. A page is
        then compared by its bytes as fed, as ksmd compares a page when its
        cursor reaches it, not as they are at ``end_scan``.
        """
        if self._in_scan:
            raise UsageError("begin_scan called while a scan is in progress")
        wanted: dict[tuple[str, str], Region] = {}
        for source, regs in regions.items():
            for reg in regs:
                if (source, reg.key) in wanted:
                    raise UsageError(f"region {reg.key!r} listed twice for {source!r}")
                if reg.size < 0 or reg.size % PAGE_SIZE:
                    raise UsageError(f"region {reg.key!r} of {source!r}: size {reg.size} "
                                     f"is not a whole number of pages")
                wanted[(source, reg.key)] = reg
        for key, rs in list(self._regions.items()):
            reg2 = wanted.get(key)
            if reg2 is None or reg2.generation != rs.generation or \
                    reg2.size // PAGE_SIZE != rs.npages:
                self._drop_region(rs)
                del self._regions[key]
        self._order = []
        for (source, rkey), reg in wanted.items():
            known = self._regions.get((source, rkey))
            if known is None:
                known = RegionState(source, rkey, reg.generation, reg.size // PAGE_SIZE)
                self._regions[(source, rkey)] = known
            rs = known
            rs.flags &= np.uint8(HAS_CK | ZERO | LONE)   # SEEN, STABLE_CK, UNSTABLE, ZERO_NEW reset
            self._order.append(rs)
        self._base = dict(zip(map(id, self._order), np.cumsum(
            [0] + [rs.npages for rs in self._order]).tolist(), strict=False))
        self._check = None if store_pages <= 0 else \
            FeedCheck(self.zero_hash, candidates(self._order, self.zero_hash, store_pages))
        self._needs_bytes = self.verify_merged or \
            any(bool(np.any(rs.flags & np.uint8(HAS_CK))) for rs in self._order)
        release_freed_memory()        # the candidates' temporaries, before the reads
        self.nodes.free_empty()
        self._runs = []
        self._unretained = 0
        self._in_scan = True

    def checksums(self, data: memoryview) -> npt.NDArray[np.uint64]:
        """The checksum of each page of ``data`` (whole pages), as ``feed``
        computes them, for ``feed(checksums=...)``: a reader thread hashes what
        it read while the engine takes the runs read before. Safe from any
        thread: it reads no engine state (the C hash releases the GIL)."""
        data = data.cast("B") if data.format != "B" else data
        if len(data) % PAGE_SIZE:
            raise UsageError(f"{len(data)} bytes are not whole pages")
        return hash_pages(self.hasher, data, len(data) // PAGE_SIZE)

    def zeros_hold(self, data: memoryview, checksums: npt.NDArray[np.uint64]) -> bool:
        """Is every page of ``data`` whose checksum (``checksums``) is the zero
        page's all zero, byte for byte? For ``feed(zeros_checked=True)``: the
        thread that hashed a run checks this too, while the pages are in its
        core's cache. Safe from any thread (in C, the GIL released)."""
        return zeros_hold(data, checksums, self.zero_hash)

    def feed(self, run: PageRun, unchanged: npt.NDArray[np.bool_] | None = None, *,
             retain: bool = True, checksums: npt.NDArray[np.uint64] | None = None,
             zeros_checked: bool = False, present: npt.NDArray[np.bool_] | None = None
             ) -> None:
        """Give the engine pages of the current scan (one run, any order of runs).

        ``unchanged`` (one bool per page of the run, optional) marks pages the
        source knows were not written since the previous scan (soft-dirty bit
        clear): their bytes are the ones fed at that position last scan, so
        the checksum recorded then is reused instead of hashing them again. A
        page the engine has no checksum for is hashed anyway. Their bytes must
        still be in ``run.data`` (a new merge is byte-compared).

        ``retain=False``: the engine hashes the run and keeps no reference to
        its bytes (the caller may reuse the buffer at once); the pages it then
        needs to compare are asked of ``end_scan``'s ``fetch``.

        ``checksums``: the run's checksums as ``checksums(run.data)`` gave them
        (hashed already, by the thread that read the run); not hashed again.
        ``zeros_checked``: ``zeros_hold(run.data, checksums)`` was True, so the
        pages with the zero page's checksum need no comparison with it here.
        ``present`` (one bool per page, with ``retain=False``): only the pages
        marked are fed; the others are holes, as if the run were cut there
        (one call where a run with many holes would take hundreds).

        Raises UsageError outside a scan, for an unknown source/region, a run
        beyond its region, data not a whole number of pages, a page fed twice,
        an ``unchanged`` mask, ``checksums`` or ``present`` of the wrong length,
        an ``unchanged`` mask with checksums, ``present`` with ``retain``.
        """
        if not self._in_scan:
            raise UsageError("feed called outside a scan (call begin_scan first)")
        if not retain and self.verify_merged:
            raise UsageError("verify mode re-reads every merged page each scan: "
                             "feed with retain=True")
        data = run.data.cast("B") if run.data.format != "B" else run.data
        if len(data) % PAGE_SIZE:
            raise UsageError(f"run of {run.source}/{run.region} is not whole pages")
        n = len(data) // PAGE_SIZE
        first = run.first_page
        rs = self._fed_region(run.source, run.region, first, n, present, retain)
        if n == 0:
            return
        flags = rs.flags[first:first + n]
        ck = rs.ck[first:first + n]
        h = run_checksums(self.hasher, data, flags, ck, unchanged, checksums)
        self._record(rs, first, h, data, retain, zeros_checked and checksums is not None,
                     present)

    @property
    def needs_bytes(self) -> bool:
        """Does this scan look at the bytes of what is fed? Not when no page
        has a checksum from an earlier scan (the first scan of every region):
        then no page can arrive in a tree, nothing is compared, and
        ``feed_checksums`` takes the checksums alone."""
        return self._needs_bytes

    def feed_checksums(self, source: str, region: str, first_page: int,
                       checksums: npt.NDArray[np.uint64],
                       present: npt.NDArray[np.bool_] | None = None) -> None:
        """As ``feed(run, retain=False, checksums=checksums, present=present)``
        for a run whose bytes are gone already (the reader reused its buffer):
        only while ``needs_bytes`` is False. Raises UsageError as ``feed``
        does, and when this scan needs the bytes."""
        if not self._in_scan:
            raise UsageError("feed called outside a scan (call begin_scan first)")
        if self._needs_bytes:
            raise UsageError("this scan compares pages as they are fed: give their bytes "
                             "(feed), not their checksums alone")
        if checksums.ndim != 1 or checksums.dtype != np.uint64:
            raise UsageError(f"checksums of {source}/{region} must be one uint64 per page")
        rs = self._fed_region(source, region, first_page, checksums.size, present, False)
        if checksums.size:
            self._record(rs, first_page, checksums, None, False, present=present)

    def _fed_region(self, source: str, region: str, first: int, n: int,
                    present: npt.NDArray[np.bool_] | None, retain: bool) -> RegionState:
        """The state of the region pages ``first``..``first + n`` are fed to
        (those marked in ``present`` when given). Raises UsageError for a
        region not announced, a run beyond it, a mask of another length or
        with ``retain``, a page fed twice."""
        rs = self._regions.get((source, region))
        if rs is None:
            raise UsageError(f"region {region!r} of {source!r} was not announced "
                             f"in begin_scan")
        if first < 0 or first + n > rs.npages:
            raise UsageError(f"run {first}+{n} is outside {source}/{region} "
                             f"({rs.npages} pages)")
        if present is not None:
            if present.shape != (n,) or present.dtype != np.bool_:
                raise UsageError(f"a present mask of {present.size} for a run of {n} pages")
            if retain:
                raise UsageError("a run with holes (present) is fed with retain=False")
        fl = rs.flags[first:first + n]
        if np.any((fl if present is None else fl[present]) & SEEN):
            raise UsageError(f"pages of {source}/{region} fed twice in one scan")
        return rs

    def _record(self, rs: RegionState, first: int, h: npt.NDArray[np.uint64],
                data: memoryview | None, retain: bool, zeros_checked: bool = False,
                present: npt.NDArray[np.bool_] | None = None) -> None:
        """Pages ``first``.. of ``rs`` fed with checksums ``h`` (bytes ``data``,
        None when only their checksums were given: then none can arrive),
        those marked in ``present`` only when given."""
        n = h.size
        flags = rs.flags[first:first + n]
        ck = rs.ck[first:first + n]
        stable = ((flags & HAS_CK) != 0) & (ck == h)
        if present is not None:
            stable &= present
        if self._check is not None and data is not None:   # arrivals: compare them now
            arrive = stable & ((flags & (ZERO | LONE)) == 0)
            if not self.verify_merged:
                arrive &= rs.node[first:first + n] < 0
            self._check.feed(data, self._base[id(rs)] + first, h, arrive, zeros_checked)
        if present is None:
            ck[:] = h
            flags |= np.uint8(SEEN | HAS_CK)
        else:
            ck[present] = h[present]
            flags[present] |= np.uint8(SEEN | HAS_CK)
        flags[stable] |= np.uint8(STABLE_CK)
        if retain:
            assert data is not None and present is None
            self._runs.append(RunRef(rs, first, n, data))
        else:
            self._unretained += n if present is None else int(np.count_nonzero(present))

    def end_scan(self, fetch: Fetch | None = None) -> ScanResult:
        """Complete the full scan: merge, break out, count.

        ``fetch(positions)`` gives the bytes of pages fed with ``retain=False``
        that the scan must compare: ``positions`` (ascending, global: pages
        numbered in scan order across every region) in, those pages in that
        order out. They are compared as they are then, as ksmd compares pages
        when it reaches them: a page written since it was fed is merged only
        with pages equal to its new bytes. Asked in batches of at most
        ``FETCH_PAGES`` pages (a group bigger than that in slices). Raises
        UsageError outside a scan, and when pages were not retained and no
        ``fetch`` is given (the engine must then be discarded).
        """
        if not self._in_scan:
            raise UsageError("end_scan called outside a scan")
        if self._unretained and fetch is None:
            self._runs = []
            self._in_scan = False
            raise UsageError(f"{self._unretained} pages were fed without retain and "
                             "end_scan has no fetch to read them again")
        try:
            quiet = merge.run_scan(self._order, self._runs, self.nodes, self.config,
                                   self.zero_hash, self.verify_merged,
                                   fetch if self._unretained else None, self._check)
        except BaseException:
            self.abort_scan()            # a fetch failed (the source went away)
            raise
        finally:
            self._runs = []
            self._unretained = 0
            self._in_scan = False
            self._check = None
            release_freed_memory()
        self._full_scans += 1
        result, self._settled = count_scan(self._order, self.nodes, quiet,
                                           self._pages_scanned, self._full_scans)
        self._counters = result.counters
        self._pages_scanned = result.counters.pages_scanned
        return result

    def abort_scan(self) -> None:
        """Give up the open scan (a source failed): what the engine knew of every
        region is dropped, as if unmapped (the scan left it half updated);
        ``counters()`` stays the last completed scan's; the next scan starts
        from nothing but the cumulative counters."""
        for rs in self._regions.values():
            self._drop_region(rs)
        self._regions = {}
        self._order = []
        self._runs = []
        self._unretained = 0
        self._in_scan = False
        self._check = None
        self._settled = False
        self.nodes = NodeTable()

    @property
    def settled(self) -> bool:
        """Was the last completed scan a fixed point of the algorithm?

        True when that scan left no volatile page (every page fed was on a stable
        node, in the unstable tree or zero-mapped before the scan) and no mapping
        left a stable node (no break-out, hole or stale node). Another scan of the
        same content would then change no counter but the cumulative ones:
        merged pages stay (checksums unchanged), the unstable pages all differ
        from each other (two equal ones would have merged) and find no stable
        node with room (they found none when the scan reached them, and no count
        fell afterwards). With live memory it also means nothing the engine can
        see was written between the last two scans.
        """
        return self._settled

    def converge(self, scan_fn: Callable[[KsmEngine], object], max_scans: int = 10) -> int:
        """Run ``scan_fn`` (one full scan each call) until the merge state stops changing.

        Stops after a scan that is ``settled`` (the next one would repeat its
        state, so it is not run) or whose state equals the previous scan's.
        Returns the number of scans run. Stops after ``max_scans``. Raises UsageError
        if ``scan_fn`` leaves a scan open or does not complete one.
        """
        previous: tuple[int, ...] | None = None
        for done in range(1, max_scans + 1):
            before = self._full_scans
            scan_fn(self)
            if self._in_scan or self._full_scans != before + 1:
                raise UsageError("scan_fn must run exactly one begin_scan/feed/end_scan")
            state = self._counters.merge_state()
            if state == previous or self._settled:
                return done
            previous = state
        return max_scans

    # -- results -------------------------------------------------------------------

    def counters(self) -> KsmCounters:
        return self._counters

    def per_source(self) -> dict[str, SourceSavings]:
        """Per-source figures of the last completed scan (fair share, see SourceSavings)."""
        return results.per_source(self._order, self.nodes)

    def shares_with(self) -> dict[str, dict[str, int]]:
        """Pages of each source mapped to a stable page that another source maps
        too (``vmshare.engine.results.shares_with``)."""
        return results.shares_with(self._order)

    # -- internals -----------------------------------------------------------------

    def _drop_region(self, rs: RegionState) -> None:
        self.nodes.unmap(rs.node[rs.node >= 0])
        rs.node[:] = -1
        rs.flags[:] = 0
