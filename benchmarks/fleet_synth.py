"""A synthetic fleet for benchmarks/fleet_scale.py: hosts and VMs with the series
`vmshare metrics` exports and `vmshare fleet` reads, written as OpenMetrics
text one time window at a time (never the whole history in memory), and what
`fleet status` must then answer, computed from the same model.

The series, with Prometheus's ``job`` and ``instance`` labels written in (a
backfill has no scrape to add them): ``up``, ``vmshare_ksm_available``,
``vmshare_ksm_knob_run``, ``vmshare_ksm_saved_bytes`` (the sum of the VMs'
shares plus what no listed VM owns), ``vmshare_ksmd_cpu_seconds_total``,
``vmshare_snapshot_age_seconds``; per VM (``domain``, ``uuid``,
``trust_group``) ``vmshare_vm_saved_bytes``, ``vmshare_vm_mergeable`` and
``vmshare_vm_policy_merge``.

Host kinds, one each in every hundred hosts (hosts 1-5 of each hundred): an
exporter down for the last 30 min, KSM off, KSM unavailable, a stuck snapshot
(its age grows for the last 30 min), ksmd costing more than its saving is
worth; every hundredth host (0, 100, ...) has one VM whose merge state
differs from policy. The rest are ordinary.
"""

from __future__ import annotations

import math
import random
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from vmshare.fleet.status import DEFAULT_CPU_PRICE, DEFAULT_GIB_PRICE

PAGE = 4096
PHASES = 16
KINDS = {1: "down", 2: "off", 3: "unavailable", 4: "stuck", 5: "costly"}
FAULT_SPAN = 1800        # seconds before the end that down and stuck hosts are so
HOST_SERIES = 6
BOOT = 1_700_000_000     # when every host booted: ksmd's CPU counter starts there
VM_SERIES = 3


@dataclass(frozen=True)
class Vm:
    domain: str
    uuid: str
    group: str
    base_pages: int
    phase: int
    drifted: bool


@dataclass(frozen=True)
class Host:
    instance: str
    kind: str
    cores: float             # ksmd CPU, in cores
    other_pages: int         # pages_sharing no listed VM owns
    vms: tuple[Vm, ...]


def make_fleet(hosts: int, vms: int, seed: int = 11) -> list[Host]:
    rng = random.Random(seed)
    fleet = []
    for h in range(hosts):
        kind = KINDS.get(h % 100, "ok")
        small = kind == "costly"
        members = tuple(
            Vm(f"vm-{h:04d}-{v:02d}", str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
               f"tenant-{rng.randrange(20):02d}",
               rng.randrange(256, 2560) if small else rng.randrange(12800, 102400),
               rng.randrange(PHASES), drifted=(h % 100 == 0 and v == 0))
            for v in range(vms))
        # ordinary hosts: ksmd at 0.05-0.25% of a core per VM, well worth its saving
        cores = 0.6 if small else vms * rng.uniform(0.0005, 0.0025)
        fleet.append(Host(f"host-{h:04d}:9731", kind, cores,
                          rng.randrange(0, 2560), members))
    return fleet


def factors(t: int) -> list[float]:
    """Each phase's multiplier at time t: savings swing ±25% over a day."""
    return [1.0 + 0.25 * math.sin(2 * math.pi * (t / 86400 + p / PHASES)) for p in range(PHASES)]


def vm_saved(vm: Vm, host: Host, fac: list[float]) -> int:
    if host.kind in ("off", "unavailable"):
        return 0
    return int(vm.base_pages * fac[vm.phase]) * PAGE


def _labels(host: Host, vm: Vm | None = None) -> str:
    text = f'job="vmshare",instance="{host.instance}"'
    if vm is not None:
        text += f',domain="{vm.domain}",uuid="{vm.uuid}",trust_group="{vm.group}"'
    return text


@dataclass
class _Prepared:
    host: Host
    constant: list[str]              # "name{labels} value" that never changes
    saved: list[tuple[str, Vm]]      # "vmshare_vm_saved_bytes{labels} " per VM
    labels: str


