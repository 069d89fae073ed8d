"""predict --estimate: the sampled estimate against the exact engine.

Coverage: over 1,000 trials (1,000 different keys, so 1,000 independent
samples of the same memory) the exact figure must lie inside the 95% interval
at least 935 times. If the interval truly covers 95%, the number of misses is
Binomial(1000, 0.05): mean 50, and P(misses > 65) = 0.015, so the bound is
passed with 98.5% probability by a correct interval; an interval that covers
only 90% (100 misses expected) passes it with probability 0.00006, one that
covers 93% with 0.29. The keys are seeded, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.sketch_mixes import (
    adversarial_mix,
    content_ids,
    exact_sharing,
    generated_target,
    grouped_pages,
    guest_mix,
    write_vms,
)
from vmshare.engine import EngineConfig
from vmshare.engine._pages import id_values
from vmshare.engine.sampled import horvitz_thompson, sharing
from vmshare.errors import UsageError
from vmshare.prediction.estimate import estimate, estimate_sketch
from vmshare.prediction.predict import dump_target, predict
from vmshare.prediction.sketch import sketch_targets
from vmshare.prediction.targets import Target
from vmshare.records.sketchfile import DECISION_MASK, SketchKey

TRIALS = 1000
#: hits needed in TRIALS (see the module docstring)
BOUND = 935
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
    assert hits >= BOUND, f"covered {hits}/{TRIALS}"
    assert vm_hits >= BOUND, f"per-VM covered {vm_hits}/{TRIALS}"
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
    assert hits < BOUND / TRIALS * 60


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


@pytest.fixture(scope="module")
def adversarial(tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[list[Target], int]:
    tmp = tmp_path_factory.mktemp("adversarial")
    groups, ids = adversarial_mix(np.random.default_rng(12), 3)
    targets = []
    for n, (g, i) in enumerate(zip(groups, ids, strict=True)):
        path = tmp / f"vm{n}.raw"
        path.write_bytes(grouped_pages(g, i))
        targets.append(dump_target(str(path), raw=True))
    want, _ = exact_sharing(ids)
    return targets, want


def test_contents_sharing_a_fingerprint_keep_the_coverage(
        adversarial: tuple[list[Target], int]) -> None:
    """Distinct contents that share their fingerprint lines are sampled together:
    the variance over groups keeps the coverage; the variance as if each content
    were sampled on its own does not (this mix is built so it cannot)."""
    targets, want = adversarial
    hits = naive_hits = 0
    for i in range(TRIALS):
        sk = sketch_targets(targets, seeded_key(i), host="", rate=1 / 16)
        total = estimate_sketch(sk, EngineConfig(), by_group=False).total()
        hits += total.low <= want <= total.high
        alone = replace(sk, vms=tuple(replace(v, groups=None) for v in sk.vms))
        naive = estimate_sketch(alone, EngineConfig(), by_group=False).total()
        assert naive.value == total.value
        naive_hits += naive.low <= want <= naive.high
    assert hits >= BOUND, f"covered {hits}/{TRIALS}"
    assert naive_hits < 0.9 * TRIALS, f"naive covered {naive_hits}/{TRIALS}"


def identities(groups: np.ndarray, ids: np.ndarray, key: SketchKey) -> np.ndarray:
    out = np.empty(ids.size, np.uint64)
    id_values(grouped_pages(groups, ids), np.arange(ids.size), key.k0, key.k1, out)
    return out


def test_sparse_pages_and_big_groups_are_read_whole(
        adversarial: tuple[list[Target], int]) -> None:
    """Pages whose fingerprint lines are zero are decided by their whole content
    (each sparse content is a group of its own: its decision value is its
    identity), and the group of 300 contents on about 100 pages per VM is
    counted exactly in each VM, sampled or not."""
    targets, want = adversarial
    groups, ids = (np.concatenate(x) for x in adversarial_mix(np.random.default_rng(12), 3))
    key = seeded_key(0)
    sparse = identities(groups[groups == 0], ids[groups == 0], key)
    big = identities(groups[groups == 5000], ids[groups == 5000], key)
    for rate in (1.0, 1 / 16):
        sk = sketch_targets(targets, key, host="", rate=rate)
        sampled = {(int(d), int(x)) for v in sk.vms
                   for d, x in zip(v.decisions, v.values, strict=True)}
        heavy = {int(x) for v in sk.vms for x in v.heavy_values}
        assert set(big.tolist()) <= heavy
        mine = {(int(x) & DECISION_MASK, int(x)) for x in sparse
                if rate == 1.0 or int(x) & DECISION_MASK < sk.effective}
        assert mine and mine <= sampled
        assert not {x for x in sparse.tolist()} & heavy
    total = estimate_sketch(sketch_targets(targets, key, host="", rate=1.0), EngineConfig(),
                            by_group=False).total()
    assert total.value == want and total.stderr == 0


def test_estimate_rate_defaults_to_the_configs_sketch_rate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without --rate, --estimate samples at [sketch] rate (VMSHARE_CONFIG or
    --config), as `vmshare sketch` and the daemon do; the config is read only
    for --estimate, and a bad one is one error line."""
    from vmshare.cli.main import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    (a,) = write_vms(tmp_path, content_ids(np.random.default_rng(8), [(400, 1), (100, 2)],
                                           zero=10), 1)
    half, bad = tmp_path / "half.toml", tmp_path / "bad.toml"
    half.write_text('[sketch]\nrate = "1/2"\n')
    bad.write_text('[sketch]\nrate = "2"\n')
    monkeypatch.setenv("VMSHARE_CONFIG", str(half))
    code, out, err = run("predict", "--estimate", "--raw", str(a), "--json")
    assert code == 0, err
    assert json.loads(out)["rate"] == 0.5
    code, out, err = run("predict", "--estimate", "--raw", str(a), "--config",
                         str(tmp_path / "none.toml"), "--json")       # named but missing
    assert code != 0 and len(err.splitlines()) == 1 and "does not exist" in err
    monkeypatch.setenv("VMSHARE_CONFIG", str(tmp_path / "absent.toml"))   # the default
    code, out, err = run("predict", "--estimate", "--raw", str(a), "--json")
    assert code == 0 and json.loads(out)["rate"] == 1 / 16, err
    monkeypatch.setenv("VMSHARE_CONFIG", str(bad))
    code, out, err = run("predict", "--estimate", "--raw", str(a), "--json")
    assert code != 0 and len(err.splitlines()) == 1 and "[sketch] rate" in err, err
    assert not out
    code, out, err = run("predict", "--estimate", "--rate", "1/4", "--raw", str(a), "--json")
    assert code == 0 and json.loads(out)["rate"] == 0.25, err          # --rate: not read
    code, out, err = run("predict", "--raw", str(a), "--json", "--scans", "1")
    assert code == 0, err                                              # exact: not read
