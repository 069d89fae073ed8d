"""The userspace KSM engine against hand-computed cases and a naive reference."""

from __future__ import annotations

import ast
import random
from collections.abc import Mapping, Sequence
from dataclasses import fields
from fractions import Fraction
from pathlib import Path
from unittest.mock import patch

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine_reference import ReferenceKsm
from vmshare.engine import EngineConfig, KsmCounters, KsmEngine, state
from vmshare.errors import UsageError
from vmshare.model import COUNTER_MEANINGS, PAGE_SIZE, PageRun, Region

Z = bytes(PAGE_SIZE)


def pg(tag: int) -> bytes:
    """A distinct non-zero page per tag (differs only in its last byte from tag 1's)."""
    return bytes([7]) * (PAGE_SIZE - 2) + tag.to_bytes(2, "little")


World = dict[str, list[bytes | None]]   # source -> pages of its one region (None: hole)


def feed_world(e: KsmEngine, world: World, gens: Mapping[str, str] | None = None,
               shuffle: random.Random | None = None, *, fetched: World | None = None,
               store: int = 0, prehashed: bool = False) -> KsmCounters:
    """One scan of ``world``. With ``fetched`` the runs are fed without being
    retained and the engine reads pages again from ``fetched`` (the content
    then: usually ``world`` itself); ``store``: begin_scan's store_pages.
    ``prehashed``: as the streaming scan's readers hand runs over (with
    ``fetched``): checksums and the zero check made apart, the checksums
    alone while the engine does not need the bytes."""
    regions = {s: [Region("ram", len(p) * PAGE_SIZE, (gens or {}).get(s, ""))]
               for s, p in world.items()}
    e.begin_scan(regions, store_pages=store)
    runs: list[PageRun] = []
    for s, pages in world.items():
        i = 0
        while i < len(pages):
            if pages[i] is None:
                i += 1
                continue
            j = i
            while j < len(pages) and pages[j] is not None and (j - i < 2 or shuffle is None):
                j += 1
            data = b"".join(p for p in pages[i:j] if p is not None)
            runs.append(PageRun(s, "ram", i, memoryview(bytearray(data))))
            i = j
    if shuffle is not None:
        shuffle.shuffle(runs)
    for r in runs:
        if prehashed and fetched is not None:
            h = e.checksums(r.data)
            if e.needs_bytes:
                e.feed(r, retain=False, checksums=h, zeros_checked=e.zeros_hold(r.data, h))
            else:
                e.feed_checksums(r.source, r.region, r.first_page, h)
        else:
            e.feed(r, retain=fetched is None)
    if fetched is None:
        return e.end_scan().counters
    flat = [p for pages in fetched.values() for p in pages]
    def fetch(pos: npt.NDArray[np.int64]) -> memoryview:
        assert all(flat[q] is not None for q in pos.tolist()), "a hole was asked for"
        return memoryview(b"".join(flat[q] or b"" for q in pos.tolist()))

    return e.end_scan(fetch).counters


def ref_scan(ref: ReferenceKsm, world: World, gens: Mapping[str, str] | None = None
             ) -> dict[str, int]:
    regions: dict[str, Sequence[Region]] = {
        s: [Region("ram", len(p) * PAGE_SIZE, (gens or {}).get(s, ""))]
        for s, p in world.items()}
    content = {(s, "ram", i): b for s, pages in world.items()
               for i, b in enumerate(pages) if b is not None}
    return ref.scan(regions, content)


def as_dict(c: KsmCounters) -> dict[str, int]:
    d = {f.name: getattr(c, f.name) for f in fields(c)}
    d.pop("pages_scanned")
    return d


def xxh(b: bytes | memoryview) -> int:
    return int(xxhash.xxh3_64_intdigest(b))


# -- hand-computed cases ---------------------------------------------------------------

def test_two_scans_before_merging() -> None:
    e = KsmEngine()
    world: World = {"a": [pg(1), pg(2)], "b": [pg(1), pg(3)]}
    c1 = feed_world(e, world)
    assert (c1.pages_shared, c1.pages_sharing, c1.pages_unshared, c1.pages_volatile) == \
        (0, 0, 0, 4)
    c2 = feed_world(e, world)
    assert (c2.pages_shared, c2.pages_sharing, c2.pages_unshared, c2.pages_volatile) == \
        (1, 1, 2, 0)
    assert c2.full_scans == 2
    c3 = feed_world(e, world)
    assert as_dict(c3) | {"full_scans": 2} == as_dict(c2)
    assert e.shares_with() == {"a": {"b": 1}, "b": {"a": 1}}


