"""What KSM's own counters say, for the tuner (vmshare.tuner.decide).

From the observations of ksmd the tuner remembers (``remember`` keeps a
bounded history that still spans many slow full scans) this module reads:

* the cost of scanning: ksmd's CPU time over the last interval divided by
  the pages it scanned (``measure_cost``);
* convergence: pages_sharing did not rise over ``converge_scans`` complete
  full scans (the kernel selftest's test, too), after at least
  ``epoch_min_scans`` full scans since the last change of mode, enough for
  content present then to merge (``convergence``);
* churn: pages_unshared/pages_volatile changing by a share of the scanned
  set over the last full scan (``last_scan``);
* memory pressure from MemAvailable/MemTotal.

``read_scans`` gathers these into one ``Reading``. Everything here is pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmshare.config import TunerPolicy


@dataclass(frozen=True)
class Observation:
    """One collection: KSM counters, ksmd's CPU time and host memory at ``time``.

    ``time`` and ``ksmd_cpu_seconds`` are monotonic seconds; counters are the
    kernel's (vmshare.model.COUNTER_MEANINGS); knobs are those in force.
    """

    time: float
    pages_scanned: int
    full_scans: int
    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    general_profit: int
    ksmd_cpu_seconds: float
    mem_available: int
    mem_total: int
    run: int
    pages_to_scan: int
    sleep_millisecs: int


# ---------------------------------------------------------------- history
def remember(history: tuple[Observation, ...], obs: Observation,
             limit: int) -> tuple[Observation, ...]:
    """Append ``obs``, keeping only the first and the last observation of each
    full_scans value, so a bounded history spans many slow full scans."""
    if (len(history) >= 2 and history[-1].full_scans == obs.full_scans
            and history[-2].full_scans == obs.full_scans):
        history = history[:-1]
    return (*history, obs)[-limit:]


def _scan_set(obs: Observation) -> int:
    """Pages one full scan visits, at most: every page KSM tracks (each has an
    rmap_item and is counted as shared, sharing, unshared or volatile)."""
    return max(1, obs.pages_shared + obs.pages_sharing + obs.pages_unshared
               + obs.pages_volatile)


def _last_scan_start(history: tuple[Observation, ...], obs: Observation,
                     epoch: Observation) -> Observation | None:
    """The first observation of this epoch taken during the previous full scan
    (or the epoch's start, if that is later): the window from it to ``obs``
    covers the last full scan. None while no full scan ended in the epoch."""
    for h in history[:-1]:
        if h.time >= epoch.time and obs.full_scans - 1 <= h.full_scans < obs.full_scans:
            return h
    return None


def _reference(history: tuple[Observation, ...], obs: Observation, epoch: Observation,
               scans: int) -> Observation | None:
    """The latest observation of this epoch such that the window from it to
    ``obs`` holds at least ``scans`` complete full scans (a scan that was
    under way at the reference does not count)."""
    for h in reversed(history[:-1]):
        if h.time < epoch.time:
            break
        if obs.full_scans - h.full_scans >= scans + 1:
            return h
    return None


@dataclass(frozen=True)
class ScanCost:
    """ksmd's CPU over the last interval and the cost of a page to plan with."""

    cpu_pct: float | None          # ksmd's CPU over the last interval, % of a core
    ns_per_page: float | None      # remembered: the dearest recent measured cost
    costs: tuple[float, ...]       # recent measured costs, ns per page
    planned_ns: float              # ns_per_page, or the policy's prior before any


def measure_cost(ns_per_page: float | None, costs: tuple[float, ...], prev: Observation | None,
                 obs: Observation, policy: TunerPolicy) -> ScanCost:
    """ksmd's CPU share from ``prev`` to ``obs`` and the ns per page it cost.

    Clock ticks are 10 ms, so a cost is learnt only from intervals with real
    work. A page costs several times more while merging than while only
    checksumming: the plan uses the dearest of the last ``cost_memory``
    measured costs, not the last one. Raises nothing.
    """
    cpu_pct: float | None = None
    if prev is not None and obs.time > prev.time:
        dcpu = max(0.0, obs.ksmd_cpu_seconds - prev.ksmd_cpu_seconds)
        cpu_pct = 100.0 * dcpu / (obs.time - prev.time)
        dscan = obs.pages_scanned - prev.pages_scanned
        if dscan >= 1000 and dcpu >= 0.02:
            costs = (*costs, min(max(dcpu / dscan * 1e9, 20.0), 1e6))[-policy.cost_memory:]
            ns_per_page = max(costs)
    planned = ns_per_page if ns_per_page is not None else policy.assumed_ns_per_page
    return ScanCost(cpu_pct, ns_per_page, costs, planned)


# ---------------------------------------------------------------- what the scans show
def _pressure(obs: Observation, policy: TunerPolicy) -> tuple[str, float]:
    """("tight" | "moderate" | "ample", MemAvailable / MemTotal)."""
    frac = obs.mem_available / obs.mem_total if obs.mem_total > 0 else 0.0
    if frac < policy.tight_available:
        return "tight", frac
    if frac >= policy.ample_available:
        return "ample", frac
    return "moderate", frac


@dataclass(frozen=True)
class Reading:
    """What the newest observation says about scanning, beside its counters."""

    reset: bool                    # counters went back: KSM was reset underneath us
    pressure: str                  # "tight", "moderate" or "ample"
    available_fraction: float      # MemAvailable / MemTotal
    scans_in_epoch: int            # full scans since the current mode began
    scan_set: int                  # pages one full scan visits, at most
    judged: bool                   # the epoch holds converge_scans complete full scans
    converged: bool
    gain_per_scan: float | None    # pages_sharing rise per full scan, recent
    new_merges: bool               # pages_sharing rose by more than noise in the last scan
    epoch_merges: bool             # ... since the current mode began
    churn_pages: int               # unshared + volatile pages changed in the last scan
    churn: bool


def convergence(history: tuple[Observation, ...], obs: Observation, epoch: Observation,
                min_gain: float, policy: TunerPolicy) -> tuple[bool, float | None, bool]:
    """The convergence test: (judged, gain per full scan, converged).

    Judged once the epoch holds ``converge_scans`` complete full scans before
    ``obs``; converged when pages_sharing rose by no more than ``min_gain``
    over them and at least ``epoch_min_scans`` full scans were made in the
    epoch. Raises nothing.
    """
    ref = _reference(history, obs, epoch, policy.converge_scans)
    if ref is None:
        return False, None, False
    gain = obs.pages_sharing - ref.pages_sharing
    gain_per_scan = gain / max(1, obs.full_scans - ref.full_scans)
    converged = obs.full_scans - epoch.full_scans >= policy.epoch_min_scans and gain <= min_gain
    return True, gain_per_scan, converged


def last_scan(history: tuple[Observation, ...], obs: Observation, epoch: Observation,
              min_gain: float) -> tuple[int, bool, float | None]:
    """Over the last full scan of the epoch: (churn pages, new merges, gain per scan).

    Churn is how many pages moved in or out of unshared and volatile; new
    merges are a pages_sharing rise above ``min_gain``. (0, False, None) while no
    full scan ended in the epoch. Raises nothing.
    """
    last = _last_scan_start(history, obs, epoch)
    if last is None:
        return 0, False, None
    churn_pages = (abs(obs.pages_unshared - last.pages_unshared)
                   + abs(obs.pages_volatile - last.pages_volatile))
    gain = obs.pages_sharing - last.pages_sharing
    return churn_pages, gain > min_gain, float(gain) / max(1, obs.full_scans - last.full_scans)


def read_scans(history: tuple[Observation, ...], obs: Observation, epoch: Observation,
               reset: bool, policy: TunerPolicy) -> Reading:
    """Memory pressure, convergence and churn as of ``obs``. Raises nothing."""
    pressure, avail = _pressure(obs, policy)
    scan_set = _scan_set(obs)
    # a pages_sharing rise up to this is noise, not merging progress
    min_gain = max(policy.min_gain_pages, policy.min_gain_fraction * obs.pages_sharing)
    judged, gain_per_scan, converged = convergence(history, obs, epoch, min_gain, policy)
    churn_pages, new_merges, last_gain = last_scan(history, obs, epoch, min_gain)
    return Reading(
        reset=reset, pressure=pressure, available_fraction=avail,
        scans_in_epoch=obs.full_scans - epoch.full_scans, scan_set=scan_set,
        judged=judged, converged=converged,
        gain_per_scan=gain_per_scan if judged else last_gain, new_merges=new_merges,
        epoch_merges=obs.pages_sharing - epoch.pages_sharing > min_gain,
        churn_pages=churn_pages,
        churn=churn_pages > max(policy.min_gain_pages, policy.churn_fraction * scan_set))

