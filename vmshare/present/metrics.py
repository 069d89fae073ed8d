"""Prometheus metrics of one host: a prometheus_client Collector over one snapshot.

A scrape never measures: it renders the last ``Snapshot`` (taken in the
background by ``Refresher`` at a set interval within a CPU budget), so its
cost is the same on a 4 GiB host and a 256 GiB one, and every figure in one
scrape comes from the same moment. The snapshot's age and cost are exported
with it; parts that could not be collected are counted in
``vmshare_scrape_errors`` and the rest is still served.

Naming: ``vmshare_`` prefix, base units (``_bytes``, ``_seconds``), ``_total``
on counters. The kernel's KSM counters keep the kernel's names and meanings
(vmshare.model.COUNTER_MEANINGS; they count pages); per-VM series carry the
labels ``domain``, ``uuid`` and ``trust_group``. HELP texts are the meanings
defined once in vmshare.model, or below for what only the exporter reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vmshare.model import COUNTER_MEANINGS, PAGE_SIZE, VM_FIGURE_MEANINGS
from vmshare.observe.host import HostView, VmView
from vmshare.present.pacing import PacedThread, budget_pause

log = logging.getLogger("vmshare.present.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MONOTONIC = {"full_scans", "pages_scanned", "pages_skipped"}
KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages",
         "merge_across_nodes")
VM_LABELS = ("domain", "uuid", "trust_group")
#: figures only the exporter reports; the rest are vmshare.model's meanings
EXPORT_MEANINGS = {
    "ksm_available": "1 if kernel KSM exists on this host",
    "ksm_tuner_running": "1 while a vmshare tuner (vmshare tune or daemon --tune) owns run, "
                         "pages_to_scan and sleep_millisecs",
    "ksm_saved_bytes": "pages_sharing in bytes: memory the kernel's KSM saves on this host",
    "ksmd_cpu_seconds": "CPU time the ksmd kernel thread has used since boot",
    "vm_mergeable": "1 if any mapping of the VM's QEMU process is mergeable (MADV_MERGEABLE)",
    "vm_policy_merge": "1 if the VM's policy decision is to merge its RAM, 0 if not",
    "other_saved_bytes": "pages_sharing not attributed to a listed VM, in bytes",
    "snapshot_age_seconds": "seconds since the figures served were collected",
    "host_memory_available_bytes": "MemAvailable of /proc/meminfo: memory this host can "
                                   "still give without swapping (vmshare place's headroom)",
    "snapshot_duration_seconds": "wall-clock seconds the last collection took",
    "snapshot_cpu_seconds": "CPU seconds the last collection cost this process",
    "scrape_errors": "parts of the last collection that failed (the rest is still served)",
    "daemon_bad_inputs": "input the daemon refused and set aside (spool entries, datagrams), "
                         "by kind",
    "daemon_task_deaths": "times a daemon background task died and was restarted, by task",
}


@dataclass(frozen=True)
class VmPolicyFacts:
    trust_group: str
    merge: bool


@dataclass(frozen=True)
class DaemonFigures:
    """What only a running daemon knows: refused input by kind, task deaths by task."""

    bad_inputs: Mapping[str, int] = field(default_factory=dict)
    task_deaths: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    """One collection: the host view (None when not even KSM could be read) and
    what went wrong, each problem one line."""

    host: HostView | None
    taken_at: float                      # Unix time the collection finished
    duration: float = 0.0
    cpu_seconds: float = 0.0
    tuner_pid: int | None = None
    ksmd_cpu_seconds: float | None = None
    policy: Mapping[str, VmPolicyFacts] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    daemon: DaemonFigures | None = None
    memory_available: float | None = None   # MemAvailable, bytes (vmshare place's headroom)


def _gauge(name: str, meaning: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"vmshare_{name}", meaning, labels=list(labels))


class SnapshotCollector:
    """prometheus_client Collector rendering the latest snapshot (``latest()``)."""

    def __init__(self, latest: Callable[[], Snapshot | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.latest = latest
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        if snap is None:
            errors = _gauge("scrape_errors", EXPORT_MEANINGS["scrape_errors"])
            errors.add_metric([], 1)
            yield errors
            return
        yield from self._snapshot_families(snap)
        if snap.daemon is not None:
            yield from self._daemon_families(snap.daemon)
        if snap.host is not None:
            yield from self._host_families(snap, snap.host)
            yield from self._vm_families(snap, snap.host)

    def _snapshot_families(self, snap: Snapshot) -> Iterator[Metric]:
        for name, value in (("snapshot_age_seconds", max(0.0, self.clock() - snap.taken_at)),
                            ("snapshot_duration_seconds", snap.duration),
                            ("snapshot_cpu_seconds", snap.cpu_seconds),
                            ("scrape_errors", float(len(snap.errors)))):
            g = _gauge(name, EXPORT_MEANINGS[name])
            g.add_metric([], value)
            yield g
        if snap.memory_available is not None:
            mem = _gauge("host_memory_available_bytes",
                         EXPORT_MEANINGS["host_memory_available_bytes"])
            mem.add_metric([], snap.memory_available)
            yield mem
        tuner = _gauge("ksm_tuner_running", EXPORT_MEANINGS["ksm_tuner_running"])
        tuner.add_metric([], 0 if snap.tuner_pid is None else 1)
        yield tuner
        if snap.ksmd_cpu_seconds is not None:
            cpu = CounterMetricFamily("vmshare_ksmd_cpu_seconds",
                                      EXPORT_MEANINGS["ksmd_cpu_seconds"])
            cpu.add_metric([], snap.ksmd_cpu_seconds)
            yield cpu

    def _daemon_families(self, figures: DaemonFigures) -> Iterator[Metric]:
        for name, label, values in (("daemon_bad_inputs", "kind", figures.bad_inputs),
                                    ("daemon_task_deaths", "task", figures.task_deaths)):
            fam = CounterMetricFamily(f"vmshare_{name}", EXPORT_MEANINGS[name],
                                      labels=[label])
            for key, count in sorted(values.items()):
                fam.add_metric([key], count)
            yield fam

    def _host_families(self, snap: Snapshot, host: HostView) -> Iterator[Metric]:
        available = _gauge("ksm_available", EXPORT_MEANINGS["ksm_available"])
        available.add_metric([], 1 if host.ksm_available else 0)
        yield available
        for name, value in sorted(host.counters.items()):
            meaning = COUNTER_MEANINGS.get(name, name)
            fam: Metric
            if name in MONOTONIC:
                fam = CounterMetricFamily(f"vmshare_ksm_{name}", meaning)
            else:
                fam = GaugeMetricFamily(f"vmshare_ksm_{name}", meaning)
            fam.add_metric([], value)
            yield fam
        if "pages_sharing" in host.counters:
            saved = _gauge("ksm_saved_bytes", EXPORT_MEANINGS["ksm_saved_bytes"])
            saved.add_metric([], host.counters["pages_sharing"] * PAGE_SIZE)
            yield saved
        for knob in KNOBS:
            setting = host.knobs.get(knob)
            if isinstance(setting, int):
                g = _gauge(f"ksm_knob_{knob}", f"the KSM knob {knob} in force")
                g.add_metric([], setting)
                yield g
        if host.ksm_available:
            other = _gauge("other_saved_bytes", EXPORT_MEANINGS["other_saved_bytes"])
            other.add_metric([], round(host.other_saved_pages * PAGE_SIZE))
            yield other

    def _vm_families(self, snap: Snapshot, host: HostView) -> Iterator[Metric]:
        figures: dict[str, tuple[str, Callable[[VmView], float]]] = {
            "ram_bytes": (VM_FIGURE_MEANINGS["ram_bytes"], lambda v: v.ram_bytes),
            "resident_bytes": (VM_FIGURE_MEANINGS["resident_pages"] + ", in bytes",
                               lambda v: v.resident_pages * PAGE_SIZE),
            "ksm_bytes": (VM_FIGURE_MEANINGS["ksm_pages"] + ", in bytes",
                          lambda v: v.ksm_pages * PAGE_SIZE),
            "saved_bytes": (VM_FIGURE_MEANINGS["saved_bytes"] + ", in bytes",
                            lambda v: v.saved_bytes),
            "zero_page_bytes": (VM_FIGURE_MEANINGS["zero_pages"] + ", in bytes",
                                lambda v: v.ksm_stat.ksm_zero_pages * PAGE_SIZE),
            "rmap_items": (VM_FIGURE_MEANINGS["rmap_items"], lambda v: v.ksm_stat.ksm_rmap_items),
            "process_profit_bytes": (VM_FIGURE_MEANINGS["process_profit_bytes"],
                                     lambda v: v.ksm_stat.ksm_process_profit),
            "mergeable": (EXPORT_MEANINGS["vm_mergeable"],
                          lambda v: 1 if v.other_mergeable
                          or any(b.mg_flag for b in v.backends) else 0),
        }
        fams = {k: _gauge(f"vm_{k}", meaning, VM_LABELS) for k, (meaning, _) in figures.items()}
        policy = _gauge("vm_policy_merge", EXPORT_MEANINGS["vm_policy_merge"], VM_LABELS)
        shares = _gauge("vm_shares_with_bytes", VM_FIGURE_MEANINGS["shares_with"],
                        (*VM_LABELS, "peer"))
        for vm in host.vms:
            if vm.facts.pid is None:
                continue
            facts = snap.policy.get(vm.name)
            labels = [vm.name, vm.facts.ref.uuid, facts.trust_group if facts else ""]
            for key, (_, value) in figures.items():
                fams[key].add_metric(labels, value(vm))
            if facts is not None:
                policy.add_metric(labels, 1 if facts.merge else 0)
            for peer, pages in sorted(vm.shares_with_pages.items()):
                shares.add_metric([*labels, peer], pages * PAGE_SIZE)
        yield from fams.values()
        yield policy
        yield shares


def exposition(snapshot: Snapshot | None, clock: Callable[[], float] = time.time) -> str:
    """The text exposition (format 0.0.4) of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot, clock))
    return generate_latest(registry).decode()