def test_max_page_sharing_makes_chain_of_dups() -> None:
    e = KsmEngine(EngineConfig(max_page_sharing=2))
    world: World = {"a": [pg(1)] * 5}
    feed_world(e, world)
    c = feed_world(e, world)
    # p0+p1 -> dup 1 (full); p2 unstable; p3 pairs with it -> dup 2, a chain; p4 unstable
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (2, 2, 1)
    assert (c.stable_node_chains, c.stable_node_dups) == (1, 2)
    world = {"a": [pg(1)] * 6}
    feed_world(e, world)                          # the new page is volatile
    c = feed_world(e, world)
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (3, 3, 0)
    assert (c.stable_node_chains, c.stable_node_dups) == (1, 3)


def test_256_way_sharing_like_the_kernel_note() -> None:
    e = KsmEngine(EngineConfig(max_page_sharing=4))
    world: World = {"a": [pg(9)] * 64}
    feed_world(e, world)
    c = feed_world(e, world)
    assert (c.pages_shared, c.pages_sharing, c.stable_node_dups) == (16, 48, 16)


def test_cow_break_of_merged_page() -> None:
    e = KsmEngine()
    feed_world(e, {"a": [pg(1)], "b": [pg(1)]})
    c = feed_world(e, {"a": [pg(1)], "b": [pg(1)]})
    assert (c.pages_shared, c.pages_sharing) == (1, 1)
    c = feed_world(e, {"a": [pg(1)], "b": [pg(2)]})
    # b broke out (volatile); a still maps the KSM page alone
    assert (c.pages_shared, c.pages_sharing, c.pages_volatile) == (1, 0, 1)
    c = feed_world(e, {"a": [pg(2)], "b": [pg(2)]})
    # a broke out too: the KSM page is gone; b is stable, a is volatile
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.pages_volatile) == \
        (0, 0, 1, 1)


@pytest.mark.parametrize("use_zero_pages", [False, True])
def test_zero_pages(use_zero_pages: bool) -> None:
    e = KsmEngine(EngineConfig(use_zero_pages=use_zero_pages))
    world: World = {"a": [Z, Z, pg(1)], "b": [Z]}
    feed_world(e, world)
    c = feed_world(e, world)
    if use_zero_pages:
        assert (c.ksm_zero_pages, c.pages_shared, c.pages_sharing) == (3, 0, 0)
        assert c.pages_volatile == 3            # rmap items live until the next scan
        c = feed_world(e, world)
        assert (c.ksm_zero_pages, c.pages_volatile, c.pages_unshared) == (3, 0, 1)
        c = feed_world(e, {"a": [pg(5), Z, pg(1)], "b": [Z]})   # CoW from the zero page
        assert (c.ksm_zero_pages, c.pages_volatile) == (2, 1)
        assert e.per_source()["a"].zero_pages == 1
    else:
        assert (c.ksm_zero_pages, c.pages_shared, c.pages_sharing) == (0, 1, 2)


def test_generation_change_drops_region_and_holes_leave() -> None:
    e = KsmEngine()
    world: World = {"a": [pg(1), pg(2)], "b": [pg(1), pg(2)]}
    feed_world(e, world)
    c = feed_world(e, world)
    assert (c.pages_shared, c.pages_sharing) == (2, 2)
    c = feed_world(e, world, gens={"b": "pid2"})
    assert (c.pages_shared, c.pages_sharing, c.pages_volatile) == (2, 0, 2)
    c = feed_world(e, {"a": [pg(1), None]}, gens={"b": "pid2"})
    assert (c.pages_shared, c.pages_sharing, c.pages_volatile) == (1, 0, 0)
    assert set(e.per_source()) == {"a"}


def test_fair_share_and_shares_with() -> None:
    e = KsmEngine()
    world: World = {"a": [pg(1), pg(1), pg(2)], "b": [pg(1), pg(2)], "c": [pg(3), pg(2)]}
    feed_world(e, world)
    c = feed_world(e, world)
    per = e.per_source()
    # pg(1) mapped 3 times (a, a, b), pg(2) 3 times (a, b, c): each mapping saves 2/3
    assert sum((s.saved for s in per.values()), Fraction(0)) == c.pages_sharing == 4
    assert (per["a"].saved, per["b"].saved, per["c"].saved) == \
        (Fraction(2), Fraction(4, 3), Fraction(2, 3))
    assert e.shares_with() == {"a": {"b": 3, "c": 1}, "b": {"a": 2, "c": 1},
                               "c": {"a": 1, "b": 1}}


