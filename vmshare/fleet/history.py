"""Fleet savings over time from Prometheus: per host and the fleet total.

One range query per figure (``sum by (instance)``), at a step that gives about
``points`` points over the period, so a week of a thousand hosts costs the
server what a dashboard panel costs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vmshare.errors import UsageError
from vmshare.fleet.status import DEFAULT_JOB, selector
from vmshare.promapi.client import PromClient

MAX_SPAN = 400 * 86400.0


@dataclass(frozen=True)
class HostHistory:
    instance: str
    points: tuple[tuple[float, float], ...]     # (time, saved bytes)


@dataclass(frozen=True)
class FleetHistory:
    start: float
    end: float
    step: float
    hosts: list[HostHistory]
    total: tuple[tuple[float, float], ...]


def fleet_history(client: PromClient, since: float, *, job: str = DEFAULT_JOB,
                  trust_group: str | None = None, instance: str | None = None,
                  points: int = 200, now: float | None = None) -> FleetHistory:
    """Saved bytes per host over the last ``since`` seconds. With ``trust_group``
    the figure is the sum of that group's VMs' fair shares (the host counter knows
    no groups). Raises UsageError for a bad period, PrometheusError."""
    if not (1 <= since <= MAX_SPAN):
        raise UsageError(f"--since must be between 1 s and 400 days, not {since:g} s")
    end = time.time() if now is None else now
    start = end - since
    step = max(1.0, round(since / max(1, points)))
    sel = selector(job, trust_group, instance)
    if trust_group is None:
        expr = f"sum by (instance) (vmshare_ksm_saved_bytes{sel})"
    else:
        expr = f"sum by (instance) (vmshare_vm_saved_bytes{sel})"
    series = client.query_range(expr, start, end, step)
    hosts = sorted((HostHistory(s.labels.get("instance", ""), s.points) for s in series),
                   key=lambda h: h.instance)
    totals: dict[float, float] = {}
    for h in hosts:
        for t, v in h.points:
            totals[t] = totals.get(t, 0.0) + v
    return FleetHistory(start, end, step, hosts, tuple(sorted(totals.items())))
