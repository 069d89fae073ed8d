"""Sharing-aware placement: which host a VM would share most with, from content
sketches (vmshare.records.sketchfile), and which moves across the fleet would
gain most (vmshare.fleet.rebalance).

A host's *extra saving* for a VM is what kernel KSM there would add to
pages_sharing by taking it, beyond what the VM shares with itself alone,
counting only the host's VMs of the VM's trust group (vmshare.engine.sampled:
sum over contents of f(h + v) - f(h) - f(v), estimated with a 95% interval).
For the host the VM is on now, the figure is what it gains there from the
others. Memory headroom comes from Prometheus: node_exporter's
node_memory_MemAvailable_bytes, else the vmshare exporter's
vmshare_host_memory_available_bytes; a VM fits where its resident pages fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmshare.engine import EngineConfig
from vmshare.engine.sampled import Contents, Estimate, Member, contents, extra_sharing
from vmshare.errors import PrometheusError, SketchError, UsageError
from vmshare.fleet.sketch_fetch import SketchFetcher, is_url
from vmshare.model import PAGE_SIZE
from vmshare.promapi.client import PromClient
from vmshare.records.sketchfile import Sketch, VmSketch, check_compatible, read_sketch, restrict

HEADROOM_QUERIES = ("node_memory_MemAvailable_bytes", "vmshare_host_memory_available_bytes")


@dataclass(frozen=True)
class Candidate:
    host: str
    extra: Estimate                # pages
    headroom_bytes: float | None   # None: no figure in Prometheus
    need_bytes: int
    peers: int                     # the host's VMs in the VM's trust group
    current: bool                  # the VM runs there now

    @property
    def fits(self) -> bool:
        return self.current or (self.headroom_bytes is not None
                                and self.headroom_bytes >= self.need_bytes)


@dataclass(frozen=True)
class Move:
    vm: str
    source: str
    target: str
    gain: Estimate                 # pages: extra there minus extra where it is
    need_bytes: int
    target_headroom_bytes: float


def load_sketches(sources: Sequence[str | Path], key_id: bytes,
                  fetcher: SketchFetcher | None = None) -> list[tuple[Path | str, Sketch]]:
    """Every host sketch in the given files, directories (``*.sketch``) and
    http(s) URLs (through ``fetcher``), all of ``key_id`` and one rate.
    Raises SketchError (none found, a bad file or answer), UsageError (a URL
    without a fetcher)."""
    files: list[Path] = []
    urls = [s for s in sources if is_url(s)]
    for p in (Path(s) for s in sources if not is_url(s)):
        if p.is_dir():
            files.extend(sorted(p.glob("*.sketch")))
        elif p.exists():
            files.append(p)
        else:
            raise SketchError(f"{p}: no such sketch file or directory")
    shown = ", ".join(map(str, sources))
    if not files and not urls:
        raise SketchError(f"no host sketches (*.sketch) in {shown}")
    if urls and fetcher is None:
        raise UsageError("--sketches URL needs a token file")
    sketches: list[tuple[Path | str, Sketch]] = [(f, read_sketch(f, key_id=key_id))
                                                 for f in files]
    if urls and fetcher is not None:
        sketches += zip(urls, fetcher.fetch_all([str(u) for u in urls]), strict=True)
    check_compatible([s for _, s in sketches], key_id, [str(f) for f, _ in sketches])
    hosts = [s.host for _, s in sketches]
    if len(set(hosts)) != len(hosts):
        dup = sorted({h for h in hosts if hosts.count(h) > 1})[0]
        raise SketchError(f"host {dup!r} has more than one sketch in {shown}")
    return sketches


def check_fresh(vm: VmSketch, hosts: Sequence[tuple[Path | str, Sketch]]) -> None:
    """Refuse a host sketch that describes ``vm`` (by name) as started before it
    really was: the VM restarted since, its memory in the sketch is gone.
    ``vm.started`` 0 (unknown) checks nothing. Raises SketchError."""
    if not vm.started:
        return
    for path, sk in hosts:
        for v in sk.vms:
            if v.name == vm.name and v.started and v.started < vm.started:
                raise SketchError(f"{path}: stale: it holds {vm.name} as started at "
                                  f"{_when(v.started)}, but {vm.name} was restarted at "
                                  f"{_when(vm.started)}; sketch host {sk.host!r} again")


def _when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def headroom(client: PromClient) -> dict[str, float]:
    """MemAvailable per host name (an instance label without its port), from
    node_exporter, else the vmshare exporter. Raises PrometheusError."""
    out: dict[str, float] = {}
    for expr in reversed(HEADROOM_QUERIES):      # node_exporter's figure wins
        for s in client.query(expr):
            inst = s.labels.get("instance", "")
            if math.isfinite(s.value):
                out[inst] = s.value
                out[inst.rsplit(":", 1)[0]] = s.value
    return out


def _member(v: VmSketch, threshold: int) -> Member:
    r = restrict(v, threshold)
    return Member(r.values, r.counts, r.heavy_values, r.heavy_counts, r.zero_pages,
                  r.decisions)


def _group(vms: Iterable[VmSketch], group: str | None, threshold: int, skip: str) -> Contents:
    return contents([_member(v, threshold) for v in vms if v.group == group and v.name != skip])


def extra_on(vm: VmSketch, vm_threshold: int, host: Sketch, config: EngineConfig,
             cache: dict[tuple[str, str | None, int], Contents] | None = None) -> Estimate:
    """The extra saving (pages) ``vm`` would have on ``host`` (without itself).
    ``cache`` keeps each host group's contents for the VMs not on that host."""
    thr = min(vm_threshold, host.effective)
    if cache is None or any(v.name == vm.name for v in host.vms):
        hc = _group(host.vms, vm.group, thr, vm.name)
    else:
        key = (host.host, vm.group, thr)
        if key not in cache:
            cache[key] = _group(host.vms, vm.group, thr, "")
        hc = cache[key]
    vc = contents([_member(vm, thr)])
    return extra_sharing(hc, vc, thr / 2**64, config.max_page_sharing, config.use_zero_pages)


def rank(vm: VmSketch, vm_threshold: int, hosts: Sequence[Sketch], room: dict[str, float],
         config: EngineConfig) -> list[Candidate]:
    """Hosts for ``vm``, best first: those it fits on, by extra saving then
    headroom; then the rest. Raises UsageError when it fits on none."""
    need = vm.pages * PAGE_SIZE
    out = []
    for h in hosts:
        peers = sum(1 for v in h.vms if v.group == vm.group and v.name != vm.name)
        out.append(Candidate(h.host, extra_on(vm, vm_threshold, h, config), room.get(h.host),
                             need, peers, any(v.name == vm.name for v in h.vms)))
    out.sort(key=lambda c: (not c.fits, -c.extra.value, -(c.headroom_bytes or 0.0), c.host))
    if out and not any(c.fits for c in out):
        known = [c.headroom_bytes for c in out if c.headroom_bytes is not None]
        most = f"{max(known) / 2**20:,.0f} MiB" if known else "none known"
        raise UsageError(f"{vm.name} needs {need / 2**20:,.0f} MiB, more than any host's "
                         f"memory headroom (largest: {most}); no placement")
    return out


def check_prometheus_has_hosts(room: dict[str, float], url: str) -> None:
    if not room:
        raise PrometheusError(f"{url}: no node_memory_MemAvailable_bytes nor "
                              "vmshare_host_memory_available_bytes series: no host headroom "
                              "known")