class Refresher:
    """Takes snapshots in a background thread: every ``interval`` seconds, but
    never more often than keeps this thread's collection CPU within
    ``cpu_budget`` (a fraction of one core). ``latest()`` is what scrapes serve.

    A collection that raises is logged once per kind and counted; the previous
    snapshot keeps being served (its age shows it). The thread is a daemon
    thread; ``stop()`` ends it.

    ``take_measures=True``: ``take`` runs the collection in another thread and
    fills in its snapshot's ``duration`` and ``cpu_seconds`` itself (this
    thread's CPU would not be the collection's); otherwise they are measured
    here around ``take``.
    """

    def __init__(self, take: Callable[[], Snapshot], *, interval: float = 30.0,
                 cpu_budget: float = 0.01, take_measures: bool = False) -> None:
        if not (interval > 0 and 0 < cpu_budget <= 1):
            raise ValueError("interval must be > 0 and cpu_budget in (0, 1]")
        self.take = take
        self.interval = interval
        self.cpu_budget = cpu_budget
        self.take_measures = take_measures
        self.failures = 0
        self._latest: Snapshot | None = None
        self._lock = threading.Lock()
        self._pacer = PacedThread(self.refresh, name="vmshare-metrics-refresh",
                                  on_error=interval)

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._latest

    def refresh(self) -> float:
        """Take one snapshot now; returns how long to wait before the next."""
        cpu0, t0 = time.thread_time(), time.monotonic()
        try:
            snap = self.take()
        except Exception as exc:       # never let the refresher die: count and go on
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                log.error("metrics collection failed (%d so far): %s: %s", self.failures,
                          type(exc).__name__, exc)
            log.debug("detail", exc_info=True)
            return self.interval
        if not self.take_measures:
            snap = replace(snap, duration=time.monotonic() - t0,
                           cpu_seconds=time.thread_time() - cpu0)
        cpu = snap.cpu_seconds
        with self._lock:
            self._latest = snap
        return budget_pause(cpu, self.cpu_budget, self.interval)

    def start(self) -> None:
        self._pacer.start(self.refresh())   # the first scrape already has figures

    def stop(self) -> None:
        self._pacer.stop()
