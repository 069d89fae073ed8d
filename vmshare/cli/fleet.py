"""``vmshare fleet status|history --prometheus URL``: many hosts' savings, read
back from Prometheus (or Thanos, Mimir, VictoriaMetrics) through its HTTP API."""

from __future__ import annotations

import datetime
import math
import time
from typing import TYPE_CHECKING, Any

from vmshare.cli.context import Context, emit_json, out
from vmshare.cli.shown import FLEET_JOB as DEFAULT_JOB
from vmshare.cli.shown import PROM_TIMEOUT as DEFAULT_TIMEOUT
from vmshare.errors import UsageError

if TYPE_CHECKING:
    from vmshare.fleet.history import FleetHistory
    from vmshare.fleet.status import FleetStatus, VmRow
    from vmshare.promapi.client import PromClient


def _client(ctx: Context) -> PromClient:
    from vmshare.promapi.client import PromClient
    return PromClient(ctx.args.prometheus, timeout=ctx.args.timeout)


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise UsageError(f"not a price: {text!r}") from exc
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"a price must be finite and >= 0, not {text!r}")
    return value


def _at(text: str | None) -> float | None:
    """--at: Unix seconds or an ISO 8601 time (2026-12-06T12:00:00Z; no zone: UTC)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.datetime.fromisoformat(text)
        except ValueError as exc:
            raise UsageError(f"--at wants Unix seconds or an ISO 8601 time, not {text!r}") \
                from exc
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        value = when.timestamp()
    if not (math.isfinite(value) and 0 < value < 1e11):
        raise UsageError(f"--at {text!r} is not a time Prometheus can query")
    return value


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.2f} GiB"


def status_json(st: FleetStatus) -> dict[str, Any]:
    return {
        "total_saved_bytes": round(st.total_saved_bytes), "vms": st.vm_total,
        "prices": {"cpu_second": st.prices.cpu_second, "gib_hour": st.prices.gib_hour},
        "hosts": [{"instance": h.instance, "up": h.up, "age_seconds": h.age_seconds,
                   "ksm": h.ksm, "saved_bytes": round(h.saved_bytes), "vms": h.vm_count,
                   "ksmd_cores": h.ksmd_cores, "cost_per_hour": h.cost_per_hour(st.prices),
                   "worth_per_hour": h.worth_per_hour(st.prices),
                   "drifted": sorted(h.drifted), "flags": h.flags} for h in st.hosts],
        "top": [{"instance": v.instance, "domain": v.domain, "trust_group": v.trust_group,
                 "saved_bytes": round(v.saved_bytes)} for v in st.top],
        "notes": st.notes,
    }


def cmd_fleet_status(ctx: Context) -> int:
    from vmshare.fleet.status import Prices, fleet_status
    from vmshare.present.text import mib, table
    a = ctx.args
    if a.top < 0:
        raise UsageError(f"--top must be 0 or more, not {a.top}")
    st = fleet_status(_client(ctx), job=a.job, trust_group=a.trust_group,
                      stale_after=a.stale, top=a.top, at=_at(a.at),
                      prices=Prices(_price(a.cpu_price), _price(a.gib_price)))
    if a.json:
        emit_json(status_json(st))
        return 0
    scope = f" (trust group {a.trust_group})" if a.trust_group else ""
    out(f"fleet{scope}: {len(st.hosts)} hosts, {st.vm_total} VMs, "
        f"{_gib(st.total_saved_bytes)} saved")
    rows = [[h.instance, {True: "up", False: "DOWN", None: "?"}[h.up], h.ksm,
             mib(h.saved_bytes), str(h.vm_count),
             "-" if h.ksmd_cores is None else f"{h.ksmd_cores * 100:.1f}%",
             "; ".join(h.flags) or "ok"] for h in st.hosts]
    out(table(["HOST", "EXPORTER", "KSM", "SAVED", "VMS", "KSMD CPU", "LOOK AT"], rows,
              right=(3, 4, 5)))
    if st.top:
        out("")
        out(_top_table(st.top))
    for note in st.notes:
        out(f"note: {note}")
    return 0


def _top_table(rows: list[VmRow]) -> str:
    from vmshare.present.text import mib, table
    return table(["TOP SHARER", "HOST", "TRUST GROUP", "SAVED"],
                 [[v.domain, v.instance, v.trust_group or "-", mib(v.saved_bytes)]
                  for v in rows], right=(3,))


def cmd_fleet_top(ctx: Context) -> int:
    from vmshare.fleet.status import top_sharers
    a = ctx.args
    if a.top < 1:
        raise UsageError(f"--top must be 1 or more, not {a.top}")
    rows = top_sharers(_client(ctx), a.top, job=a.job, trust_group=a.trust_group, at=_at(a.at))
    if a.json:
        emit_json([{"instance": v.instance, "domain": v.domain, "trust_group": v.trust_group,
                    "saved_bytes": round(v.saved_bytes)} for v in rows])
        return 0
    if not rows:
        out("no VM figures in Prometheus (is it scraping `vmshare metrics`? see --job)")
        return 0
    out(_top_table(rows))
    return 0


def history_json(h: FleetHistory) -> dict[str, Any]:
    return {"start": h.start, "end": h.end, "step": h.step,
            "total": [[t, round(v)] for t, v in h.total],
            "hosts": {x.instance: [[t, round(v)] for t, v in x.points] for x in h.hosts}}


def cmd_fleet_history(ctx: Context) -> int:
    from vmshare.fleet.history import fleet_history
    from vmshare.present.text import mib
    from vmshare.records.history import parse_duration, sparkline
    a = ctx.args
    try:
        since = parse_duration(a.since)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from exc
    h = fleet_history(_client(ctx), since, job=a.job, trust_group=a.trust_group,
                      instance=a.host)
    if a.json:
        emit_json(history_json(h))
        return 0
    if not h.total:
        out(f"no vmshare samples in Prometheus over the last {a.since}")
        return 0
    first = time.strftime("%Y-%m-%d %H:%M", time.localtime(h.total[0][0]))
    out(f"saved bytes since {first}, one point per {h.step:g} s")
    for label, points in [("fleet", h.total), *[(x.instance, x.points) for x in h.hosts]]:
        values = [v for _, v in points]
        if not values:
            out(f"  {label:<28} (no samples)")
            continue
        out(f"  {label:<28} {sparkline(values[-60:])}  now {mib(values[-1])}, "
            f"min {mib(min(values))}, max {mib(max(values))}")
    return 0


def _common(p: Any) -> None:
    p.add_argument("--prometheus", required=True, metavar="URL",
                   help="Prometheus-compatible API base URL, e.g. http://prometheus:9090")
    p.add_argument("--job", default=DEFAULT_JOB,
                   help="the scrape job of the vmshare exporters (default %(default)s)")
    p.add_argument("--trust-group", metavar="GROUP", help="only VMs of this trust group")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="per request (default %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON document")


def register(sub: Any) -> None:
    s = sub.add_parser("fleet", help="many hosts' savings, from Prometheus: status|top|history")
    fsub = s.add_subparsers(dest="fleet_cmd", metavar="ACTION", required=True)
    p = fsub.add_parser("status", help="per host and per VM savings, top sharers, hosts "
                        "to look at")
    _common(p)
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="top sharers shown (default %(default)s)")
    p.add_argument("--stale", type=float, default=300.0, metavar="SECONDS",
                   help="flag a host whose newest sample is older (default %(default)s)")
    p.add_argument("--cpu-price", default="0.00001", metavar="PRICE",
                   help="price of one core-second of ksmd CPU (default %(default)s)")
    p.add_argument("--gib-price", default="0.005", metavar="PRICE",
                   help="price of one GiB of memory for an hour (default %(default)s)")
    p.add_argument("--at", metavar="TIME",
                   help="as of this time: Unix seconds or ISO 8601 (default: now)")
    p.set_defaults(func=cmd_fleet_status)
    p = fsub.add_parser("top", help="the VMs that save most, fleet-wide (one query)")
    _common(p)
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="how many (default %(default)s)")
    p.add_argument("--at", metavar="TIME",
                   help="as of this time: Unix seconds or ISO 8601 (default: now)")
    p.set_defaults(func=cmd_fleet_top)
    p = fsub.add_parser("history", help="saved bytes over time, per host and fleet-wide")
    _common(p)
    p.add_argument("--since", default="24h", metavar="DURATION",
                   help="e.g. 6h, 7d (default %(default)s)")
    p.add_argument("--host", metavar="INSTANCE", help="only this host (its instance label)")
    p.set_defaults(func=cmd_fleet_history)
