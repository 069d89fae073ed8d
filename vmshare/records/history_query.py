"""What ``vmshare history`` and the report ask of the history database: the
samples of a window, at a resolution chosen for it, and what the database
lacks of that window, said rather than hidden.

"auto" picks the finest resolution that holds the whole window (or as much
of it as there is) in at most AUTO_MAX_SAMPLES samples: raw samples for a
few hours, 5-minute aggregates for days, hourly ones for weeks and beyond.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshare.records.history import AUTO_MAX_SAMPLES
from vmshare.records.history_db import LABELS, MAINTAIN_EVERY_S, RESOLUTIONS, HistoryDb


@dataclass(frozen=True)
class Answer:
    """The samples of one window at one resolution, and what is missing."""

    path: Path
    resolution: str                       # "raw", "5m" or "1h"
    since: float                          # the window asked for (0: all)
    starts: float | None                  # the first sample at this resolution
    lacks: str = ""                       # "" when the answer covers the window
    samples: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[tuple[float, float]] = field(default_factory=list)   # (last before, next)
    now: float = 0.0                      # when it was answered (a gap up to now ends there)

    @property
    def label(self) -> str:
        return LABELS[self.resolution]

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.path), "resolution": self.resolution,
                "resolution_seconds": RESOLUTIONS[self.resolution] or None,
                "since": self.since or None, "starts": self.starts,
                "lacks": self.lacks or None,
                "gaps": [{"from": a, "to": b, "seconds": round(b - a, 3)} for a, b in self.gaps],
                "samples": self.samples}

    def gaps_note(self) -> str:
        """One line on the gaps ("" without any): the longest, and how many."""
        if not self.gaps:
            return ""
        now = self.now
        a, b = max(self.gaps, key=lambda g: g[1] - g[0])
        longest = (f"{_span(b - a)} from {_when(a, now)} to "
                   f"{'now' if b >= now else time.strftime('%Y-%m-%d %H:%M', time.localtime(b))}")
        if len(self.gaps) == 1:
            return f"no samples for {longest} (vmshare's daemon was not recording)"
        total = sum(y - x for x, y in self.gaps)
        return (f"{len(self.gaps)} gaps without samples ({_span(total)} in all; the longest "
                f"{longest}): vmshare's daemon was not recording")


#: consecutive samples further apart than this many steps leave a gap
GAP_STEPS = 3


def find_gaps(times: list[float], step: float, now: float,
              trailing_slack: float = 0.0) -> list[tuple[float, float]]:
    """Stretches with no sample: between consecutive ``times`` (ascending) more
    than GAP_STEPS x ``step`` apart, and from the last one to ``now`` (allowing
    ``trailing_slack`` more: an aggregate exists only once its bucket is
    complete and folded)."""
    limit = GAP_STEPS * step
    out = [(a, b) for a, b in itertools.pairwise(times) if b - a > limit]
    if times and now - times[-1] > limit + trailing_slack:
        out.append((times[-1], now))
    return out


def _span(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _when(t: float, now: float) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(t))} ({_span(now - t)} ago)"


def choose(db: HistoryDb, since: float, now: float, raw_step: float,
           wanted: str = "auto") -> tuple[str, dict[str, float | None]]:
    """The resolution to answer with, and where each resolution starts."""
    starts = db.starts()
    if wanted != "auto":
        return wanted, starts
    known = [t for t in starts.values() if t is not None]
    if not known:
        return "raw", starts
    window = max(since, min(known))
    # Aggregates start at a bucket's start, before their first sample: a
    # resolution covers the window when it starts within the coarsest bucket.
    slack = max(raw_step, *RESOLUTIONS.values())
    covering = [r for r in RESOLUTIONS if (s := starts[r]) is not None and s <= window + slack]
    for r in covering:
        count = db.count_raw(since) if r == "raw" else (now - window) / RESOLUTIONS[r]
        if count <= AUTO_MAX_SAMPLES:
            return r, starts
    if covering:
        return covering[-1], starts
    return min(known_at(starts), key=lambda r: starts[r] or now), starts


def known_at(starts: dict[str, float | None]) -> list[str]:
    return [r for r in RESOLUTIONS if starts[r] is not None]


def answer(db: HistoryDb, since: float, *, resolution: str = "auto", raw_step: float = 60.0,
           now: float | None = None) -> Answer:
    """Samples newer than ``since`` (0: all) at ``resolution`` ("auto" or one of
    RESOLUTIONS). Raises HistoryCorrupt, HistoryError."""
    now = time.time() if now is None else now
    with db.snapshot():
        return _answer(db, since, resolution, raw_step, now)


def _answer(db: HistoryDb, since: float, resolution: str, raw_step: float,
            now: float) -> Answer:
    chosen, starts = choose(db, since, now, raw_step, resolution)
    first = starts[chosen]
    lacks = ""
    known = [t for t in starts.values() if t is not None]
    if first is None and known:
        lacks = f"no {LABELS[chosen]} are kept; try --resolution auto"
    elif since and first is not None and first > since + (RESOLUTIONS[chosen] or raw_step):
        earliest = min(known)
        if earliest < first - max(raw_step, *RESOLUTIONS.values()):   # not just a bucket's start
            lacks = (f"{LABELS[chosen]} start {_when(first, now)}; older history is kept "
                     "coarser (--resolution 5m or 1h, or auto)")
        else:
            lacks = f"history starts {_when(first, now)}; showing what there is"
    samples = db.samples(chosen, since)
    step = RESOLUTIONS[chosen] or raw_step
    # the bucket being filled, the last complete one, and the wait for the next fold
    slack = 2 * step + MAINTAIN_EVERY_S if RESOLUTIONS[chosen] else 0.0
    return Answer(path=db.path, resolution=chosen, since=since, starts=first, lacks=lacks,
                  samples=samples, now=now,
                  gaps=find_gaps([r["time"] for r in samples], step, now, slack))
