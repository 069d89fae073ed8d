"""How a scan holds its pages, chosen from the memory available before anything
is read (``plan_scan``): a copy of every page, or for live memory a few reused
read buffers and the pages to compare read again at the end; or a refusal
naming the figures. The scan itself: vmshare.prediction.scanning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmshare.engine.state import FETCH_PAGES
from vmshare.errors import MemoryRefused
from vmshare.ksm.procfs import ProcFs, headroom
from vmshare.model import PAGE_SIZE
from vmshare.prediction.scanning import RING_CHUNKS, ScanArena
from vmshare.sources import DEFAULT_CHUNK_PAGES, LiveProcessSource, PageSource
from vmshare.sources.visible import KernelVisiblePages

#: engine state and scan temporaries per page of every region scanned (measured
#: peak 22-23 bytes: benchmarks/engine_memory.py), with room to spare
ENGINE_BYTES_PER_PAGE = 32
#: live memory not kept: the read ring, and a batch of pages read again
LIVE_BUFFER_BYTES = RING_CHUNKS * DEFAULT_CHUNK_PAGES * PAGE_SIZE + FETCH_PAGES * PAGE_SIZE


@dataclass(frozen=True)
class ScanPlan:
    """How a scan holds pages: ``arena_bytes`` of copies (``ScanArena.reserve``),
    and ``reread``: live pages are not kept, the engine reads again at the end
    the pages it compares (slower, in bounded memory)."""

    arena_bytes: int
    reread: bool


def plan_scan(sources: Sequence[PageSource], arena: ScanArena,
              procfs: ProcFs | None = None, *, low_memory: bool = False) -> ScanPlan:
    """Choose how a scan holds its pages from the memory available, or refuse.

    Keeping a copy of every page read is fastest: the resident pages of live
    sources (read from pagemap now), every page a dump's regions span, plus
    the engine's per-page state; what the arena (or a soft-dirty mirror)
    already holds is reused. When that does not fit in MemAvailable, keeping
    the larger of 256 MiB and 5% of RAM free (vmshare.ksm.procfs.headroom),
    live memory is read into a few reused buffers instead and the pages to
    compare are read again in bounded batches (``LIVE_BUFFER_BYTES``); dumps
    are always copied. ``low_memory`` asks for that way even when copies
    would fit. Raises MemoryRefused naming the figures when even that does
    not fit, ProcfsError.
    """
    spans = [sum(r.size for r in s.regions()) for s in sources]
    engine_bytes = sum(spans) // PAGE_SIZE * ENGINE_BYTES_PER_PAGE
    dumps = live = 0
    has_live = False
    for s, span in zip(sources, spans, strict=True):
        if isinstance(s, (LiveProcessSource, KernelVisiblePages)):
            has_live = True
            if arena.nbytes < sum(spans):    # else already held, whatever is resident
                live += s.resident_bytes()
            else:
                live += span
        else:
            dumps += span
    pf = procfs or ProcFs()
    room = headroom(pf, max(0, dumps + live - arena.nbytes) + engine_bytes)
    can_reread = has_live and arena.mirror is None
    if room.ok and not (low_memory and can_reread):
        return ScanPlan(dumps + (live if arena.mirror is None else 0), reread=False)
    if can_reread:
        room = headroom(pf, max(0, dumps - arena.nbytes) + LIVE_BUFFER_BYTES + engine_bytes)
        if room.ok:
            return ScanPlan(dumps, reread=True)
    mib = 2**20
    raise MemoryRefused(
        f"scanning {', '.join(s.name for s in sources)} needs about "
        f"{room.need_bytes // mib:,} MiB (of {(dumps + live) // mib:,} MiB of pages read) but "
        f"{room.available_bytes // mib:,} MiB is available (MemAvailable) and "
        f"{room.margin_bytes // mib:,} MiB must stay free; scan fewer at once (trust groups "
        "are scanned one after another) or free memory")
