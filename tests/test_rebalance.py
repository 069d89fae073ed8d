"""`place --rebalance` (vmshare.fleet.rebalance) gives exactly the answer of the
exhaustive search it replaced (kept here as the reference): the same moves,
in the same order, with the same figures, on many small random fleets with
shared contents, heavy contents, zero pages, trust groups, repeated VM names,
several sampling thresholds, tight headroom and ties."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from vmshare.engine import EngineConfig
from vmshare.engine.sampled import Contents, Estimate
from vmshare.fleet.placement import Move, extra_on
from vmshare.fleet.rebalance import _GroupIndex, rebalance
from vmshare.model import PAGE_SIZE
from vmshare.records.sketchfile import FULL, Sketch, VmSketch, rate_threshold


def exhaustive(hosts: Sequence[Sketch], room: dict[str, float], config: EngineConfig,
               top: int = 5) -> list[Move]:
    """The all-pairs rebalance as it was (every VM tried on every host)."""
    moves: list[Move] = []
    cache: dict[tuple[str, str | None, int], Contents] = {}
    for src in hosts:
        for vm in src.vms:
            here = extra_on(vm, src.effective, src, config)
            need = vm.pages * PAGE_SIZE
            for dst in hosts:
                if dst.host == src.host or room.get(dst.host, 0.0) < need:
                    continue
                there = extra_on(vm, src.effective, dst, config, cache)
                gain = Estimate(there.value - here.value, math.hypot(there.stderr, here.stderr))
                if gain.value - 1.96 * gain.stderr > 0:
                    moves.append(Move(vm.name, src.host, dst.host, gain, need,
                                      room[dst.host]))
    moves.sort(key=lambda m: -m.gain.value)
    chosen: list[Move] = []
    left = dict(room)
    for m in moves:
        if len(chosen) >= top or any(c.vm == m.vm for c in chosen):
            continue
        if left.get(m.target, 0.0) >= m.need_bytes:
            left[m.target] -= m.need_bytes
            chosen.append(m)
    return chosen


def random_vm(rng: np.random.Generator, name: str, pool: np.ndarray, heavy_pool: np.ndarray,
              threshold: int, groups: list[str | None]) -> VmSketch:
    under = pool[pool < np.uint64(threshold)]
    values = np.unique(rng.choice(under, int(rng.integers(0, min(under.size, 60) + 1))))
    heavy = np.setdiff1d(np.unique(rng.choice(heavy_pool, int(rng.integers(0, 4)))), values)
    counts = rng.integers(1, 4, values.size).astype(np.uint32)
    heavy_counts = rng.integers(8, 40, heavy.size).astype(np.uint32)
    zero = int(rng.choice([0, 0, 3, 255, 256, 1000]))
    pages = int(counts.sum()) + int(heavy_counts.sum()) + zero + int(rng.integers(0, 50))
    return VmSketch(name, groups[int(rng.integers(len(groups)))], 0, pages, zero,
                    values.astype(np.uint64), counts, heavy.astype(np.uint64), heavy_counts)


def random_fleet(seed: int) -> tuple[list[Sketch], dict[str, float], EngineConfig, int]:
    rng = np.random.default_rng(seed)
    rate = float(rng.choice([1.0, 1.0, 0.5, 1 / 8]))
    full = rate_threshold(rate)
    # a small pool: much shared; a large one: little, and all-zero pages decide
    pool = np.sort(rng.integers(0, full, int(rng.choice([80, 5000])), dtype=np.uint64))
    # heavy contents: some also sampled by other VMs (their saving where they are
    # can be estimated below zero)
    heavy_pool = np.concatenate([rng.integers(0, FULL - 1, 3, dtype=np.uint64), pool[:3]])
    group_choices: list[list[str | None]] = [["g"], ["g", "h"], ["g", None]]
    groups = group_choices[int(rng.integers(3))]
    hosts = []
    for i in range(int(rng.integers(2, 6))):
        effective = full if rng.random() < 0.7 else int(full * rng.uniform(0.5, 1.0))
        names = [f"vm{int(rng.integers(0, 12 if rng.random() < 0.2 else 10**6))}"
                 for _ in range(int(rng.integers(0, 5)))]
        vms = tuple(random_vm(rng, n, pool, heavy_pool, effective, groups) for n in names)
        hosts.append(Sketch(f"h{i}", b"k" * 8, full, effective, 0, vms))
    room = {}
    for h in hosts:
        if rng.random() < 0.9:
            room[h.host] = float(rng.choice([1e12, 100 * PAGE_SIZE, 250 * PAGE_SIZE, 0.0]))
    config = EngineConfig(max_page_sharing=int(rng.choice([2, 3, 256])),
                          use_zero_pages=bool(rng.random() < 0.3))
    return hosts, room, config, int(rng.choice([1, 2, 5, 50]))


def test_equal_to_the_exhaustive_search_on_random_fleets() -> None:
    with_moves = 0
    for seed in range(400):
        hosts, room, config, top = random_fleet(seed)
        want = exhaustive(hosts, room, config, top)
        got = rebalance(hosts, room, config, top)
        assert got == want, f"seed {seed}"
        with_moves += bool(want)
    assert with_moves > 100         # the fleets do have moves to find


@pytest.mark.parametrize("top", [1, 3, 50])
def test_ties_come_out_in_fleet_order(top: int) -> None:
    """Every VM gains the same on every other host: the exhaustive order (source,
    VM, target) decides, and headroom for one VM per host spreads the moves."""
    shared = np.arange(1, 101, dtype=np.uint64)
    vm = VmSketch("x", "g", 0, 100, 0, shared, np.ones(100, np.uint32))
    hosts = [Sketch(f"h{i}", b"k" * 8, FULL - 1, FULL - 1, 0,
                    tuple(VmSketch(f"v{i}{j}", "g", 0, 100, 0, vm.values, vm.counts)
                          for j in range(2)) if i < 3 else ())
             for i in range(5)]
    room = {h.host: 100.0 * PAGE_SIZE for h in hosts}
    config = EngineConfig()
    assert rebalance(hosts, room, config, top) == exhaustive(hosts, room, config, top)


def test_a_saving_estimated_below_zero_where_the_vm_is() -> None:
    """x's heavy content c, also sampled by y beside it, makes its saving where it
    is estimated below zero (-7 pages at rate 1/8, max_page_sharing 2), so its
    move gains more than its contents alone promise: 87 pages, ahead of w's 84."""
    thr = rate_threshold(1 / 8)
    # values a sample decides on by their top 32 bits: each its own decision here
    shared = np.arange(1, 11, dtype=np.uint64) << np.uint64(32)
    c = np.array([20 << 32], np.uint64)
    one = np.ones(10, np.uint32)
    nine = np.array([9], np.uint32)
    heavy84 = np.arange(1000, 1084, dtype=np.uint64) << np.uint64(32)   # sampled nowhere

    none = np.zeros(0, np.uint64)

    def vm(name: str, values: np.ndarray = none, counts: np.ndarray = none,
           heavy: np.ndarray = none, heavy_counts: np.ndarray = none) -> VmSketch:
        return VmSketch(name, "g", 0, 200, 0, values, counts.astype(np.uint32), heavy,
                        heavy_counts.astype(np.uint32))

    hosts = [Sketch("h0", b"k" * 8, thr, thr, 0, (
                 vm("x", shared, one, c, nine), vm("y", c, np.ones(1, np.uint32)),
                 vm("z", heavy=c, heavy_counts=nine))),
             Sketch("h1", b"k" * 8, thr, thr, 0, (vm("q", shared, one),)),
             Sketch("h2", b"k" * 8, thr, thr, 0, (
                 vm("w", heavy=heavy84, heavy_counts=np.ones(84, np.uint32)),)),
             Sketch("h3", b"k" * 8, thr, thr, 0, (
                 vm("r", heavy=heavy84, heavy_counts=np.ones(84, np.uint32)),))]
    room = {h.host: 1e12 for h in hosts}
    config = EngineConfig(max_page_sharing=2)
    assert extra_on(hosts[0].vms[0], thr, hosts[0], config).value == -7
    got = rebalance(hosts, room, config, 1)
    assert got == exhaustive(hosts, room, config, 1)
    assert [(m.vm, m.target, m.gain.value) for m in got] == [("x", "h1", 87)]


