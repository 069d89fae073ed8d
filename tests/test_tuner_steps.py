"""The tuner's named steps on their own (vmshare.tuner.reading and decide):
the convergence test, churn, the cooldown, the budget plan and the idle step.
The closed-loop behaviour of ``decide`` is in tests/test_tuner.py."""

from __future__ import annotations

import dataclasses

import pytest

from vmshare.config import TunerPolicy
from vmshare.tuner.decide import (
    MODE_IDLE,
    MODE_MERGE,
    TunerState,
    churn_cooldown,
    plan_knobs,
    while_idle,
)
from vmshare.tuner.reading import Observation, ScanCost, convergence, last_scan, read_scans

GIB = 2**30


def obs(t: float, full_scans: int, sharing: int, *, unshared: int = 1000, volatile: int = 0,
        available: int = 20 * GIB, pages_to_scan: int = 1000) -> Observation:
    return Observation(time=t, pages_scanned=full_scans * 100_000, full_scans=full_scans,
                       pages_shared=sharing // 4, pages_sharing=sharing,
                       pages_unshared=unshared, pages_volatile=volatile,
                       general_profit=sharing * 4096, ksmd_cpu_seconds=t / 10,
                       mem_available=available, mem_total=24 * GIB, run=1,
                       pages_to_scan=pages_to_scan, sleep_millisecs=20)


def history(*sharing: int) -> tuple[Observation, ...]:
    """One observation per full scan, pages_sharing as given."""
    return tuple(obs(10.0 * i, i, s) for i, s in enumerate(sharing))


def test_convergence_needs_enough_scans_then_a_flat_window() -> None:
    policy = TunerPolicy(converge_scans=1, epoch_min_scans=3)
    h = history(0, 5000)
    assert convergence(h, h[-1], h[0], 64, policy) == (False, None, False)   # nothing to judge
    h = history(0, 5000, 9000, 9000)
    judged, gain, converged = convergence(h, h[-1], h[0], 64, policy)
    assert judged and gain == 2000.0 and not converged      # the window still rose by 4000
    h = history(0, 5000, 9000, 9000, 9000)
    exactly = TunerPolicy(converge_scans=1, epoch_min_scans=4)   # 4 full scans in the epoch
    judged, gain, converged = convergence(h, h[-1], h[0], 64, exactly)
    assert judged and gain == 0.0 and converged
    short = TunerPolicy(converge_scans=1, epoch_min_scans=5)    # flat, but too few scans
    assert convergence(h, h[-1], h[0], 64, short)[2] is False


def test_last_scan_measures_churn_and_new_merges() -> None:
    h = (obs(0, 0, 0), obs(10, 1, 1000, unshared=5000, volatile=100),
         obs(20, 2, 1050, unshared=2000, volatile=600))
    churn_pages, new_merges, gain = last_scan(h, h[-1], h[0], 64)
    assert churn_pages == 3000 + 500 and not new_merges and gain == 50.0
    churn_pages, new_merges, gain = last_scan(h, h[-1], h[0], 10)
    assert new_merges


def test_reading_flags_churn_past_its_share_of_the_scan_set() -> None:
    policy = TunerPolicy(churn_fraction=0.05)
    quiet = (obs(0, 0, 0), obs(10, 1, 1000, unshared=50_000),
             obs(20, 2, 1000, unshared=50_500))
    busy = (*quiet[:2], obs(20, 2, 1000, unshared=60_000))
    assert read_scans(quiet, quiet[-1], quiet[0], False, policy).churn is False
    r = read_scans(busy, busy[-1], busy[0], False, policy)
    assert r.churn and r.churn_pages == 10_000


def test_churn_cooldown_doubles_after_fruitless_bursts_up_to_its_cap() -> None:
    policy = TunerPolicy(churn_cooldown_seconds=60, churn_cooldown_max_seconds=200)
    state = TunerState(churn_epoch=True)
    waits = []
    for _ in range(4):
        state = dataclasses.replace(state, churn_cooldown=churn_cooldown(state, False, policy))
        waits.append(state.churn_cooldown)
    assert waits == [60, 120, 200, 200]
    assert churn_cooldown(state, True, policy) == 0.0      # a burst that merged: follow again
    assert churn_cooldown(dataclasses.replace(state, churn_epoch=False), False, policy) == 200


def test_plan_knobs_holds_the_budget_and_backs_off_when_over() -> None:
    policy = TunerPolicy(cpu_budget_pct=25)
    cost = ScanCost(cpu_pct=10.0, ns_per_page=1000.0, costs=(1000.0,), planned_ns=1000.0)
    pages, sleep_ms, tail = plan_knobs(MODE_MERGE, "moderate", 100_000, cost, obs(0, 0, 0),
                                       policy)
    busy = pages * 1000e-9
    assert sleep_ms == 20 and busy / (busy + 0.020) == pytest.approx(0.25, rel=0.01)
    assert tail == ""
    hot = dataclasses.replace(cost, cpu_pct=50.0)
    current = obs(0, 0, 0, pages_to_scan=4000)
    pages, _, tail = plan_knobs(MODE_MERGE, "moderate", 100_000, hot, current, policy)
    assert pages == int(4000 * 25 / 50 * 0.9) and "backing off to 1,800 pages" in tail
    flat_out = TunerPolicy(cpu_budget_pct=100)
    assert plan_knobs(MODE_MERGE, "moderate", 1, cost, current, flat_out)[:2] == \
        (flat_out.max_pages_to_scan, 0)


def test_idle_step_stays_stopped_until_a_reason_to_resume() -> None:
    policy = TunerPolicy(probe_seconds=600, resume_drop_fraction=0.05)
    stopped = obs(100, 5, 9000)
    state = TunerState(mode=MODE_IDLE, epoch=stopped, idle_since=100.0,
                       idle_available=stopped.mem_available)
    h = (stopped,)

    def step(o: Observation, reset: bool = False) -> tuple[str, TunerState, str]:
        r = read_scans((*h, o), o, stopped, reset, policy)
        turn = while_idle(state, o, r, policy)
        return turn.mode, turn.state, turn.why

    mode, same, why = step(obs(200, 5, 9000))
    assert mode == MODE_IDLE and same is state and why.startswith("stopped:")
    for o, reset, cause in [(obs(200, 5, 9000, available=int(2 * GIB)), False, "no longer"),
                            (obs(200, 5, 9000, available=18 * GIB), False, "fell by"),
                            (obs(800, 5, 9000), False, "probing"),
                            (obs(200, 0, 0), True, "went back")]:
        mode, nxt, why = step(o, reset)
        assert mode == MODE_MERGE and cause in why
        assert nxt.epoch is o and nxt.idle_since is None and nxt.idle_available is None