def test_forced_collisions_never_merge_different_pages() -> None:
    e = KsmEngine(EngineConfig(max_page_sharing=3), hasher=lambda _: 42)
    ref = ReferenceKsm(max_page_sharing=3, hasher=lambda _: 42)
    world: World = {"a": [pg(1), pg(2), pg(1), Z], "b": [pg(2), pg(3), pg(1), Z]}
    for _ in range(3):
        c = feed_world(e, world)
        assert as_dict(c) == ref_scan(ref, world)
    assert (c.pages_shared, c.pages_sharing) == (3, 4)   # pg1 x3, pg2 x2, zero x2
    # every node's pages are byte-identical
    contents: dict[int, set[bytes]] = {}
    for rs in e._order:
        for i, nd in enumerate(rs.node.tolist()):
            if nd >= 0:
                contents.setdefault(nd, set()).add(world[rs.source][i] or b"")
    assert all(len(v) == 1 for v in contents.values())


def test_usage_errors() -> None:
    e = KsmEngine()
    with pytest.raises(UsageError):
        e.feed(PageRun("a", "ram", 0, memoryview(Z)))
    e.begin_scan({"a": [Region("ram", 2 * PAGE_SIZE)]})
    with pytest.raises(UsageError):
        e.begin_scan({})
    with pytest.raises(UsageError):
        e.feed(PageRun("a", "ram", 1, memoryview(Z + Z)))
    with pytest.raises(UsageError):
        e.feed(PageRun("b", "ram", 0, memoryview(Z)))
    e.feed(PageRun("a", "ram", 0, memoryview(Z)))
    with pytest.raises(UsageError):
        e.feed(PageRun("a", "ram", 0, memoryview(Z)))
    e.end_scan()
    with pytest.raises(UsageError):
        EngineConfig(max_page_sharing=1)


def test_converge_stops_when_counters_settle() -> None:
    e = KsmEngine()
    world: World = {"a": [pg(1), Z], "b": [pg(1), pg(4)]}
    n = e.converge(lambda eng: feed_world(eng, world), max_scans=10)
    # scan 2 merges and leaves no volatile page: settled, no confirmation scan
    assert n == 2 and e.counters().full_scans == 2 and e.settled
    state = e.counters().merge_state()
    feed_world(e, world)
    assert e.counters().merge_state() == state


def test_settled_needs_no_volatile_page_and_no_leave() -> None:
    e = KsmEngine(EngineConfig(max_page_sharing=2))
    y = pg(9)

    def scan(pages: list[bytes | None]) -> tuple[bool, KsmCounters]:
        """One scan of source a: then whether the engine is settled, its counters."""
        counters = feed_world(e, {"a": pages})
        return e.settled, counters

    settled, _ = scan([pg(1), y, pg(1)])
    assert not settled                         # everything is new: volatile
    settled, c = scan([pg(1), y, pg(1)])
    assert settled and c.pages_sharing == 1
    settled, _ = scan([pg(1), pg(1), pg(1)])
    assert not settled                         # page 1 changed: volatile
    settled, c = scan([pg(1), pg(1), pg(1)])
    assert settled and c.pages_unshared == 1   # the node is full
    # page 2 leaves its node after page 1 was found no room: page 1 joins next scan
    settled, c5 = scan([pg(1), pg(1), None])
    assert not settled and c5.pages_unshared == 1
    settled, c6 = scan([pg(1), pg(1), None])
    assert c6.merge_state() != c5.merge_state() and c6.pages_unshared == 0
    assert settled


@pytest.mark.parametrize("use_zero_pages", [False, True])
def test_settled_waits_for_zero_mapping(use_zero_pages: bool) -> None:
    e = KsmEngine(EngineConfig(use_zero_pages=use_zero_pages))
    world: World = {"a": [Z, pg(1), pg(2)]}
    feed_world(e, world)
    feed_world(e, world)
    # with use_zero_pages the zero page's rmap item lives until the next scan
    assert e.settled is not use_zero_pages


def test_counter_names_are_the_kernels() -> None:
    assert {f.name for f in fields(KsmCounters)} <= set(COUNTER_MEANINGS)