def test_a_vm_name_on_the_target_too_is_left_out_of_its_heavy_pages() -> None:
    """x's namesake on h1 is left out there (as extra_on does), so h1's heavy
    pages of x's 20 contents are y's one each: odd with x's one, each adds a
    page at max_page_sharing 2 (counting the namesake, two: none)."""
    heavy = np.arange(1, 21, dtype=np.uint64) << np.uint64(40)
    other = np.arange(100, 110, dtype=np.uint64) << np.uint64(40)
    none = np.zeros(0, np.uint64)

    def vm(name: str, values: np.ndarray) -> VmSketch:
        return VmSketch(name, "g", 0, 50, 0, none, none.astype(np.uint32), values,
                        np.ones(values.size, np.uint32))

    thr = rate_threshold(1 / 8)
    hosts = [Sketch("h0", b"k" * 8, thr, thr, 0, (vm("x", heavy),)),
             Sketch("h1", b"k" * 8, thr, thr, 0, (vm("x", heavy), vm("y", heavy))),
             Sketch("h2", b"k" * 8, thr, thr, 0, (vm("w", other),)),
             Sketch("h3", b"k" * 8, thr, thr, 0, (vm("r", other),))]
    room = {h.host: 1e12 for h in hosts}
    config = EngineConfig(max_page_sharing=2)
    got = rebalance(hosts, room, config, 1)
    assert got == exhaustive(hosts, room, config, 1)
    assert [(m.vm, m.source, m.target, m.gain.value) for m in got] == [("x", "h0", "h1", 20)]


