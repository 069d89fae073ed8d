"""predict --estimate: the sampled estimate against the exact engine.

Coverage: over 200 trials (200 different keys, so 200 independent samples of
the same memory) the exact figure must lie inside the 95% interval at least
93% of the time. If the interval truly covers 95%, the number of misses is
Binomial(200, 0.05): mean 10, and P(misses > 14) = 0.08, so the bound is
passed with 92% probability by a correct interval; an interval that covers
only 90% (20 misses expected) passes it with probability 0.06. The keys are
seeded, so a run is reproducible.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests.sketch_mixes import (
    content_ids,
    exact_sharing,
    generated_target,
    guest_mix,
    write_vms,
)
from vmshare.engine import EngineConfig
from vmshare.engine.sampled import horvitz_thompson, sharing
from vmshare.errors import UsageError
from vmshare.prediction.estimate import estimate
from vmshare.prediction.predict import dump_target, predict
from vmshare.records.sketchfile import SketchKey

TRIALS = 200
#: a guest-like mix: mostly unique pages, many pairs and small groups, a few
#: contents on many pages, some above max_page_sharing, 5% all-zero pages
MIX = [(9000, 1), (1500, 2), (600, 3), (150, 8), (20, 40), (2, 300)]


def seeded_key(i: int) -> SketchKey:
    return SketchKey.from_secret(hashlib.sha256(b"trial %d" % i).digest())


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[np.ndarray]]:
    tmp = tmp_path_factory.mktemp("mix")
    ids = content_ids(np.random.default_rng(7), MIX, zero=1000)
    paths = write_vms(tmp, ids, 3)
    return [str(p) for p in paths], np.array_split(ids, 3)


def test_the_exact_reference_is_the_engine(vms: tuple[list[str], list[np.ndarray]]) -> None:
    paths, ids = vms
    want, per = exact_sharing(ids)
    result = predict([dump_target(p, raw=True) for p in paths], EngineConfig())
    assert result.totals()["pages_sharing"] == want
    got = {s.name: float(s.saved) for s in result.groups[0].sources}
    for p, w in zip(paths, per, strict=True):
        assert got[p] == pytest.approx(w, rel=0.02)     # chains of 300 split unevenly


def test_interval_covers_the_exact_figure(vms: tuple[list[str], list[np.ndarray]]) -> None:
    paths, ids = vms
    want, per = exact_sharing(ids)
    targets = [dump_target(p, raw=True) for p in paths]
    hits = vm_hits = 0
    widths = []
    for i in range(TRIALS):
        est = estimate(targets, EngineConfig(), rate=1 / 16, key=seeded_key(i))
        total = est.total()
        hits += total.low <= want <= total.high
        widths.append((total.high - total.low) / want)
        vm = est.groups[0].vms[0].saved
        vm_hits += vm.low <= per[0] <= vm.high
    assert hits >= 0.93 * TRIALS, f"covered {hits}/{TRIALS}"
    assert vm_hits >= 0.93 * TRIALS, f"per-VM covered {vm_hits}/{TRIALS}"
    assert 0.0 < float(np.median(widths)) < 0.5          # an interval, not everything


def test_a_too_narrow_interval_would_fail_the_coverage_check(
        vms: tuple[list[str], list[np.ndarray]]) -> None:
    # the check can fail: the same trials with the interval shrunk to a third
    paths, ids = vms
    want, _ = exact_sharing(ids)
    targets = [dump_target(p, raw=True) for p in paths]
    hits = 0
    for i in range(60):
        t = estimate(targets, EngineConfig(), rate=1 / 16, key=seeded_key(i)).total()
        third = (t.high - t.value) / 3
        hits += t.value - third <= want <= t.value + third
    assert hits < 0.93 * 60


def test_full_rate_is_exact_and_zero_pages_follow_use_zero_pages(
        vms: tuple[list[str], list[np.ndarray]]) -> None:
    paths, ids = vms
    targets = [dump_target(p, raw=True) for p in paths]
    want, _ = exact_sharing(ids)
    full = estimate(targets, EngineConfig(), rate=1.0).total()
    assert full.value == want and full.stderr == 0
    zp = estimate(targets, EngineConfig(use_zero_pages=True), rate=1.0).total()
    assert zp.value == want - int(sharing(1000, 256))


def test_estimator_pieces() -> None:
    assert sharing(np.array([0, 1, 2, 256, 257, 600]), 256).tolist() == [0, 0, 1, 255, 255, 597]
    e = horvitz_thompson(np.array([1.0, 3.0]), 0.5, exact=2.0)
    assert e.value == 10.0 and e.exact == 2.0
    assert e.stderr == pytest.approx(((1 - 0.5) / 0.25 * 10) ** 0.5)
    with pytest.raises(UsageError):
        horvitz_thompson(np.array([1.0]), 0.0)
    with pytest.raises(UsageError, match="nothing to predict"):
        estimate([], EngineConfig())


def test_default_rate_is_within_five_percent_on_a_gibibyte() -> None:
    ids = guest_mix(np.random.default_rng(11), 1 << 18)       # 1 GiB of 4 KiB pages
    halves = np.array_split(ids, 2)
    targets = [generated_target(f"vm{i}", h) for i, h in enumerate(halves)]
    want, per = exact_sharing(halves)
    for i in range(3):
        est = estimate(targets, EngineConfig(), key=seeded_key(1000 + i))   # default rate
        total = est.total()
        assert abs(total.value - want) <= 0.05 * want, (total.value, want)
        assert total.high - total.value < 0.05 * want          # the interval says so too
        for vm, w in zip(est.groups[0].vms, per, strict=True):
            assert abs(vm.saved.value - w) <= 0.05 * w