def test_engine_imports_no_adapters() -> None:
    root = Path(__file__).resolve().parent.parent / "vmshare" / "engine"
    banned = ("vmshare.ksm", "vmshare.hypervisor", "vmshare.sources", "vmshare.cli.main",
              "vmshare.daemon.service", "os", "subprocess", "socket", "libvirt", "mmap")
    for f in root.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(banned), f"{f.name} imports {name}"


# -- property tests against the reference ------------------------------------------------

ALPHABET = [Z, pg(1), pg(2), pg(3)]


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, bool, list[tuple[World, dict[str, str]]]]:
    mps = draw(st.integers(2, 4))
    uzp = draw(st.booleans())
    nsrc = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 7)) for _ in range(nsrc)]
    page = st.one_of(st.sampled_from(ALPHABET), st.none())
    world: World = {f"vm{s}": [draw(page) for _ in range(n)] for s, n in enumerate(sizes)}
    gens = {s: "0" for s in world}
    out = []
    for _ in range(draw(st.integers(2, 6))):
        out.append(({s: list(p) for s, p in world.items()}, dict(gens)))
        for s, pages in world.items():
            for i in range(len(pages)):
                if draw(st.integers(0, 9)) == 0:
                    pages[i] = draw(page)
            if draw(st.integers(0, 14)) == 0:
                gens[s] += "'"
    return mps, uzp, out


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_engine_matches_reference(h: tuple[int, bool, list[tuple[World, dict[str, str]]]],
                                  rnd: random.Random) -> None:
    mps, uzp, scans = h
    e = KsmEngine(EngineConfig(max_page_sharing=mps, use_zero_pages=uzp))
    ref = ReferenceKsm(max_page_sharing=mps, use_zero_pages=uzp, hasher=xxh)
    for world, gens in scans:
        c = feed_world(e, world, gens, shuffle=rnd)
        assert as_dict(c) == ref_scan(ref, world, gens)
        per = e.per_source()
        assert sum((s.saved for s in per.values()), Fraction(0)) == c.pages_sharing
        ref_saved = ref.saved()
        assert {s: v.saved for s, v in per.items() if v.saved} == \
            {s: v for s, v in ref_saved.items() if v}
        assert {a: row for a, row in e.shares_with().items() if row} == ref.shares_with()


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.sampled_from([2, 3, 5, 1 << 14]))
def test_pages_read_again_give_the_retained_answer(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], rnd: random.Random,
        batch: int) -> None:
    """Runs fed without retaining them, their pages fetched in batches (tiny ones:
    groups split across fetches, a group bigger than a batch in slices): the
    same counters and savings as the reference."""
    mps, uzp, scans = h
    e = KsmEngine(EngineConfig(max_page_sharing=mps, use_zero_pages=uzp))
    ref = ReferenceKsm(max_page_sharing=mps, use_zero_pages=uzp, hasher=xxh)
    with patch.object(state, "FETCH_PAGES", batch):
        for world, gens in scans:
            c = feed_world(e, world, gens, shuffle=rnd, fetched=world)
            assert as_dict(c) == ref_scan(ref, world, gens)
            assert {s: v.saved for s, v in e.per_source().items() if v.saved} == \
                {s: v for s, v in ref.saved().items() if v}


def test_a_page_written_between_feed_and_fetch_merges_by_its_new_bytes() -> None:
    """ksmd compares a page as it is when it gets there: the engine, reading a
    page again, compares those bytes, never the checksum it fed."""
    e = KsmEngine()
    world: World = {"a": [pg(1), pg(1)], "b": [pg(1), pg(2)]}
    feed_world(e, world, fetched=world)
    later: World = {"a": [pg(1), pg(5)], "b": [pg(1), pg(2)]}     # a[1] written
    c = feed_world(e, world, fetched=later)
    assert (c.pages_shared, c.pages_sharing) == (1, 1)              # a[0] and b[0] only
    assert e.per_source()["a"].ksm_pages == 1


def test_unretained_pages_need_a_fetch() -> None:
    e = KsmEngine()
    e.begin_scan({"a": [Region("ram", PAGE_SIZE)]})
    e.feed(PageRun("a", "ram", 0, memoryview(bytearray(pg(1)))), retain=False)
    with pytest.raises(UsageError, match="1 pages were fed without retain"):
        e.end_scan()
    v = KsmEngine(verify_merged=True)
    v.begin_scan({"a": [Region("ram", PAGE_SIZE)]})
    with pytest.raises(UsageError, match="verify mode"):
        v.feed(PageRun("a", "ram", 0, memoryview(bytearray(pg(1)))), retain=False)


