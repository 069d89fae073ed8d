"""Pages compared while they are fed (``begin_scan(store_pages=N)``,
vmshare.engine.feedcheck): the reference's counters whatever the store's size
and however checksums collide, and a page's bytes as fed, as ksmd compares a
page when its cursor reaches it; a representative written after it was copied
sends its group the way of pages read again."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Iterator
from unittest.mock import patch

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dump_corpus import mapping_process
from tests.engine_reference import ReferenceKsm
from tests.test_engine import World, as_dict, feed_world, histories, pg, ref_scan, xxh
from tests.test_engine_incremental import CHILD, rewrite
from vmshare.engine import EngineConfig, KsmEngine, merge
from vmshare.errors import UsageError
from vmshare.model import PAGE_SIZE, PageRun, Region, Vma
from vmshare.prediction.scanning import source_fetch
from vmshare.sources.live import LiveProcessSource


def collide(b: bytes | memoryview) -> int:
    """A checksum with many collisions (zero's included): 3 values in all."""
    return xxh(b) % 3


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.sampled_from([1, 2, 64]))
def test_a_store_of_any_size_gives_the_reference_counters(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], rnd: random.Random,
        store: int) -> None:
    """Runs fed unretained in any order, compared against a store of 1, 2 or 64
    pages (groups beyond it read again): every scan's counters and savings
    are the reference's."""
    mps, uzp, scans = h
    e = KsmEngine(EngineConfig(max_page_sharing=mps, use_zero_pages=uzp))
    ref = ReferenceKsm(max_page_sharing=mps, use_zero_pages=uzp, hasher=xxh)
    for world, gens in scans:
        c = feed_world(e, world, gens, shuffle=rnd, fetched=world, store=store)
        assert as_dict(c) == ref_scan(ref, world, gens)
        assert {s: v.saved for s, v in e.per_source().items() if v.saved} == \
            {s: v for s, v in ref.saved().items() if v}
        assert {a: row for a, row in e.shares_with().items() if row} == ref.shares_with()


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.sampled_from([0, 2]))
def test_arrivals_in_many_checksum_buckets_give_the_reference_counters(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], rnd: random.Random,
        store: int) -> None:
    """Buckets of one arrival at least (nearly a bucket an arrival, each one's
    number kept in its flags) and no scratch flag left after a scan: the
    reference's counters and savings."""
    mps, uzp, scans = h
    e = KsmEngine(EngineConfig(max_page_sharing=mps, use_zero_pages=uzp))
    ref = ReferenceKsm(max_page_sharing=mps, use_zero_pages=uzp, hasher=xxh)
    with patch.object(merge, "_BUCKET", 1):
        for world, gens in scans:
            c = feed_world(e, world, gens, shuffle=rnd, fetched=world, store=store)
            assert as_dict(c) == ref_scan(ref, world, gens)
            assert {s: v.saved for s, v in e.per_source().items() if v.saved} == \
                {s: v for s, v in ref.saved().items() if v}
            assert not any((rs.flags & merge.ARRIVAL).any() for rs in e._order)


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.sampled_from([1, 2, 64]))
def test_forced_collisions_with_a_store_give_the_read_again_counters(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], rnd: random.Random,
        store: int) -> None:
    """A checksum of three values (different pages, the zero page's included,
    collide all the time): the store's answers are exactly those of reading
    every compared page again (no store), page for page."""
    mps, uzp, scans = h
    cfg = EngineConfig(max_page_sharing=mps, use_zero_pages=uzp)
    e = KsmEngine(cfg, collide, verify_merged=False)
    plain = KsmEngine(cfg, collide, verify_merged=False)
    for world, gens in scans:
        c = feed_world(e, world, gens, shuffle=rnd, fetched=world, store=store)
        assert c == feed_world(plain, world, gens, fetched=world)
        assert mappings(e) == mappings(plain)


@settings(max_examples=200, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.sampled_from([0, 1, 64]),
       st.booleans())
def test_runs_handed_over_hashed_give_the_answers_of_runs_fed_whole(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], rnd: random.Random,
        store: int, forced: bool) -> None:
    """Runs as the streaming scan's readers hand them over (hashed and zero
    checked in the reader, checksums alone in a first scan), with xxh3 or a
    checksum of three values (the zero page's colliding with others): the
    counters and mappings of the same runs fed whole."""
    mps, uzp, scans = h
    cfg = EngineConfig(max_page_sharing=mps, use_zero_pages=uzp)
    hasher = collide if forced else xxh
    e = KsmEngine(cfg, hasher, verify_merged=False)
    whole = KsmEngine(cfg, hasher, verify_merged=False)
    for world, gens in scans:
        c = feed_world(e, world, gens, shuffle=rnd, fetched=world, store=store, prehashed=True)
        assert c == feed_world(whole, world, gens, fetched=world, store=store)
        assert mappings(e) == mappings(whole)


