"""Decide how hard kernel KSM should scan, from KSM's own feedback.

ksmtuned (2009) compares free memory with what qemu processes have committed
and nudges pages_to_scan by fixed steps every 60 s. It never asks whether
scanning pays off, and never what ksmd costs. This module decides from what
the kernel reports about its own scanning (read by vmshare.tuner.reading:
cost, convergence, churn, memory pressure). One step per mode:

* merging (``while_merging``): merges still being found, or not yet known,
  so scan as fast as the CPU budget allows (the total work to converge is
  about three full scans whatever the rate; doing it fast and then stopping
  costs no more CPU than dribbling it out, and the memory is saved sooner).
  Once converged, memory pressure decides: ample (or general_profit < 0) ->
  stop ksmd (run=0, merged pages kept); moderate or tight -> watch;
* watching (``while_watching``): a slow full-scan period; new merges, or
  churn past its cooldown, start merging again, ample memory stops ksmd.
  Churn re-scans at full speed, but the cooldown doubles each time such a
  burst finds nothing to merge (``churn_cooldown``), so volatile memory
  cannot make ksmd run away;
* stopped (``while_idle``): resume when MemAvailable is no longer ample,
  when it dropped by a share of MemTotal since the stop (new guests), after
  ``probe_seconds``, or when KSM's counters went back (someone else reset it).

The CPU budget (``plan_knobs``): with the cost of a page measured,
pages_to_scan is chosen so that pages_to_scan * cost / (sleep +
pages_to_scan * cost) stays within the budget, and if the last interval went
over, the current setting is scaled down by budget/measured as well.

Everything here is pure: ``decide(state, observation, policy)`` returns a
``Decision`` and the next ``TunerState``. Collecting observations and
applying decisions belong to the edge (vmshare.tuner.loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vmshare.config import TunerPolicy
from vmshare.tuner.reading import (
    Observation as Observation,  # part of decide's signature: importable from here
)
from vmshare.tuner.reading import Reading, ScanCost, measure_cost, read_scans, remember

MODE_MERGE = "merge"     # merges are being found (or not yet known): scan at the budget
MODE_WATCH = "watch"     # converged, memory not ample: slow periodic full scans
MODE_IDLE = "idle"       # converged, memory ample: ksmd stopped, merges kept


@dataclass(frozen=True)
class TunerState:
    """What the tuner remembers between decisions (it owns no other memory)."""

    mode: str = MODE_MERGE
    history: tuple[Observation, ...] = ()
    epoch: Observation | None = None          # first observation of the current mode
    ns_per_page: float | None = None          # ksmd's cost of one scanned page, planned with
    costs: tuple[float, ...] = ()             # recent measured costs (ns per page)
    idle_since: float | None = None
    idle_available: int | None = None
    churn_epoch: bool = False                 # the current merge epoch was started by churn
    churn_quiet_until: float = 0.0
    churn_cooldown: float = 0.0


@dataclass(frozen=True)
class Decision:
    """The knobs to put in force, and why, in one line."""

    mode: str
    run: int
    pages_to_scan: int | None     # None: leave as is (ksmd stopped)
    sleep_millisecs: int | None
    reason: str
    cpu_pct: float | None = None          # ksmd's CPU over the last interval, % of a core
    gain_per_scan: float | None = None    # pages_sharing rise per full scan, recent
    available_fraction: float = 0.0
    facts: dict[str, float] = field(default_factory=dict)

    def knobs(self) -> dict[str, int]:
        """Knob assignments in the order to write them (run last)."""
        out: dict[str, int] = {}
        if self.pages_to_scan is not None:
            out["pages_to_scan"] = self.pages_to_scan
        if self.sleep_millisecs is not None:
            out["sleep_millisecs"] = self.sleep_millisecs
        out["run"] = self.run
        return out


# ---------------------------------------------------------------- the CPU budget
def pages_for_budget(fraction: float, ns_per_page: float, sleep_ms: int,
                     policy: TunerPolicy) -> int:
    """pages_to_scan so that ksmd's busy share p*c / (s + p*c) equals ``fraction``."""
    cost = ns_per_page * 1e-9
    fraction = min(fraction, 0.95)
    pages = fraction * (sleep_ms / 1000.0) / ((1.0 - fraction) * cost)
    return int(min(max(pages, policy.min_pages_to_scan), policy.max_pages_to_scan))


def pages_for_rate(pages_per_s: float, ns_per_page: float, sleep_ms: int,
                   policy: TunerPolicy) -> int:
    """pages_to_scan so that ksmd scans ``pages_per_s`` with ``sleep_ms`` between batches."""
    cost = ns_per_page * 1e-9
    busy = pages_per_s * cost
    if busy >= 0.95:
        return policy.max_pages_to_scan
    pages = pages_per_s * (sleep_ms / 1000.0) / (1.0 - busy)
    return int(min(max(pages, policy.min_pages_to_scan), policy.max_pages_to_scan))