def _prepare(host: Host) -> _Prepared:
    labels = _labels(host)
    constant = [f"vmshare_ksm_available{{{labels}}} {0 if host.kind == 'unavailable' else 1}"]
    if host.kind != "unavailable":
        constant.append(f"vmshare_ksm_knob_run{{{labels}}} {0 if host.kind == 'off' else 1}")
    merge = 0 if host.kind == "unavailable" else 1
    for vm in host.vms:
        vl = _labels(host, vm)
        constant.append(f"vmshare_vm_mergeable{{{vl}}} {merge}")
        constant.append(f"vmshare_vm_policy_merge{{{vl}}} {0 if vm.drifted else merge}")
    saved = [(f"vmshare_vm_saved_bytes{{{_labels(host, vm)}}} ", vm) for vm in host.vms]
    return _Prepared(host, constant, saved, labels)


def _host_lines(p: _Prepared, t: int, end: int, fac: list[float]) -> Iterator[str]:
    host = p.host
    if host.kind == "down" and t > end - FAULT_SPAN:
        yield f"up{{{p.labels}}} 0"
        return
    yield f"up{{{p.labels}}} 1"
    yield from p.constant
    total = host.other_pages * PAGE if host.kind not in ("off", "unavailable") else 0
    for prefix, vm in p.saved:
        value = vm_saved(vm, host, fac)
        total += value
        yield f"{prefix}{value}"
    stuck_since = end - FAULT_SPAN
    age = 3.0 + (t - stuck_since if host.kind == "stuck" and t > stuck_since else 0)
    yield f"vmshare_snapshot_age_seconds{{{p.labels}}} {age}"
    if host.kind != "unavailable":
        yield f"vmshare_ksm_saved_bytes{{{p.labels}}} {total}"
        cores = 0.0 if host.kind == "off" else host.cores
        yield f"vmshare_ksmd_cpu_seconds_total{{{p.labels}}} {cores * (t - BOOT):.3f}"


def write_window(out: TextIO, fleet: list[Host], start: int, stop: int, end: int,
                 interval: int) -> int:
    """Every sample with start <= t < stop (t on the interval grid, t <= end),
    timestamp-major, then ``# EOF``. Returns the number of samples written."""
    prepared = [_prepare(h) for h in fleet]
    first = -(-start // interval) * interval
    count = 0
    for t in range(first, min(stop, end + 1), interval):
        sep = f" {t}\n"
        fac = factors(t)
        lines = [line for p in prepared for line in _host_lines(p, t, end, fac)]
        out.write(sep.join(lines))
        out.write(sep)
        count += len(lines)
    out.write("# EOF\n")
    return count


@dataclass(frozen=True)
class Expected:
    hosts: int
    vms: int
    total_saved: int
    by_kind: dict[str, int]
    drifted: int
    top_saved: list[int]


def expected(fleet: list[Host], end: int, top: int) -> Expected:
    """What `fleet status --at END` must report for this fleet (default prices)."""
    fac = factors(end)
    live = [h for h in fleet if h.kind != "down"]
    kinds: dict[str, int] = {}
    for h in fleet:
        kinds[h.kind] = kinds.get(h.kind, 0) + 1
    kinds["costly"] = 0
    saved, total = [], 0
    for h in live:
        shares = [vm_saved(vm, h, fac) for vm in h.vms]
        saved += shares
        if h.kind in ("off", "unavailable"):
            continue
        host_saved = sum(shares) + h.other_pages * PAGE
        total += host_saved
        if h.cores * 3600 * DEFAULT_CPU_PRICE > host_saved / 2**30 * DEFAULT_GIB_PRICE:
            kinds["costly"] += 1
    return Expected(len(fleet), len(saved), total, kinds,
                    sum(1 for h in live for vm in h.vms if vm.drifted),
                    sorted(saved, reverse=True)[:top])