@settings(max_examples=300, deadline=None)
@given(histories(), st.booleans())
def test_settled_scan_is_a_fixed_point(h: tuple[int, bool, list[tuple[World, dict[str, str]]]],
                                       verify: bool) -> None:
    mps, uzp, scans = h
    e = KsmEngine(EngineConfig(max_page_sharing=mps, use_zero_pages=uzp), verify_merged=verify)
    ref = ReferenceKsm(max_page_sharing=mps, use_zero_pages=uzp, hasher=xxh)
    for world, gens in scans:
        c = feed_world(e, world, gens)
        assert as_dict(c) == ref_scan(ref, world, gens)
        if e.settled:                  # the same content once more changes nothing
            again = feed_world(e, world, gens)
            assert as_dict(again) == ref_scan(ref, world, gens)
            assert again.merge_state() == c.merge_state() and e.settled


# -- fast path (checksum retention) against verify-everything ----------------------------

@pytest.mark.parametrize("verify_merged", [False, True])
def test_forced_collisions_in_both_modes(verify_merged: bool) -> None:
    e = KsmEngine(EngineConfig(max_page_sharing=3), hasher=lambda _: 42,
                  verify_merged=verify_merged)
    ref = ReferenceKsm(max_page_sharing=3, hasher=lambda _: 42)
    world: World = {"a": [pg(1), pg(2), pg(1), Z], "b": [pg(2), pg(3), pg(1), Z]}
    for _ in range(3):
        assert as_dict(feed_world(e, world)) == ref_scan(ref, world)
    for rs in e._order:
        for nd in rs.node.tolist():
            if nd >= 0:
                same = [world[r.source][j] for r in e._order
                        for j, m in enumerate(r.node.tolist()) if m == nd]
                assert len(set(same)) == 1


def test_collision_on_rewrite_breaks_out_in_verify_mode() -> None:
    # a merged page rewritten with other bytes of the same checksum must leave its node
    e = KsmEngine(hasher=lambda _: 7)
    ref = ReferenceKsm(hasher=lambda _: 7)
    w1: World = {"a": [pg(1)], "b": [pg(1)], "c": [pg(2)]}
    w2: World = {"a": [pg(1)], "b": [pg(3)], "c": [pg(2)]}
    for w in (w1, w1, w2, w2):
        assert as_dict(feed_world(e, w)) == ref_scan(ref, w)


def test_tampered_fingerprint_blocks_new_joins() -> None:
    # fast mode: a node whose kept page no longer matches its fingerprint takes no page
    e = KsmEngine()
    w: World = {"a": [pg(1)], "b": [pg(1)], "c": [pg(5)]}
    feed_world(e, w)
    feed_world(e, w)
    e.nodes.fp[:] ^= 1
    w2: World = {"a": [pg(1)], "b": [pg(1)], "c": [pg(1)]}
    feed_world(e, w2)
    c = feed_world(e, w2)
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (1, 1, 1)


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_fast_path_matches_verify_everything(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], rnd: random.Random) -> None:
    mps, uzp, scans = h
    cfg = EngineConfig(max_page_sharing=mps, use_zero_pages=uzp)
    fast, slow = KsmEngine(cfg), KsmEngine(cfg, verify_merged=True)
    for world, gens in scans:
        assert feed_world(fast, world, gens, shuffle=rnd) == \
            feed_world(slow, world, gens, shuffle=rnd)
        assert fast.per_source() == slow.per_source()
        assert fast.shares_with() == slow.shares_with()


def test_large_groups_fill_dups_in_closed_form() -> None:
    e = KsmEngine(EngineConfig(max_page_sharing=4))
    ref = ReferenceKsm(max_page_sharing=4, hasher=xxh)
    world: World = {"a": [*[pg(1)] * 9, *[pg(2)] * 5, *[Z] * 2], "b": [*[pg(2)] * 3, pg(9)]}
    for _ in range(3):
        assert as_dict(feed_world(e, world)) == ref_scan(ref, world)
    world["a"][3] = pg(4)
    world["b"] += [pg(1)] * 4
    for _ in range(3):
        assert as_dict(feed_world(e, world, gens={"b": "1"})) == \
            ref_scan(ref, world, gens={"b": "1"})


def test_distinct_is_the_sorted_distinct_values() -> None:
    """state.distinct, np.unique's answer without importing numpy.ma."""
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 7, 1000):
        a = rng.integers(0, 50, n)
        assert np.array_equal(state.distinct(a), np.unique(a))