def test_a_page_with_the_zero_pages_checksum_handed_over_hashed_stays_apart() -> None:
    """A non-zero page whose (forced) checksum is the zero page's, handed over
    hashed: the reader's zero check fails for its run, the engine compares it
    itself, and it never joins the zero pages' node."""
    z = bytes(PAGE_SIZE)
    k = next(i for i in range(1, 50) if collide(pg(i)) == collide(z))
    world: World = {"a": [pg(k), pg(k), z, z]}
    e = KsmEngine(EngineConfig(), collide, verify_merged=False)
    for _ in range(3):
        c = feed_world(e, world, fetched=world, store=8, prehashed=True)
    assert mappings(e) == [[0, 0, 1, 1]]
    assert (c.pages_shared, c.pages_sharing) == (2, 2)


@settings(max_examples=200, deadline=None)
@given(histories(), st.booleans())
def test_runs_with_holes_masked_give_the_answers_of_runs_cut_at_them(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], prehashed: bool) -> None:
    """Each region fed as one run over all its pages, its holes marked in a
    ``present`` mask (their bytes garbage; checksums alone in a first scan
    when ``prehashed``): the counters and mappings of the runs cut at the
    holes."""
    mps, uzp, scans = h
    cfg = EngineConfig(max_page_sharing=mps, use_zero_pages=uzp)
    e, cut = KsmEngine(cfg), KsmEngine(cfg)
    for world, gens in scans:
        e.begin_scan({s: [Region("ram", len(p) * PAGE_SIZE, gens.get(s, ""))]
                      for s, p in world.items()}, store_pages=2)
        for s, pages in world.items():
            data = memoryview(b"".join(p if p is not None else b"\x5a" * PAGE_SIZE
                                       for p in pages))
            present = np.array([p is not None for p in pages], dtype=np.bool_)
            hs = e.checksums(data)
            if prehashed and not e.needs_bytes:
                e.feed_checksums(s, "ram", 0, hs, present)
            elif prehashed:
                e.feed(PageRun(s, "ram", 0, data), retain=False, checksums=hs,
                       zeros_checked=e.zeros_hold(data, hs), present=present)
            else:
                e.feed(PageRun(s, "ram", 0, data), retain=False, present=present)
        c = e.end_scan(fetch_from(world))
        assert c.counters == feed_world(cut, world, gens, fetched=world, store=2)
        assert mappings(e) == mappings(cut)


def fetch_from(world: World) -> Callable[[npt.NDArray[np.int64]], memoryview]:
    """end_scan's fetch: the pages at global positions, from ``world``."""
    flat = [p for pages in world.values() for p in pages]

    def fetch(pos: npt.NDArray[np.int64]) -> memoryview:
        return memoryview(b"".join(flat[q] or b"" for q in pos.tolist()))
    return fetch


def test_a_mask_of_another_size_or_with_retain_is_refused() -> None:
    e = KsmEngine()
    data = memoryview(pg(1) + pg(2))
    e.begin_scan({"a": [Region("ram", 2 * PAGE_SIZE)]})
    with pytest.raises(UsageError, match="present mask of 3 for a run of 2 pages"):
        e.feed(PageRun("a", "ram", 0, data), retain=False, present=np.ones(3, np.bool_))
    with pytest.raises(UsageError, match="retain=False"):
        e.feed(PageRun("a", "ram", 0, data), present=np.ones(2, np.bool_))


def test_checksums_alone_only_while_the_bytes_are_not_needed() -> None:
    """A first scan takes checksums alone; a later one refuses them (its
    arrivals are compared as fed), and checksums of the wrong size are
    refused naming the run."""
    e = KsmEngine()
    data = memoryview(pg(1) + pg(1) + pg(2))
    e.begin_scan({"a": [Region("ram", 3 * PAGE_SIZE)]}, store_pages=8)
    first_needs_bytes = e.needs_bytes    # not narrowed on e: the next scan's differs
    assert not first_needs_bytes
    e.feed_checksums("a", "ram", 0, e.checksums(data))
    e.end_scan(lambda pos: memoryview(b""))
    e.begin_scan({"a": [Region("ram", 3 * PAGE_SIZE)]}, store_pages=8)
    assert e.needs_bytes
    with pytest.raises(UsageError, match="give their bytes"):
        e.feed_checksums("a", "ram", 0, e.checksums(data))
    with pytest.raises(UsageError, match="2 checksums for a run of 3 pages"):
        e.feed(PageRun("a", "ram", 0, data), retain=False, checksums=e.checksums(data)[:2])
    e.feed(PageRun("a", "ram", 0, data), retain=False, checksums=e.checksums(data))
    assert e.end_scan(lambda pos: memoryview(b"".join(
        bytes(data[q * PAGE_SIZE:(q + 1) * PAGE_SIZE]) for q in pos.tolist()))
    ).counters.pages_sharing == 1