def wide_heavy_fleet(seed: int) -> tuple[list[Sketch], dict[str, float], EngineConfig]:
    """Heavy contents held on most hosts (so the search keeps them as dense rows),
    page counts crossing multiples of max_page_sharing, a few sampled contents,
    two trust groups, repeated names."""
    rng = np.random.default_rng(seed)
    thr = rate_threshold(float(rng.choice([1.0, 1 / 8])))
    heavy_pool = rng.integers(0, FULL - 1, 12, dtype=np.uint64)
    pool = rng.integers(0, thr, 6, dtype=np.uint64)
    hosts = []
    for h in range(int(rng.integers(8, 12))):
        vms = []
        for _ in range(int(rng.integers(1, 4))):
            heavy = np.unique(rng.choice(heavy_pool, int(rng.integers(4, 13))))
            values = np.setdiff1d(np.unique(rng.choice(pool, int(rng.integers(0, 3)))), heavy)
            vms.append(VmSketch(f"vm{int(rng.integers(0, 30))}", str(rng.choice(["g", "h"])),
                                0, 4000, int(rng.choice([0, 5])), values,
                                np.ones(values.size, np.uint32), heavy,
                                rng.integers(1, 700, heavy.size).astype(np.uint32)))
        hosts.append(Sketch(f"h{h}", b"k" * 8, thr, thr, 0, tuple(vms)))
    room = {h.host: float(rng.choice([1e12, 5000 * PAGE_SIZE])) for h in hosts}
    config = EngineConfig(max_page_sharing=int(rng.choice([2, 3, 7, 256, 300])))
    return hosts, room, config


def test_equal_to_the_exhaustive_search_with_heavy_contents_held_widely() -> None:
    for seed in range(40):
        hosts, room, config = wide_heavy_fleet(seed)
        top = 1 + seed % 6
        assert rebalance(hosts, room, config, top) == exhaustive(hosts, room, config, top), \
            f"seed {seed}"


def heavy_only(seed: int) -> tuple[list[Sketch], EngineConfig, list[tuple[int, int]],
                                  _GroupIndex]:
    """wide_heavy_fleet with heavy contents only (none sampled, no all-zero pages),
    one trust group, and its index."""
    hosts, _, config = wide_heavy_fleet(seed)
    hosts = [replace(h, vms=tuple(replace(v, values=v.values[:0], counts=v.counts[:0],
                                          zero_pages=0, group="g") for v in h.vms))
             for h in hosts]
    places = [(s, j) for s, h in enumerate(hosts) for j in range(len(h.vms))]
    return hosts, config, places, _GroupIndex(hosts, places, config.max_page_sharing)