def plan_knobs(mode: str, pressure: str, scan_set: int, cost: ScanCost, obs: Observation,
               policy: TunerPolicy) -> tuple[int, int, str]:
    """pages_to_scan, sleep_millisecs and the reason's tail for a scanning mode.

    Merging scans at the CPU budget (flat out at a budget of 100%); watching
    makes a full scan every watch period, within the budget too. If ksmd went
    over the budget in the last interval, the pages_to_scan in force is scaled
    down by budget/measured (with a 10% margin) when that is lower still.
    Raises nothing.
    """
    budget = policy.cpu_budget_pct
    why = ""
    if mode == MODE_MERGE:
        sleep_ms = policy.sleep_millisecs
        if budget >= 100:
            sleep_ms, pages = 0, policy.max_pages_to_scan
        else:
            pages = pages_for_budget(budget / 100.0, cost.planned_ns, sleep_ms, policy)
    else:
        period = (policy.watch_scan_seconds_tight if pressure == "tight"
                  else policy.watch_scan_seconds)
        sleep_ms = policy.watch_sleep_millisecs
        pages = min(pages_for_rate(scan_set / period, cost.planned_ns, sleep_ms, policy),
                    pages_for_budget(budget / 100.0, cost.planned_ns, sleep_ms, policy))
        why = f", a full scan of {scan_set:,} pages every ~{period:.0f}s"
    cpu_pct = cost.cpu_pct
    if (cpu_pct is not None and cpu_pct > budget * policy.budget_tolerance
            and obs.run == 1 and obs.pages_to_scan > 0):
        pages = min(pages, max(policy.min_pages_to_scan,
                               int(obs.pages_to_scan * budget / cpu_pct * 0.9)))
        why += (f"; ksmd used {cpu_pct:.0f}% of a core > budget {budget:.0f}%: "
                f"backing off to {pages:,} pages")
    return pages, sleep_ms, why


# ---------------------------------------------------------------- one step per mode
@dataclass(frozen=True)
class Turn:
    """The mode after an observation, the state to remember and why."""

    mode: str
    state: TunerState
    why: str


def _enter(state: TunerState, mode: str, obs: Observation, why: str, *,
           churn_epoch: bool = False) -> Turn:
    """A change of mode: a new epoch starts at ``obs`` (idle remembers when and
    with how much memory available it stopped)."""
    idle = mode == MODE_IDLE
    return Turn(mode, replace(state, mode=mode, epoch=obs, churn_epoch=churn_epoch,
                              idle_since=obs.time if idle else None,
                              idle_available=obs.mem_available if idle else None), why)


def churn_cooldown(state: TunerState, epoch_merges: bool, policy: TunerPolicy) -> float:
    """How long churn is ignored after this merge epoch converges.

    An epoch that found merges makes churn worth following again (no wait);
    a churn burst that found nothing doubles the wait, from
    ``churn_cooldown_seconds`` up to ``churn_cooldown_max_seconds``, so
    volatile memory cannot make ksmd run away. Raises nothing.
    """
    if epoch_merges:
        return 0.0
    if state.churn_epoch:
        return min(policy.churn_cooldown_max_seconds,
                   max(policy.churn_cooldown_seconds, 2 * state.churn_cooldown))
    return state.churn_cooldown


def while_idle(state: TunerState, obs: Observation, r: Reading, policy: TunerPolicy) -> Turn:
    """ksmd stopped: resume merging after a reset, when memory is no longer
    ample, when MemAvailable dropped by ``resume_drop_fraction`` of RAM since
    the stop, or after ``probe_seconds``; else stay stopped. Raises nothing."""
    assert state.idle_since is not None and state.idle_available is not None
    dropped = (state.idle_available - obs.mem_available) / max(1, obs.mem_total)
    idle_for = obs.time - state.idle_since
    if r.reset:
        why = "KSM counters went back (unmerged by someone else?): merging again"
    elif r.pressure != "ample":
        why = (f"memory no longer ample (MemAvailable {r.available_fraction:.0%} < "
               f"{policy.ample_available:.0%}): resuming at the budget")
    elif dropped >= policy.resume_drop_fraction:
        why = (f"MemAvailable fell by {dropped:.0%} of RAM since ksmd stopped "
               "(new guests?): resuming to look for merges")
    elif idle_for >= policy.probe_seconds:
        why = f"stopped for {idle_for:.0f}s: probing for new merges"
    else:
        return Turn(MODE_IDLE, state,
                    f"stopped: converged and memory ample (MemAvailable "
                    f"{r.available_fraction:.0%}); resume if it falls below "
                    f"{policy.ample_available:.0%}, drops {policy.resume_drop_fraction:.0%} "
                    f"of RAM, or in {policy.probe_seconds - idle_for:.0f}s")
    return _enter(state, MODE_MERGE, obs, why)


