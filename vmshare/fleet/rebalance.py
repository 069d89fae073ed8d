"""`vmshare place --rebalance`: the few migrations across the fleet that would
gain most, found without trying every VM on every host.

The answer is defined as the exhaustive one: every move (VM, target host)
whose gain (its extra saving there minus its extra saving where it is, with
a 95% interval wholly above zero) is listed, best first (ties in fleet
order: source host, VM, target host), and taken greedily: each VM moved at
most once, each target's headroom spent as moves land on it, until ``top``.

What makes it cheap is a bound. A VM's extra saving on a host comes only from
contents it shares with the host's VMs of its trust group, and each shared
content adds at most one page (f(h + v) - f(h) - f(v) is 0 or 1 for
f(n) = n - ceil(n / M)), so the estimate is at most (shared sampled or heavy
contents) / rate, plus at most one page of all-zero pages (computed exactly).
An inverted index (per trust group: each content's value to the hosts that
hold it) gives each VM, in one pass over its own contents, how many of them
any other host holds, and, when needed, the count per host. The moves are
then visited lazily, best bound first: a VM's own bound (its contents held
elsewhere) stands for all its moves until it reaches the top of the queue;
then each host's bound stands for that move until it reaches the top, and
only then is the move's gain estimated exactly (vmshare.fleet.placement.
extra_on, as the exhaustive search does). A bound is never below the gain it
stands for and sorts before an exact gain of equal value from later in fleet
order, so the moves come out in exactly the exhaustive order; a move whose
VM is already moved or whose target is full is dropped without estimating.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmshare.engine import EngineConfig
from vmshare.engine.sampled import Contents, Estimate, sharing
from vmshare.fleet.placement import Move, extra_on
from vmshare.model import PAGE_SIZE
from vmshare.records.sketchfile import FULL, Sketch, VmSketch

I64 = npt.NDArray[np.int64]
Z_TEST = 1.96          # the 95% test every move must pass (its interval wholly a gain)


def _ids(vm: VmSketch) -> npt.NDArray[np.uint64]:
    # sampled and heavy values never overlap (the file format refuses it); a
    # repeat would only make a bound larger
    return np.concatenate([vm.values, vm.heavy_values])


class _GroupIndex:
    """One trust group's contents over the fleet: each value's hosts
    (``hosts[start:start+count]``), zero pages per host, where each VM name is,
    and ``elsewhere``: per VM of the group (``places``: host, position), how
    many of its contents another host holds (its own holds them all)."""

    def __init__(self, hosts: Sequence[Sketch], places: list[tuple[int, int]]) -> None:
        ids = [_ids(hosts[s].vms[j]) for s, j in places]
        sizes = [a.size for a in ids]
        values = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
        order = np.argsort(values, kind="stable")  # hosts stay ascending per value
        values = values[order]
        owner = np.repeat(np.arange(len(places)), sizes)[order]
        host = np.array([s for s, _ in places], np.int64)[owner]
        new_value = np.r_[True, values[1:] != values[:-1]] if values.size else \
            np.zeros(0, bool)
        new_pair = new_value | np.r_[True, host[1:] != host[:-1]] if values.size else \
            new_value
        value_of = np.cumsum(new_value) - 1
        spread = np.bincount(value_of, weights=new_pair)       # hosts holding each value
        held = spread[value_of] >= 2 if values.size else np.zeros(0, bool)
        self.elsewhere = np.bincount(owner, weights=held, minlength=len(places))
        self.hosts = host[new_pair]
        first = np.flatnonzero(new_value[new_pair]) if values.size else np.zeros(0, np.int64)
        self.values, self.start = values[new_pair][first], first
        self.count = np.diff(np.r_[first, self.hosts.size])
        self.zero = np.zeros(len(hosts), np.int64)
        self.where: dict[str, list[int]] = {}       # a VM name's hosts (names may repeat)
        for s, j in places:
            self.zero[s] += hosts[s].vms[j].zero_pages
            self.where.setdefault(hosts[s].vms[j].name, []).append(s)

    def shared_per_host(self, ids: npt.NDArray[np.uint64]) -> I64:
        """Per host, how many of ``ids`` it holds."""
        pos = np.searchsorted(self.values, ids)
        lens = self.count[pos]
        first = np.repeat(self.start[pos] - np.cumsum(lens) + lens, lens)
        at = first + np.arange(int(lens.sum()))
        return np.bincount(self.hosts[at], minlength=self.zero.size).astype(np.int64)


@dataclass
class _Vm:
    src: int
    vm: VmSketch
    need: int
    here: Estimate | None = None                    # its extra saving where it is
    order: list[tuple[float, int]] | None = None    # (-bound, target), best last


def _here_floor(vm: VmSketch, threshold: int) -> float:
    """A floor under the VM's extra saving where it is: only a heavy content that
    may also be sampled (under the threshold) can count below zero, by at most
    1/rate - 1 pages."""
    risky = int(np.count_nonzero(vm.heavy_values < np.uint64(min(threshold, FULL - 1))))
    return -risky * (2**64 / threshold - 1.0) * (1 + 1e-9) - 1e-9 if risky else 0.0


def _host_bounds(hosts: Sequence[Sketch], index: _GroupIndex, v: _Vm, room: npt.NDArray[
        np.float64], config: EngineConfig) -> list[tuple[float, int]]:
    """(-bound on the gain, target) of each target ``v`` might gain on, worst first."""
    assert v.here is not None
    vm, src = v.vm, hosts[v.src]
    shared = index.shared_per_host(_ids(vm)).astype(np.float64)
    rates = np.array([min(src.effective, h.effective) / 2**64 for h in hosts])
    zero = np.zeros(len(hosts))
    if not config.use_zero_pages and vm.zero_pages:
        m = config.max_page_sharing
        z = index.zero
        zero = (sharing(z + vm.zero_pages, m) - sharing(z, m)
                - sharing(vm.zero_pages, m)).astype(np.float64)
        for d in index.where.get(vm.name, ()):   # its name there: extra_on leaves that out
            zero[d] = 1.0
    bound = shared / rates + zero - v.here.value    # the same float steps as the gain's
    ok = (bound > 0) & (room >= v.need)
    ok[v.src] = False
    return sorted(((-float(bound[d]), int(d)) for d in np.flatnonzero(ok)), reverse=True)


def rebalance(hosts: Sequence[Sketch], room: dict[str, float], config: EngineConfig,
              top: int = 5) -> list[Move]:
    """The few moves that gain most, best first (see the module docstring)."""
    groups = sorted({v.group for h in hosts for v in h.vms}, key=lambda g: g or "")
    index: dict[str | None, _GroupIndex] = {}
    least = min((h.effective for h in hosts), default=FULL)
    space = np.array([room.get(h.host, 0.0) for h in hosts])
    queue: list[tuple[float, int, int, int, int]] = []
    vms: dict[tuple[int, int], _Vm] = {}
    for g in groups:
        places = [(s, j) for s, h in enumerate(hosts) for j, v in enumerate(h.vms)
                  if v.group == g]
        index[g] = _GroupIndex(hosts, places)
        for (s, j), n in zip(places, index[g].elsewhere, strict=True):
            vm, src = hosts[s].vms[j], hosts[s]
            vms[s, j] = _Vm(s, vm, vm.pages * PAGE_SIZE)
            zero = 1.0 if vm.zero_pages and not config.use_zero_pages else 0.0
            bound = int(n) / (min(src.effective, least) / 2**64) + zero \
                - _here_floor(vm, src.effective)
            if bound > 0:
                heapq.heappush(queue, (-bound, s, j, -1, 0))
    return _greedy(hosts, index, vms, queue, room, space, config, top)


def _greedy(hosts: Sequence[Sketch], index: dict[str | None, _GroupIndex],
            vms: dict[tuple[int, int], _Vm], queue: list[tuple[float, int, int, int, int]],
            room: dict[str, float], space: npt.NDArray[np.float64], config: EngineConfig,
            top: int) -> list[Move]:
    chosen: list[Move] = []
    moved: set[str] = set()             # by name, as the exhaustive search
    left = dict(room)
    exact: dict[tuple[int, int, int], Estimate] = {}
    cache: dict[tuple[str, str | None, int], Contents] = {}
    while queue and len(chosen) < top:
        _, s, j, d, is_exact = heapq.heappop(queue)
        v = vms[s, j]
        if v.vm.name in moved:
            continue
        if d < 0:                       # the VM's own bound reached the top: its hosts'
            v.here = extra_on(v.vm, hosts[s].effective, hosts[s], config)
            v.order = _host_bounds(hosts, index[v.vm.group], v, space, config)
        elif is_exact:
            dst = hosts[d].host
            if left.get(dst, 0.0) >= v.need:
                left[dst] -= v.need
                moved.add(v.vm.name)
                chosen.append(Move(v.vm.name, hosts[s].host, dst, exact.pop((s, j, d)),
                                   v.need, room[dst]))
            continue
        elif left.get(hosts[d].host, 0.0) >= v.need:
            assert v.here is not None
            there = extra_on(v.vm, hosts[s].effective, hosts[d], config, cache)
            gain = Estimate(there.value - v.here.value, math.hypot(there.stderr,
                                                                    v.here.stderr))
            if gain.value - Z_TEST * gain.stderr > 0:
                exact[s, j, d] = gain
                heapq.heappush(queue, (-gain.value, s, j, d, 1))
        if v.order:
            bound, target = v.order.pop()
            heapq.heappush(queue, (bound, s, j, target, 0))
    return chosen