def test_a_heavy_gain_is_bounded_exactly_per_host() -> None:
    """With heavy contents only (none sampled, no all-zero pages) the bound on each
    move is its gain itself (but where the VM's namesake is): the dense rows count
    f(h + v) - f(h) - f(v) exactly."""
    from vmshare.fleet.rebalance import _host_bounds, _Vm
    for seed in range(30):
        hosts, config, places, index = heavy_only(seed)
        assert index.q.shape[0] > 0                     # dense rows are used
        room = np.full(len(hosts), 1e12)
        for slot, (s, j) in enumerate(places):
            vm = hosts[s].vms[j]
            here = extra_on(vm, hosts[s].effective, hosts[s], config)
            v = _Vm(s, slot, vm, 0, 0.0, 0.0, here)
            bounds = dict((d, -b) for b, d in _host_bounds(hosts, index, v, room, config))
            for d, dst in enumerate(hosts):
                gain = extra_on(vm, hosts[s].effective, dst, config).value - here.value
                namesake = any(w.name == vm.name for w in dst.vms)    # bounded loosely
                if d != s and gain > 0 and not namesake:
                    assert bounds[d] == gain, (seed, vm.name, d)
                assert bounds.get(d, 0.0) >= gain or d == s


def test_the_index_groups_values_exactly_when_their_packed_keys_collide() -> None:
    """_grouped sorts keys of (high bits of value x MIX, entry): values made to
    share those bits (x and x + MIX^-1 differ by 1 after mixing), or the low bits
    (x + 2**13 MIX^-1), must still come out each in its own group, entries
    ascending, and values of one entry left out."""
    from vmshare.fleet.rebalance import MIX, _grouped
    rng = np.random.default_rng(3)
    inverse = pow(int(MIX), -1, 2**64)
    base = rng.integers(0, FULL - 1, 300, dtype=np.uint64)
    twins = np.array([(int(x) + inverse) % 2**64 for x in base[:150]], np.uint64)
    # and values whose mixed low bits equal others' (their keys sort next to them)
    cousins = np.array([(int(x) + (inverse << 13)) % 2**64 for x in base[150:200]], np.uint64)
    pool = np.concatenate([base, twins, cousins])
    values = rng.choice(pool, 5000)                    # most values many times, interleaved
    lone = np.array([(int(base[-1]) + inverse) % 2**64], np.uint64)   # once, by a shared one
    values = np.concatenate([values, lone, twins[:1] ^ np.uint64(1)])
    at, new_value = _grouped([values[:2000], values[2000:2000], values[2000:]])
    got = sorted(tuple(g.tolist()) for g in np.split(at, np.flatnonzero(new_value)[1:]))
    want = sorted(tuple(np.flatnonzero(values == v).tolist()) for v in np.unique(values)
                  if (values == v).sum() >= 2)
    assert got == want
    mixed = values * MIX >> np.uint64(13)
    assert np.unique(mixed).size < np.unique(values).size     # the keys did collide


def test_a_vms_floor_is_its_saving_where_it_is_but_for_zero_pages() -> None:
    """The floor under a VM's saving where it is never exceeds what extra_on
    estimates; when tight (no VM samples its heavy contents, no namesake beside
    it) it is that estimate exactly, but for the page all-zero pages may add."""
    from vmshare.fleet.rebalance import _floor
    exact = 0
    for seed in range(200):
        hosts, _, config, _ = random_fleet(seed)
        for g in {v.group for h in hosts for v in h.vms}:
            places = [(s, j) for s, h in enumerate(hosts) for j, v in enumerate(h.vms)
                      if v.group == g]
            index = _GroupIndex(hosts, places, config.max_page_sharing)
            for slot, (s, j) in enumerate(places):
                vm, src = hosts[s].vms[j], hosts[s]
                floor, tight = _floor(index, slot, s, vm.name, src.effective,
                                      int(index.risky[slot]))
                here = extra_on(vm, src.effective, src, config).value
                assert floor <= here, (seed, vm.name)
                if tight and (config.use_zero_pages or not vm.zero_pages):
                    assert floor == pytest.approx(here, rel=2e-9, abs=2e-9), (seed, vm.name)
                    exact += here > 0
    assert exact > 100


def test_dense_rows_are_counted_past_what_uint16_holds() -> None:
    """On two hosts a VM's dense rows may number more than 65,535: each slice's
    uint16 sum must not wrap."""
    from vmshare.fleet.rebalance import _count_above
    table = np.ones((70_000, 2), np.uint8)
    rows = np.arange(70_000, dtype=np.int64)
    got = _count_above(table, rows, np.zeros(70_000, np.uint8))
    assert got.tolist() == [70_000, 70_000]