def while_merging(state: TunerState, obs: Observation, r: Reading,
                  policy: TunerPolicy) -> Turn:
    """Scanning at the budget: once converged, stop ksmd if memory is ample or
    merging costs more than it saves (general_profit < 0), else watch; the
    churn cooldown is settled then. Raises nothing."""
    if not r.converged:
        if not r.judged or r.scans_in_epoch < policy.epoch_min_scans:
            why = (f"learning: {r.scans_in_epoch} of {policy.epoch_min_scans} full scans "
                   "seen; scanning at the budget")
        else:
            why = (f"merges still found (+{r.gain_per_scan or 0:,.0f} pages_sharing/scan): "
                   "scanning at the budget")
        return Turn(MODE_MERGE, state, why)
    cooldown = churn_cooldown(state, r.epoch_merges, policy)
    state = replace(state, churn_cooldown=cooldown, churn_quiet_until=obs.time + cooldown)
    if r.pressure == "ample" or obs.general_profit < 0:
        cause = (f"memory ample (MemAvailable {r.available_fraction:.0%})"
                 if r.pressure == "ample"
                 else f"general_profit {obs.general_profit} < 0: metadata costs more "
                      "than merging saves")
        return _enter(state, MODE_IDLE, obs,
                      f"converged (pages_sharing {obs.pages_sharing:,}, "
                      f"+{max(0.0, r.gain_per_scan or 0):,.0f}/scan over "
                      f"{policy.converge_scans} scans) and {cause}: stopping ksmd, "
                      "merges kept")
    return _enter(state, MODE_WATCH, obs,
                  f"converged (pages_sharing {obs.pages_sharing:,} flat over "
                  f"{policy.converge_scans} scans), memory {r.pressure}: slow watch")


def while_watching(state: TunerState, obs: Observation, r: Reading,
                   policy: TunerPolicy) -> Turn:
    """Slow full scans: merge again on new merges or on churn past its
    cooldown, stop ksmd once memory is ample, else keep watching. Raises nothing."""
    if r.new_merges:
        return _enter(state, MODE_MERGE, obs,
                      f"new merges while watching (+{r.gain_per_scan or 0:,.0f}/scan): "
                      "scanning at the budget")
    if r.churn and obs.time >= state.churn_quiet_until:
        return _enter(state, MODE_MERGE, obs,
                      f"churn: {r.churn_pages:,} unshared/volatile pages changed in a scan "
                      f"of {r.scan_set:,}: re-scanning at the budget", churn_epoch=True)
    if r.pressure == "ample":
        return _enter(state, MODE_IDLE, obs,
                      f"converged and memory now ample (MemAvailable "
                      f"{r.available_fraction:.0%}): stopping ksmd, merges kept")
    why = f"converged, memory {r.pressure}: slow watch"
    if r.churn:
        why += (f" (churn of {r.churn_pages:,} pages ignored for "
                f"{state.churn_quiet_until - obs.time:.0f}s more)")
    return Turn(MODE_WATCH, state, why)


_STEPS = {MODE_IDLE: while_idle, MODE_MERGE: while_merging, MODE_WATCH: while_watching}


# ---------------------------------------------------------------- decide
def decide(state: TunerState, obs: Observation,
           policy: TunerPolicy) -> tuple[Decision, TunerState]:
    """One decision from the newest observation and what the state remembers:
    measure the cost, read the scans, take the current mode's step, then plan
    the knobs of the mode it leads to.

    Pure: no I/O, no clock. Raises nothing for odd counters (a counter going
    backwards, say after someone else's run=2, starts a new epoch).
    """
    prev = state.history[-1] if state.history else None
    history = remember(state.history, obs, policy.history)
    reset = prev is not None and (obs.pages_scanned < prev.pages_scanned
                                  or obs.full_scans < prev.full_scans)
    if reset:
        history, prev = (obs,), None
    cost = measure_cost(state.ns_per_page, state.costs, prev, obs, policy)
    epoch = state.epoch if (state.epoch is not None and not reset) else obs
    r = read_scans(history, obs, epoch, reset, policy)
    carried = replace(state, history=history, ns_per_page=cost.ns_per_page, costs=cost.costs,
                      epoch=epoch)
    turn = _STEPS[state.mode](carried, obs, r, policy)
    facts: dict[str, float] = {"available_fraction": r.available_fraction}
    if cost.cpu_pct is not None:
        facts["cpu_pct"] = cost.cpu_pct
    facts.update(ns_per_page=cost.planned_ns, scan_set=r.scan_set, churn_pages=r.churn_pages,
                 scans_in_epoch=r.scans_in_epoch)
    if turn.mode == MODE_IDLE:   # while stopped nothing scans: no gain to report
        gain = None if state.mode == MODE_IDLE else r.gain_per_scan
        return (Decision(MODE_IDLE, 0, None, None, turn.why, cost.cpu_pct, gain,
                         r.available_fraction, facts), turn.state)
    pages, sleep_ms, tail = plan_knobs(turn.mode, r.pressure, r.scan_set, cost, obs, policy)
    busy = pages * cost.planned_ns * 1e-9
    facts["cost_pct_predicted"] = 100.0 * busy / (sleep_ms / 1000.0 + busy)
    return (Decision(turn.mode, 1, pages, sleep_ms, turn.why + tail, cost.cpu_pct,
                     r.gain_per_scan, r.available_fraction, facts), turn.state)