@settings(max_examples=100, deadline=None)
@given(histories(), st.sampled_from([1, 64]))
def test_a_store_in_verify_mode_gives_the_plain_verify_answers(
        h: tuple[int, bool, list[tuple[World, dict[str, str]]]], store: int) -> None:
    """Verify mode (runs retained, merged pages checked every scan) with forced
    collisions: the same counters and mappings with a store as without."""
    mps, uzp, scans = h
    cfg = EngineConfig(max_page_sharing=mps, use_zero_pages=uzp)
    e, plain = KsmEngine(cfg, collide), KsmEngine(cfg, collide)
    for world, gens in scans:
        assert feed_world(e, world, gens, store=store) == feed_world(plain, world, gens)
        assert mappings(e) == mappings(plain)


def mappings(e: KsmEngine) -> list[list[int]]:
    """Which pages share a stable node, node ids renumbered by first use (ids
    of different contents may be made in another order)."""
    seen: dict[int, int] = {}
    return [[seen.setdefault(n, len(seen)) if n >= 0 else -1 for n in rs.node.tolist()]
            for rs in e._order]


def two_scans(later: World, store: int = 8) -> KsmEngine:
    """Scan 1 of a world holding pg(1) four times, then scan 2 with the pages
    read again from ``later`` (written between feed and end_scan)."""
    e = KsmEngine()
    world: World = {"a": [pg(1), pg(1), pg(2)], "b": [pg(1), pg(1)]}
    feed_world(e, world, fetched=world, store=store)
    feed_world(e, world, fetched=later, store=store)
    return e


def test_a_member_is_compared_by_its_bytes_as_fed() -> None:
    """a[1] equalled the copy of a[0] when fed; written afterwards it is not
    read again: merged (as ksmd merged it when its cursor passed), and it
    leaves its node at the next scan, its checksum changed."""
    later: World = {"a": [pg(1), pg(5), pg(2)], "b": [pg(1), pg(1)]}
    e = two_scans(later)
    c = e.counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 3)
    c = feed_world(e, later, fetched=later, store=8)
    assert (c.pages_shared, c.pages_sharing, c.pages_volatile) == (1, 2, 1)


def test_a_representative_written_after_its_copy_sends_its_group_to_be_read_again() -> None:
    """a[0] (the copy the others were compared with) is written before end_scan:
    its group is read again and compared then, a[0] by its new bytes."""
    later: World = {"a": [pg(5), pg(1), pg(2)], "b": [pg(1), pg(1)]}
    c = two_scans(later).counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 2)


def test_without_a_store_every_page_is_compared_when_read_again() -> None:
    later: World = {"a": [pg(1), pg(5), pg(2)], "b": [pg(1), pg(1)]}
    c = two_scans(later, store=0).counters()
    assert (c.pages_shared, c.pages_sharing) == (1, 2)


@pytest.fixture
def writer() -> Iterator[tuple[subprocess.Popen[str], int]]:
    with mapping_process(CHILD) as pa:
        yield pa


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
@pytest.mark.parametrize(("page", "merged"), [(0, 6), (3, 7)])
def test_a_live_page_written_after_it_was_fed(
        writer: tuple[subprocess.Popen[str], int], page: int, merged: int) -> None:
    """A real process rewrites a page of pages 0-7 (identical) after scan 2 fed
    them (16-KiB runs, a store): page 0, the representative, is read again and
    compared by its new bytes (six merge with page 1); page 3 was compared
    with the copy when fed and merges (seven), as ksmd's cursor had passed it."""
    proc, addr = writer
    vma = Vma(addr, addr + 16 * PAGE_SIZE, "rw-p", 0, "")
    engine = KsmEngine()
    for scan_no in range(2):
        with LiveProcessSource(proc.pid, [vma], "p") as src:
            engine.begin_scan({"p": src.regions()}, store_pages=8)
            for run in src.runs(4):
                engine.feed(run, retain=False)
            if scan_no == 1:
                rewrite(proc, page, 0xBAD)
            c = engine.end_scan(source_fetch([src], {("p", src.regions()[0].key): 0}))
    assert (c.counters.pages_shared, c.counters.pages_sharing) == (1, merged)
