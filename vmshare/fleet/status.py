"""Fleet status from Prometheus: every host that runs a vmshare exporter, what it
saves, what ksmd costs it, and which hosts need a look.

A host is a Prometheus ``instance`` of the vmshare scrape job. The figures are
the exporter's (``vmshare metrics``): vmshare_ksm_saved_bytes (the kernel's
counter: pages saved), vmshare_vm_saved_bytes (each VM's fair share of it),
vmshare_ksmd_cpu_seconds_total (ksmd's CPU time), vmshare_ksm_knob_run,
vmshare_ksm_available, vmshare_vm_mergeable and vmshare_vm_policy_merge (the
merge state and what policy wants), vmshare_snapshot_age_seconds.

Every figure is aggregated by the server (``count by``, ``sum by``, ``topk``),
and the instant queries run concurrently: what comes back is a few samples per
host, however many VMs the fleet has (``benchmarks/fleet_scale.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vmshare.errors import UsageError
from vmshare.promapi.client import PromClient, Sample

GIB = 1 << 30
DEFAULT_JOB = "vmshare"
#: illustrative prices; operators set their own (README: fleet)
DEFAULT_CPU_PRICE = 0.00001      # per core-second (about 0.036 per core-hour)
DEFAULT_GIB_PRICE = 0.005        # per GiB-hour of memory
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:@/+ -]{1,128}$")


@dataclass(frozen=True)
class Prices:
    cpu_second: float = DEFAULT_CPU_PRICE
    gib_hour: float = DEFAULT_GIB_PRICE


@dataclass
class HostRow:
    instance: str
    up: bool | None = None              # None: no `up` series (not scraped by this job)
    age_seconds: float | None = None    # how old its newest vmshare sample is
    ksm: str = "unknown"                # running | paused | off | unavailable | unknown
    saved_bytes: float = 0.0
    vm_count: int = 0
    ksmd_cores: float | None = None     # ksmd CPU, in cores, over the last 5 minutes
    drifted: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def cost_per_hour(self, prices: Prices) -> float | None:
        return None if self.ksmd_cores is None else self.ksmd_cores * 3600 * prices.cpu_second

    def worth_per_hour(self, prices: Prices) -> float:
        return self.saved_bytes / GIB * prices.gib_hour


@dataclass(frozen=True)
class VmRow:
    instance: str
    domain: str
    trust_group: str
    saved_bytes: float


@dataclass
class FleetStatus:
    hosts: list[HostRow]
    top: list[VmRow]
    total_saved_bytes: float
    vm_total: int
    prices: Prices
    notes: list[str] = field(default_factory=list)


def selector(job: str, trust_group: str | None = None, instance: str | None = None) -> str:
    """The label matchers for the vmshare job (and a trust group, a host); values
    checked so that no input can change the PromQL around them. Raises UsageError."""
    matchers = []
    for label, what, value in (("job", "job", job), ("trust_group", "trust group", trust_group),
                               ("instance", "host", instance)):
        if value is None:
            continue
        if not _LABEL_VALUE.match(value):
            raise UsageError(f"bad {what} {value!r}: use letters, digits and . _ - : @ / +")
        matchers.append(f'{label}="{value}"')
    return "{" + ",".join(matchers) + "}"


def _by_instance(samples: Iterable[Sample]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples:
        inst = s.labels.get("instance", "")
        out[inst] = out.get(inst, 0.0) + s.value
    return out


def top_sharers(client: PromClient, n: int, *, job: str = DEFAULT_JOB,
                trust_group: str | None = None, at: float | None = None) -> list[VmRow]:
    """The ``n`` VMs that save most, biggest first: one ``topk`` query, so the
    server ranks the fleet and only ``n`` series come back. Raises PrometheusError."""
    if n <= 0:
        return []
    samples = client.query(f"topk({n}, vmshare_vm_saved_bytes{selector(job, trust_group)})",
                           at)
    rows = [VmRow(s.labels.get("instance", ""), s.labels.get("domain", "?"),
                  s.labels.get("trust_group", ""), s.value) for s in samples]
    return sorted(rows, key=lambda r: (-r.saved_bytes, r.instance, r.domain))[:n]


def _queries(job: str, trust_group: str | None) -> dict[str, str]:
    """Everything status needs, each aggregated by the server to one value per
    host (or only the VMs to name): a thousand hosts of forty VMs come back as
    a few thousand samples, not forty thousand."""
    job_sel, vm_sel = selector(job), selector(job, trust_group)
    return {
        "up": f"up{job_sel}",
        "available": f"vmshare_ksm_available{job_sel}",
        "run": f"vmshare_ksm_knob_run{job_sel}",
        "saved": f"vmshare_ksm_saved_bytes{job_sel}",
        # how old the figures are: since Prometheus last scraped them, plus how
        # old the exporter's snapshot already was then (a stuck refresher shows)
        "age": f"time() - timestamp(vmshare_snapshot_age_seconds{job_sel}) "
               f"+ vmshare_snapshot_age_seconds{job_sel}",
        "cores": f"rate(vmshare_ksmd_cpu_seconds_total{job_sel}[5m])",
        "vms": f"count by (instance) (vmshare_vm_saved_bytes{vm_sel})",
        "group_saved": f"sum by (instance) (vmshare_vm_saved_bytes{vm_sel})",
        "drift": f"vmshare_vm_mergeable{vm_sel} != on(instance, domain) "
                 f"vmshare_vm_policy_merge{vm_sel}",
    }


def fleet_status(client: PromClient, *, job: str = DEFAULT_JOB,
                 trust_group: str | None = None, stale_after: float = 300.0,
                 prices: Prices | None = None, top: int = 10,
                 at: float | None = None) -> FleetStatus:
    """Collect and judge the fleet as of ``at`` (Unix time; None: now). The
    queries run concurrently, each with the client's timeout.
    Raises PrometheusError, UsageError."""
    prices = prices or Prices()
    queries = _queries(job, trust_group)
    if trust_group is None:
        del queries["group_saved"]
    with ThreadPoolExecutor(max_workers=len(queries) + 1) as pool:
        futures = {k: pool.submit(client.query, q, at) for k, q in queries.items()}
        topped = pool.submit(top_sharers, client, top, job=job, trust_group=trust_group, at=at)
        got = {k: f.result() for k, f in futures.items()}
        top_rows = topped.result()
    per = {k: _by_instance(v) for k, v in got.items() if k != "drift"}
    instances = sorted(set(per["up"]) | set(per["available"]) | set(per["vms"]))
    hosts = {i: HostRow(i, up=None if i not in per["up"] else per["up"][i] >= 1)
             for i in instances}
    for inst, row in hosts.items():
        row.age_seconds = per["age"].get(inst)
        row.ksmd_cores = per["cores"].get(inst)
        row.ksm = _ksm_state(per["available"].get(inst), per["run"].get(inst),
                             per["saved"].get(inst))
        row.vm_count = round(per["vms"].get(inst, 0))
        row.saved_bytes = per["saved" if trust_group is None else "group_saved"].get(inst, 0.0)
    for s in got["drift"]:
        host = hosts.setdefault(s.labels.get("instance", ""), HostRow(s.labels.get("instance", "")))
        host.drifted.append(s.labels.get("domain", "?"))
    for row in hosts.values():
        row.flags = _flags(row, stale_after, prices)
    ordered = sorted(hosts.values(), key=lambda h: (-h.saved_bytes, h.instance))
    notes = [f"{client.dropped} non-finite sample value(s) ignored"] if client.dropped else []
    if not hosts:
        notes.append(f"no vmshare exporter found: no series with job={job!r} "
                     "(is Prometheus scraping `vmshare metrics`? see --job)")
    return FleetStatus(ordered, top_rows, sum(h.saved_bytes for h in ordered),
                       sum(h.vm_count for h in ordered), prices, notes)


def _ksm_state(available: float | None, run: float | None, saved: float | None) -> str:
    if available is None:
        return "unknown"
    if available < 1:
        return "unavailable"
    if run is not None and run >= 1:
        return "running"
    return "paused" if saved else "off"


def _flags(row: HostRow, stale_after: float, prices: Prices) -> list[str]:
    flags = []
    if row.up is False:
        flags.append("exporter down")
    elif row.up is None:
        flags.append("not scraped (no up series)")
    if row.age_seconds is not None and row.age_seconds > stale_after:
        flags.append(f"stale ({row.age_seconds:.0f} s old)")
    if row.ksm in ("off", "unavailable"):
        flags.append(f"KSM {row.ksm}")
    cost = row.cost_per_hour(prices)
    if cost is not None and cost > row.worth_per_hour(prices) and cost > 0:
        flags.append(f"ksmd costs more than it saves ({cost:.4f} vs "
                     f"{row.worth_per_hour(prices):.4f} per hour)")
    if row.drifted:
        flags.append(f"merge state differs from policy: {', '.join(sorted(row.drifted))}")
    return flags
