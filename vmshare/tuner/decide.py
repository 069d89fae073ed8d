"""Decide how hard kernel KSM should scan, from KSM's own feedback.

ksmtuned (2009) compares free memory with what qemu processes have committed
and nudges pages_to_scan by fixed steps every 60 s. It never asks whether
scanning pays off, and never what ksmd costs. This module decides from what
the kernel reports about its own scanning:

* merges still being found: pages_sharing rose over the last full scans, so
  scan as fast as the CPU budget allows (the total work to converge is about
  three full scans whatever the rate; doing it fast and then stopping costs
  no more CPU than dribbling it out, and the memory is saved sooner);
* converged: pages_sharing did not rise over ``converge_scans`` complete
  full scans (the kernel selftest's test, too), and at least
  ``epoch_min_scans`` full scans were made since the last change of mode,
  enough for content present then to merge. Then memory
  pressure decides: ample -> stop ksmd (run=0, merged pages kept); moderate
  or tight -> keep watching with a slow full-scan period;
* stopped: resume when MemAvailable is no longer ample, when it dropped by a
  share of MemTotal since the stop (new guests), or after ``probe_seconds``;
* churn (pages_unshared/pages_volatile changing by a share of the scanned
  set) while watching: re-scan at full speed, but with a cooldown that
  doubles each time such a burst finds nothing to merge, so volatile memory
  cannot make ksmd run away;
* the CPU budget: ksmd's CPU time over the last interval, divided by the
  pages it scanned, gives the cost of a page; pages_to_scan is chosen so
  that pages_to_scan * cost / (sleep + pages_to_scan * cost) stays within
  the budget, and if the last interval went over, the current setting is
  scaled down by budget/measured as well.

Everything here is pure: ``decide(state, observation, policy)`` returns a
``Decision`` and the next ``TunerState``. Collecting observations and
applying decisions belong to the edge (vmshare/cli/tune.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vmshare.config import TunerPolicy

MODE_MERGE = "merge"     # merges are being found (or not yet known): scan at the budget
MODE_WATCH = "watch"     # converged, memory not ample: slow periodic full scans
MODE_IDLE = "idle"       # converged, memory ample: ksmd stopped, merges kept


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


# ---------------------------------------------------------------- helpers
def _pressure(obs: Observation, policy: TunerPolicy) -> tuple[str, float]:
    frac = obs.mem_available / obs.mem_total if obs.mem_total > 0 else 0.0
    if frac < policy.tight_available:
        return "tight", frac
    if frac >= policy.ample_available:
        return "ample", frac
    return "moderate", frac


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


def _remember(history: tuple[Observation, ...], obs: Observation,
              limit: int) -> tuple[Observation, ...]:
    """Append ``obs``, keeping only the first and the last observation of each
    full_scans value, so a bounded history spans many slow full scans."""
    if (len(history) >= 2 and history[-1].full_scans == obs.full_scans
            and history[-2].full_scans == obs.full_scans):
        history = history[:-1]
    return (*history, obs)[-limit:]


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


# ---------------------------------------------------------------- decide
def decide(state: TunerState, obs: Observation,
           policy: TunerPolicy) -> tuple[Decision, TunerState]:
    """One decision from the newest observation and what the state remembers.

    Pure: no I/O, no clock. Raises nothing for odd counters (a counter going
    backwards, say after someone else's run=2, starts a new epoch).
    """
    prev = state.history[-1] if state.history else None
    history = _remember(state.history, obs, policy.history)
    pressure, avail = _pressure(obs, policy)
    budget = policy.cpu_budget_pct
    facts: dict[str, float] = {"available_fraction": avail}

    reset = prev is not None and (obs.pages_scanned < prev.pages_scanned
                                  or obs.full_scans < prev.full_scans)
    if reset:   # counters went back: KSM was reset underneath us
        history = (obs,)
        prev = None

    # ---- cost of scanning, from the last interval
    cpu_pct: float | None = None
    ns_per_page = state.ns_per_page
    costs = state.costs
    if prev is not None and obs.time > prev.time:
        dt = obs.time - prev.time
        dcpu = max(0.0, obs.ksmd_cpu_seconds - prev.ksmd_cpu_seconds)
        cpu_pct = 100.0 * dcpu / dt
        dscan = obs.pages_scanned - prev.pages_scanned
        # clock ticks are 10 ms: judge the cost only from intervals with real work
        if dscan >= 1000 and dcpu >= 0.02:
            costs = (*costs, min(max(dcpu / dscan * 1e9, 20.0), 1e6))[-policy.cost_memory:]
            # a page costs several times more while merging than while only
            # checksumming: plan with the dearest recent cost, not the last
            ns_per_page = max(costs)
        facts["cpu_pct"] = cpu_pct
    cost = ns_per_page if ns_per_page is not None else policy.assumed_ns_per_page
    facts["ns_per_page"] = cost
    over_budget = cpu_pct is not None and cpu_pct > budget * policy.budget_tolerance

    epoch = state.epoch if (state.epoch is not None and not reset) else obs
    scans_in_epoch = obs.full_scans - epoch.full_scans
    scan_set = _scan_set(obs)
    eps = max(policy.min_gain_pages, policy.min_gain_fraction * obs.pages_sharing)
    ref = _reference(history, obs, epoch, policy.converge_scans)
    gain_per_scan: float | None = None
    converged = False
    if ref is not None:
        gain = obs.pages_sharing - ref.pages_sharing
        gain_per_scan = gain / max(1, obs.full_scans - ref.full_scans)
        converged = scans_in_epoch >= policy.epoch_min_scans and gain <= eps
    last = _last_scan_start(history, obs, epoch)
    churn_pages = 0
    new_merges = False
    if last is not None:
        churn_pages = (abs(obs.pages_unshared - last.pages_unshared)
                       + abs(obs.pages_volatile - last.pages_volatile))
        new_merges = obs.pages_sharing - last.pages_sharing > eps
        if gain_per_scan is None:
            gain_per_scan = float(obs.pages_sharing - last.pages_sharing) / max(
                1, obs.full_scans - last.full_scans)
    churn = churn_pages > max(policy.min_gain_pages, policy.churn_fraction * scan_set)
    facts.update(scan_set=scan_set, churn_pages=churn_pages, scans_in_epoch=scans_in_epoch)

    mode = state.mode
    nxt = replace(state, history=history, ns_per_page=ns_per_page, costs=costs, epoch=epoch)
    why = ""

    def enter(new_mode: str, **changes: object) -> None:
        nonlocal mode, nxt
        mode = new_mode
        nxt = replace(nxt, mode=new_mode, epoch=obs, **changes)  # type: ignore[arg-type]

    if mode == MODE_IDLE:
        assert state.idle_since is not None and state.idle_available is not None
        dropped = (state.idle_available - obs.mem_available) / max(1, obs.mem_total)
        idle_for = obs.time - state.idle_since
        if reset:
            enter(MODE_MERGE, churn_epoch=False)
            why = "KSM counters went back (unmerged by someone else?): merging again"
        elif pressure != "ample":
            enter(MODE_MERGE, churn_epoch=False)
            why = (f"memory no longer ample (MemAvailable {avail:.0%} < "
                   f"{policy.ample_available:.0%}): resuming at the budget")
        elif dropped >= policy.resume_drop_fraction:
            enter(MODE_MERGE, churn_epoch=False)
            why = (f"MemAvailable fell by {dropped:.0%} of RAM since ksmd stopped "
                   "(new guests?): resuming to look for merges")
        elif idle_for >= policy.probe_seconds:
            enter(MODE_MERGE, churn_epoch=False)
            why = f"stopped for {idle_for:.0f}s: probing for new merges"
        else:
            return (Decision(MODE_IDLE, 0, None, None,
                             f"stopped: converged and memory ample (MemAvailable {avail:.0%}); "
                             f"resume if it falls below {policy.ample_available:.0%}, drops "
                             f"{policy.resume_drop_fraction:.0%} of RAM, or in "
                             f"{policy.probe_seconds - idle_for:.0f}s",
                             cpu_pct, None, avail, facts), nxt)
        nxt = replace(nxt, idle_since=None, idle_available=None)
    elif mode == MODE_MERGE and converged:
        cooldown = state.churn_cooldown
        if obs.pages_sharing - epoch.pages_sharing > eps:
            cooldown = 0.0      # this epoch found merges: churn is worth following again
        elif state.churn_epoch:   # a churn burst that found nothing: wait longer next time
            cooldown = min(policy.churn_cooldown_max_seconds,
                           max(policy.churn_cooldown_seconds, 2 * cooldown))
        nxt = replace(nxt, churn_cooldown=cooldown, churn_quiet_until=obs.time + cooldown)
        if pressure == "ample" or obs.general_profit < 0:
            enter(MODE_IDLE, idle_since=obs.time, idle_available=obs.mem_available,
                  churn_epoch=False)
            cause = (f"memory ample (MemAvailable {avail:.0%})" if pressure == "ample"
                     else f"general_profit {obs.general_profit} < 0: metadata costs more "
                          "than merging saves")
            return (Decision(MODE_IDLE, 0, None, None,
                             f"converged (pages_sharing {obs.pages_sharing:,}, "
                             f"+{max(0.0, gain_per_scan or 0):,.0f}/scan over "
                             f"{policy.converge_scans} scans) and {cause}: stopping ksmd, "
                             "merges kept", cpu_pct, gain_per_scan, avail, facts), nxt)
        enter(MODE_WATCH, churn_epoch=False)
        why = (f"converged (pages_sharing {obs.pages_sharing:,} flat over "
               f"{policy.converge_scans} scans), memory {pressure}: slow watch")
    elif mode == MODE_WATCH:
        if new_merges:
            enter(MODE_MERGE, churn_epoch=False)
            why = (f"new merges while watching (+{gain_per_scan or 0:,.0f}/scan): "
                   "scanning at the budget")
        elif churn and obs.time >= state.churn_quiet_until:
            enter(MODE_MERGE, churn_epoch=True)
            why = (f"churn: {churn_pages:,} unshared/volatile pages changed in a scan of "
                   f"{scan_set:,}: re-scanning at the budget")
        elif pressure == "ample":
            enter(MODE_IDLE, idle_since=obs.time, idle_available=obs.mem_available,
                  churn_epoch=False)
            return (Decision(MODE_IDLE, 0, None, None,
                             f"converged and memory now ample (MemAvailable {avail:.0%}): "
                             "stopping ksmd, merges kept",
                             cpu_pct, gain_per_scan, avail, facts), nxt)
        else:
            why = f"converged, memory {pressure}: slow watch"
            if churn:
                why += (f" (churn of {churn_pages:,} pages ignored for "
                        f"{state.churn_quiet_until - obs.time:.0f}s more)")
    elif mode == MODE_MERGE:
        if ref is None or scans_in_epoch < policy.epoch_min_scans:
            why = (f"learning: {scans_in_epoch} of {policy.epoch_min_scans} full scans "
                   "seen; scanning at the budget")
        else:
            why = (f"merges still found (+{gain_per_scan or 0:,.0f} pages_sharing/scan): "
                   "scanning at the budget")

    # ---- knobs for the mode, within the budget
    if mode == MODE_MERGE:
        sleep_ms = policy.sleep_millisecs
        if budget >= 100:
            sleep_ms, pages = 0, policy.max_pages_to_scan
        else:
            pages = pages_for_budget(budget / 100.0, cost, sleep_ms, policy)
    else:  # watch
        period = (policy.watch_scan_seconds_tight if pressure == "tight"
                  else policy.watch_scan_seconds)
        sleep_ms = policy.watch_sleep_millisecs
        pages = pages_for_rate(scan_set / period, cost, sleep_ms, policy)
        pages = min(pages, pages_for_budget(budget / 100.0, cost, sleep_ms, policy))
        why += f", a full scan of {scan_set:,} pages every ~{period:.0f}s"
    if over_budget and cpu_pct is not None and obs.run == 1 and obs.pages_to_scan > 0:
        scaled = max(policy.min_pages_to_scan,
                     int(obs.pages_to_scan * budget / cpu_pct * 0.9))
        if scaled < pages:
            pages = scaled
        why += (f"; ksmd used {cpu_pct:.0f}% of a core > budget {budget:.0f}%: "
                f"backing off to {pages:,} pages")
    facts["cost_pct_predicted"] = 100.0 * (pages * cost * 1e-9) / (
        sleep_ms / 1000.0 + pages * cost * 1e-9)
    return (Decision(mode, 1, pages, sleep_ms, why, cpu_pct, gain_per_scan, avail, facts),
            nxt)
