"""``predict --estimate``: pages_sharing and each VM's saving estimated from a
content sketch instead of the engine's exact run, with a 95% interval.

The estimator and its variance: vmshare.engine.sampled (Horvitz-Thompson over
groups of contents sampled independently with probability p). A trust group's figure
uses only its members' samples, as the engine runs one tree per group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmshare.engine import EngineConfig
from vmshare.engine.sampled import Estimate, Member, group_sharing
from vmshare.errors import UsageError
from vmshare.prediction.sketch import DEFAULT_MAX_ENTRIES, DEFAULT_RATE, sketch_targets
from vmshare.prediction.targets import Target, check_unique
from vmshare.records.sketchfile import Sketch, SketchKey, VmSketch


@dataclass(frozen=True)
class VmEstimate:
    name: str
    pages: int
    zero_pages: int
    saved: Estimate                # pages: its fair share of pages_sharing


@dataclass(frozen=True)
class GroupEstimate:
    group: str | None
    pages_sharing: Estimate
    vms: tuple[VmEstimate, ...]


@dataclass(frozen=True)
class SketchEstimate:
    config: EngineConfig
    rate: float                    # the rate the samples obey
    groups: tuple[GroupEstimate, ...]
    sketch_bytes: int              # what the samples would take in a file

    def total(self) -> Estimate:
        out = Estimate(0.0, 0.0)
        for g in self.groups:
            out = out + g.pages_sharing
        return out


def member(v: VmSketch) -> Member:
    return Member(v.values, v.counts, v.heavy_values, v.heavy_counts, v.zero_pages,
                  v.decisions)


def estimate_sketch(sk: Sketch, config: EngineConfig, *, by_group: bool) -> SketchEstimate:
    """Estimates from one sketch (its VMs in one group each, or all together)."""
    buckets: dict[str | None, list[VmSketch]] = {}
    for v in sk.vms:
        buckets.setdefault(v.group if by_group else None, []).append(v)
    groups = []
    for group, members in sorted(buckets.items(), key=lambda kv: kv[0] or ""):
        whole, per = group_sharing([member(v) for v in members], sk.rate,
                                   config.max_page_sharing, config.use_zero_pages)
        groups.append(GroupEstimate(group, whole, tuple(
            VmEstimate(v.name, v.pages, v.zero_pages, e)
            for v, e in zip(members, per, strict=True))))
    size = sum(v.nbytes() for v in sk.vms)
    return SketchEstimate(config, sk.rate, tuple(groups), size)


def estimate(targets: Sequence[Target], config: EngineConfig, *,
             groups: dict[str, str] | None = None, rate: float = DEFAULT_RATE,
             key: SketchKey | None = None, max_entries: int = DEFAULT_MAX_ENTRIES,
             progress: Callable[[float, str], None] | None = None,
             workers: int | None = None) -> SketchEstimate:
    """Sketch ``targets`` (one read of each, under ``key``; default a fresh random
    key, so repeated runs are independent trials; ``workers`` threads, see
    sketch_targets) and estimate. Raises UsageError, SketchError and what the
    sources raise."""
    if not targets:
        raise UsageError("nothing to predict: give domains, --dump files or --pid processes")
    check_unique(targets)
    k = key or SketchKey.from_secret(os.urandom(32))
    sk = sketch_targets(targets, k, host="", rate=rate, max_entries=max_entries,
                        groups=groups, progress=progress, workers=workers)
    return estimate_sketch(sk, config, by_group=groups is not None)
