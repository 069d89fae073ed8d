"""`vmshare place --rebalance`: the few migrations across the fleet that would
gain most, found without trying every VM on every host.

The answer is defined as the exhaustive one: every move (VM, target host)
whose gain (its extra saving there minus its extra saving where it is, with
a 95% interval wholly above zero) is listed, best first (ties in fleet
order: source host, VM, target host), and taken greedily: each VM moved at
most once, each target's headroom spent as moves land on it, until ``top``.

What makes it cheap is a bound. A VM's extra saving on a host comes only from
contents it shares with the host's VMs of its trust group, and each shared
content adds at most one page (f(h + v) - f(h) - f(v) is 0 or 1 for f(n) = n -
ceil(n / M)), so the estimate is at most (shared contents that some VM samples)
/ rate + (shared heavy contents no VM of the group samples: counted exactly),
plus at most one page of all-zero pages (computed exactly). An inverted index
(per trust group: each content's value to the hosts that hold it; a value only
one VM holds is left out, as it can gain on no other host) gives each VM, in
one pass over the fleet's contents, how many of its contents any other host
holds, and, when needed, the count per host. It is built with one sort of
packed 64-bit keys (value bits, entry), not an argsort: numpy sorts plain
integers with SIMD. The moves are then visited lazily, best bound first: a VM's
bound (its contents held elsewhere, less a floor under its saving where it is)
stands for all its moves until it reaches the top of the queue; then, unless
the floor is that saving itself, the same with that saving estimated; then each
host's bound stands for that move until it reaches the top, and only then is
the move's gain estimated exactly (vmshare.fleet.placement.extra_on, as the
exhaustive search does). A host's bound counts the heavy contents nobody
samples exactly (each adds a page iff r(h) + r(v) <= M, r(n) = ((n - 1) mod M)
+ 1); those held by many hosts are kept as dense rows (per host M - r(h), small
integers), so a VM's exact heavy gain over every host is one gather and
compare, not a walk over each content's hosts. Each VM's positions in the index
are kept from building it, so opening a VM searches nothing. The floor is
counted in building the index: when no VM samples the VM's heavy contents and
no namesake is beside it, what its contents gain beside its host's group, in
extra_on's float steps, is its saving there but for at most one page of
all-zero pages (no loss); its estimate proper then waits for its first move's.
A bound is never below the gain it stands for and sorts before an exact gain of
equal value from later in fleet order, so the moves come out in exactly the
exhaustive order; a move whose VM is already moved or whose target is full is
dropped without estimating.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vmshare.engine import EngineConfig
from vmshare.engine.sampled import Contents, Estimate, sharing
from vmshare.fleet.placement import Move, extra_on
from vmshare.model import PAGE_SIZE
from vmshare.records.sketchfile import FULL, Sketch, VmSketch

I64 = npt.NDArray[np.int64]
Z_TEST = 1.96          # the 95% test every move must pass (its interval wholly a gain)
FLOOR, HERE = -2, -1   # a VM's queue entries before its hosts': bound with a floor, exact


class _GroupIndex:
    """One trust group's contents over the fleet: each value's hosts
    (``hosts[start:start+count]``, ascending) and whether any VM samples it
    (``sampled``); the values of one entry all at one position, of no hosts;
    zero pages per host, where each VM name is; per VM of the group (``places``:
    host, position) its contents held elsewhere (``elsewhere``: those that may
    count 1/rate, those that count one page at most) and ``risky``, its heavy
    contents that may count below zero where it is."""

    def __init__(self, hosts: Sequence[Sketch], places: list[tuple[int, int]],
                 max_page_sharing: int) -> None:
        vms = [hosts[s].vms[j] for s, j in places]
        parts = [a for v in vms for a in (v.values, v.heavy_values)]
        sizes = np.array([a.size for a in parts], np.int64)
        self.offset = np.r_[0, np.cumsum(sizes)]
        at, new_value = _grouped(parts)
        value_of = np.cumsum(new_value, dtype=np.int32 if at.size < 2**31 else np.int64) - 1
        last = int(value_of[-1]) + 1 if at.size else 0    # the value none shares: no hosts
        # each VM's values then heavy values (part k from offset[k]): their value's position
        self.pos = np.full(int(self.offset[-1]), last, value_of.dtype)
        self.pos[at] = value_of
        # of those entries (each value's, in fleet order): its VM, whether heavy, its pages
        part = np.repeat(np.arange(len(parts), dtype=np.int32), sizes)[at]
        owner, heavy = part >> 1, (part & 1).astype(bool)
        counts = np.concatenate([a.astype(np.uint32, copy=False) for v in vms for a in (
            v.counts, v.heavy_counts)] or [np.zeros(0, np.uint32)])[at]
        del at, part                                    # large: freed for what follows
        pages = np.where(heavy, counts, 0)
        host = np.array([s for s, _ in places], np.int32)[owner]
        new_pair = new_value | np.r_[True, host[1:] != host[:-1]][:host.size]
        self.count = np.bincount(value_of[new_pair], minlength=last + 1)  # hosts holding it
        held = self.count[value_of] >= 2                 # by another host too
        self.sampled = np.bincount(value_of[~heavy], minlength=last + 1) > 0
        wide = ~heavy | self.sampled[value_of]          # may count 1/rate: some VM samples it
        n = len(places)
        self.elsewhere = (np.bincount(owner[held & wide], minlength=n),
                          np.bincount(owner[held & ~wide], minlength=n))
        self.risky = np.bincount(owner[heavy & wide], minlength=n)
        self.hosts = host[new_pair]
        # the group's heavy pages of each value on each host (what extra_on's exact part sees)
        pair = np.flatnonzero(new_pair)
        self.heavy = np.add.reduceat(pages, pair, dtype=np.int64) if pair.size else pair
        self.start = np.r_[np.flatnonzero(new_value[new_pair]), self.hosts.size]
        full = np.add.reduceat(counts, pair, dtype=np.int64) if pair.size else pair
        self.beside = _beside(full, counts, heavy, new_pair, owner, n, max_page_sharing)
        self.zero = np.zeros(len(hosts), np.int64)
        self.rate = np.array([float(h.effective) for h in hosts]) / 2**64   # each host's
        self.where: dict[str, list[int]] = {}       # a VM name's hosts (names may repeat)
        for (s, _), v in zip(places, vms, strict=True):
            self.zero[s] += v.zero_pages
            self.where.setdefault(v.name, []).append(s)
        self._dense(max_page_sharing)

    def _dense(self, m: int) -> None:
        """The values that an eighth of the hosts or more hold, as dense rows (two
        bytes per host, about what their entries take here): per host whether it holds
        it (``present``) and q = M - r(h), r(h) = ((h - 1) mod M) + 1 for the
        group's h heavy pages of it there, 0 where it has none. A VM's v heavy
        pages of a value sampled nowhere gain one page there (f(h + v) - f(h) -
        f(v) = 1) exactly when r(h) + r(v) <= M, that is q > r(v) - 1: one
        gather and compare per value."""
        rows = np.flatnonzero((self.count >= 2) & (self.count * 8 >= self.zero.size))
        self.row = np.full(self.count.size, -1, np.int64)
        self.row[rows] = np.arange(rows.size)
        self.q = np.zeros((rows.size, self.zero.size),
                          np.uint8 if m <= 256 else np.uint16 if m <= 65536 else np.uint32)
        self.present = np.zeros((rows.size, self.zero.size), np.uint8)
        at, lens = self._at(rows)
        cell = np.repeat(np.arange(rows.size) * self.zero.size, lens) + self.hosts[at]
        h = self.heavy[at]
        np.negative(h, out=h)
        self.q.reshape(-1)[cell] = np.remainder(h, m, out=h)     # M - r(h), 0 for h = 0
        self.present.reshape(-1)[cell] = 1

    def split(self, slot: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any],
                                        npt.NDArray[np.bool_]]:
        """The VM at ``slot`` (in ``places``): the positions of its contents that may
        count 1/rate (its samples; its heavy ones that another VM of the group
        samples), of its heavy ones, and which of those are the rest: sampled
        nowhere, so their part of an estimate is exact."""
        at = self.offset[2 * slot: 2 * slot + 3]
        own, heavy = self.pos[at[0]:at[1]], self.pos[at[1]:at[2]]
        wide = self.sampled[heavy]
        return np.concatenate([own, heavy[wide]]), heavy, ~wide

    def _at(self, pos: I64) -> tuple[I64, I64]:
        """Where the (value, host) pairs of the values at ``pos`` are, how many each."""
        lens = self.count[pos]
        return _spans(self.start[pos], lens), lens

    def shared_per_host(self, pos: npt.NDArray[Any]) -> I64:
        """Per host, how many of the values at ``pos`` it holds."""
        row = self.row[pos]
        dense = row >= 0
        rows = row[dense]
        out = _count_above(self.present, rows, np.zeros(rows.size, np.uint8))
        at, _ = self._at(pos[~dense])
        return out + np.bincount(self.hosts[at], minlength=self.zero.size)

    def heavy_gain_per_host(self, pos: npt.NDArray[Any], pages: npt.NDArray[Any],
                            max_page_sharing: int) -> npt.NDArray[np.float64]:
        """Per host, sum over the values at ``pos`` (heavy, ``pages`` each) of
        f(h + v) - f(h) - f(v) with h the host's heavy pages of it: the exact part
        extra_on counts."""
        row = self.row[pos]
        dense = row >= 0
        rv1 = (pages[dense].astype(np.int64) - 1) % max_page_sharing   # r(v) - 1
        out = _count_above(self.q, row[dense], rv1.astype(self.q.dtype))
        pos, pages = pos[~dense], pages[~dense]
        at, lens = self._at(pos)
        h = self.heavy[at]
        v = np.repeat(pages.astype(np.int64), lens)
        gain = _gain(h, v, max_page_sharing)
        return (out + np.bincount(self.hosts[at], weights=gain, minlength=self.zero.size)
                ).astype(np.float64)


MIX = np.uint64(0x9E3779B97F4A7C15)   # odd: x -> x * MIX (mod 2**64) is one-to-one


def _grouped(parts: Sequence[npt.NDArray[np.uint64]]) -> tuple[I64, npt.NDArray[np.bool_]]:
    """The entries of ``parts`` (one after the other) whose value another entry
    has too, grouped by value (the groups in no particular order; in each,
    ascending), and where each value's group begins. One np.sort of packed keys,
    no argsort: the high bits of value x MIX, then the entry's index; keys equal
    in those high bits but of different values (their low bits differ; rare) are
    put right with a lexsort of their run."""
    n = sum(p.size for p in parts)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    b = (n - 1).bit_length()                          # bits of an entry's index
    key, same = np.arange(n, dtype=np.uint64), np.empty(n - 1, bool)
    rest = np.empty(n, np.uint32 if b <= 32 else np.uint64)    # the low bits left out
    high, low = np.uint64(b), np.uint64((1 << b) - 1)
    i, size, chunk = 0, 0, []
    for k, part in enumerate(parts):                  # in slices: no other array as large
        chunk.append(part)
        size += part.size
        if size >= 2**20 or k == len(parts) - 1:
            mix = np.concatenate(chunk) * MIX
            key[i:i + size] |= mix >> high << high
            rest[i:i + size] = mix & low
            i, size, chunk = i + size, 0, []
    key.sort()
    for i in range(0, n - 1, 2**20):                  # the next key has the same high bits
        j = min(i + 2**20, n - 1)
        np.less_equal(key[i + 1:j + 1] ^ key[i:j], low, out=same[i:j])
    key &= low
    run = np.r_[same, False] | np.r_[False, same]     # a key not alone in its high bits
    at = key.view(np.int64)[run]
    del key                                           # large: freed for what follows
    value = rest[at]                                  # in a run: equal iff the values are
    del rest
    new_run = np.r_[True, ~same][run]
    new_value = new_run | np.r_[True, value[1:] != value[:-1]][:at.size]
    mixed = np.flatnonzero(new_value & ~new_run)      # two values' keys in one run
    if mixed.size:
        first = np.flatnonzero(new_run)
        bad = np.unique(np.searchsorted(first, mixed, "right") - 1)
        lens = np.r_[first[1:], at.size][bad] - first[bad]
        fix = _spans(first[bad], lens)
        local = np.lexsort((at[fix], value[fix], np.repeat(bad, lens)))
        at[fix], value[fix] = at[fix][local], value[fix][local]
        new_value = new_run | np.r_[True, value[1:] != value[:-1]][:at.size]
        shared = np.r_[~new_value[1:], False] | ~new_value    # drop values of one entry
        at, new_value = at[shared], new_value[shared]
    return at, new_value


def _gain(h: I64, v: I64, m: int) -> I64:
    """f(h + v) - f(h) - f(v), f(n) = n - ceil(n / m): 0 or 1 (0 where h or v is 0)."""
    return (h + m - 1) // m + (v + m - 1) // m - (h + v + m - 1) // m


def _beside(full: I64, counts: npt.NDArray[np.uint32], heavy: npt.NDArray[np.bool_],
            new_pair: npt.NDArray[np.bool_], owner: npt.NDArray[np.int32], n: int,
            m: int) -> I64:
    """Per VM, what its sampled (row 0) and heavy (row 1) contents gain beside the
    rest of its host's group: sum of f(h + v) - f(h) - f(v), h the others' pages
    (``full``: per (value, host) pair, all the group's pages), v its own. When no
    VM samples its heavy contents, its saving there is row 0 / rate + row 1 (+ a
    gain of all-zero pages), as extra_on computes it, but for namesakes."""
    out, pairs = np.zeros((2, n), np.int64), 0
    for i in range(0, counts.size, 2**16):        # in slices: temporaries stay in cache
        own = counts[i:i + 2**16].astype(np.int64)
        pair_of = np.cumsum(new_pair[i:i + 2**16]) + (pairs - 1)
        pairs = int(pair_of[-1]) + 1
        gain = _gain(full[pair_of] - own, own, m)
        by = owner[i:i + 2**16] + n * heavy[i:i + 2**16]
        out += np.bincount(by, gain, minlength=2 * n).astype(np.int64).reshape(2, n)
    return out


def _spans(first: I64, lens: I64) -> I64:
    """first[i], first[i] + 1, ... (lens[i] of them), for each i in turn."""
    return np.repeat(first - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))


def _count_above(table: npt.NDArray[Any], rows: I64, floor: npt.NDArray[Any]) -> I64:
    """Per column, how many of ``table[rows]`` are above ``floor`` (one per row), in
    slices of about 256 KiB (temporaries in cache, no fresh pages: 3x faster
    here than 2 MB at once) and at most 65,535 rows, each summed in uint16."""
    out = np.zeros(table.shape[1], np.int64)
    step = max(1, min(2**16 - 1, 2**18 // max(1, table.shape[1])))
    for i in range(0, rows.size, step):
        above = np.greater(table[rows[i:i + step]], floor[i:i + step, None])
        out += above.view(np.uint8).sum(axis=0, dtype=np.uint16)
    return out


@dataclass
class _Vm:
    src: int
    slot: int                                       # in its group's index
    vm: VmSketch
    need: int
    bound: float                                    # on its gain, before here is known
    floor: float                                    # under here.value
    here: Estimate | None = None                    # its extra saving where it is
    order: list[tuple[float, int]] | None = None    # (-bound, target), best last
    tight: bool = False                             # floor: here.value but for zero pages


def _host_bounds(hosts: Sequence[Sketch], index: _GroupIndex, v: _Vm, room: npt.NDArray[
        np.float64], config: EngineConfig) -> list[tuple[float, int]]:
    """(-bound on the gain, target) of each target ``v`` might gain on, worst first."""
    below = v.floor if v.here is None else v.here.value
    vm = v.vm
    wide, heavy, exact = index.split(v.slot)
    shared = index.shared_per_host(wide).astype(np.float64)
    m = config.max_page_sharing
    certain = index.heavy_gain_per_host(heavy[exact], vm.heavy_counts[exact], m)
    rates = np.minimum(index.rate, index.rate[v.src])
    zero = np.zeros(len(hosts))
    if not config.use_zero_pages and vm.zero_pages:
        z = index.zero
        zero = (sharing(z + vm.zero_pages, m) - sharing(z, m)
                - sharing(vm.zero_pages, m)).astype(np.float64)
        for d in index.where.get(vm.name, ()):   # its name there: extra_on leaves that out
            zero[d] = 1.0
    namesakes = [d for d in index.where[vm.name] if d != v.src]
    if namesakes:                                # so at most one page per heavy content
        held = index.shared_per_host(heavy[exact])
        for d in namesakes:
            certain[d] = float(held[d])
    bound = shared / rates + (certain + zero) - below   # the gain's float steps
    ok = (bound > 0) & (room >= v.need)
    ok[v.src] = False
    at = np.flatnonzero(ok)
    at = at[np.lexsort((-at, bound[at]))]        # worst first; of equal bounds, last host first
    return list(zip((-bound[at]).tolist(), at.tolist(), strict=True))


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
        gi = index[g] = _GroupIndex(hosts, places, config.max_page_sharing)
        for slot, ((s, j), wide, narrow, risky) in enumerate(zip(places, *gi.elsewhere,
                                                                 gi.risky, strict=True)):
            vm, src = hosts[s].vms[j], hosts[s]
            zero = 1.0 if vm.zero_pages and not config.use_zero_pages else 0.0
            floor, tight = _floor(gi, slot, s, vm.name, src.effective, int(risky))
            v = vms[s, j] = _Vm(s, slot, vm, vm.pages * PAGE_SIZE, int(wide) / (
                min(src.effective, least) / 2**64) + (int(narrow) + zero), floor, tight=tight)
            if v.bound - floor > 0:
                heapq.heappush(queue, (-(v.bound - floor), s, j, FLOOR, 0))
    return _greedy(hosts, index, vms, queue, room, space, config, top)


def _floor(index: _GroupIndex, slot: int, src: int, name: str, effective: int, risky: int
           ) -> tuple[float, bool]:
    """A floor under the saving where it is of the VM at ``slot`` (on ``src``), and
    whether it is that saving but for zero pages: so unless a VM samples its heavy
    contents (each may count 1/rate - 1 below zero) or a namesake is beside it."""
    if risky:
        return -risky * (2**64 / effective - 1.0) * (1 + 1e-9) - 1e-9, False
    if index.where[name].count(src) > 1:
        return 0.0, False
    sampled, heavy = index.beside[:, slot].tolist()
    here = sampled / (effective / 2**64) + heavy             # extra_on's float steps,
    return here - here * 1e-9 - 1e-9, True                   # a hair under: never above


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
        if d == FLOOR and not v.tight:  # its saving where it is, then a tighter bound
            v.here = extra_on(v.vm, hosts[s].effective, hosts[s], config)
            if v.bound - v.here.value > 0:
                heapq.heappush(queue, (-(v.bound - v.here.value), s, j, HERE, 0))
            continue
        if d in (FLOOR, HERE):          # the VM's bound reached the top: its hosts'
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
            if v.here is None:          # tight: known but for its figures
                v.here = extra_on(v.vm, hosts[s].effective, hosts[s], config)
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
