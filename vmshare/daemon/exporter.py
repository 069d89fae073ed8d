"""Collect one metrics snapshot (vmshare.present.metrics.Snapshot): the host view,
each VM's policy decision (its trust group, whether it should merge), ksmd's CPU
time and whether a vmshare tuner runs. Used by `vmshare metrics` and the daemon.

What fails is recorded in the snapshot, one line per part, and the rest is
still collected: with libvirt down the kernel's counters are still served; a
VM that vanishes mid-collection is left out.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from vmshare.config import Config, DaemonSettings
from vmshare.daemon.metrics_http import serve
from vmshare.daemon.reconcile import Reconciler
from vmshare.daemon.rejects import Rejects
from vmshare.daemon.supervisor import Supervisor
from vmshare.errors import VmshareError
from vmshare.hypervisor.base import Hypervisor
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.observe.host import HostView, Observer
from vmshare.policy.sources import survey
from vmshare.present.metrics import DaemonFigures, Refresher, Snapshot, VmPolicyFacts, exposition
from vmshare.tuner.loop import KsmdClock, tuner_holder

log = logging.getLogger("vmshare.daemon.exporter")
T = TypeVar("T")
TAKE_TIMEOUT = 600.0     # seconds a snapshot may wait for the worker and take


class SnapshotSource:
    """Takes snapshots of one host for the exporter; ``scope``: domain name globs
    (none: every domain)."""

    def __init__(self, hv: Hypervisor | Callable[[], Hypervisor], sysfs: KsmSysfs,
                 procfs: ProcFs, config: Config, *, scope: Sequence[str] = (),
                 daemon_figures: Callable[[], DaemonFigures] | None = None) -> None:
        # the daemon passes a function: its connection is replaced on reconnect
        self.hv_of: Callable[[], Hypervisor] = hv if callable(hv) else (lambda: hv)
        self.sysfs = sysfs
        self.procfs = procfs
        self.config = config
        self.scope = tuple(scope)
        self.daemon_figures = daemon_figures
        self.clock = KsmdClock(procfs)

    def measured(self) -> Snapshot:
        """A snapshot with the wall-clock and CPU time of its own collection (for
        a caller that runs it in another thread than the Refresher's)."""
        cpu0, t0 = time.thread_time(), time.monotonic()
        snap = self()
        return replace(snap, duration=time.monotonic() - t0,
                       cpu_seconds=time.thread_time() - cpu0)

    def __call__(self) -> Snapshot:
        # the daemon's connection may have been replaced since the last snapshot
        hv = self.hv_of()
        observer = Observer(hv, self.sysfs, self.procfs, one_snapshot=True)
        errors: list[str] = []
        host = self._host(hv, observer, errors)
        policy: dict[str, VmPolicyFacts] = {}
        if host.vms:
            try:
                everyone = hv.list_vms()
                refs = [v.facts.ref for v in host.vms if v.facts.pid is not None]
                for view in survey(hv, self.config, refs, observer=observer,
                                   others=everyone):
                    policy[view.ref.name] = VmPolicyFacts(view.decision.group,
                                                          view.decision.merge)
            except VmshareError as exc:
                errors.append(f"policy: {exc}")
        ksmd: float | None = None
        if host.ksm_available:
            try:
                ksmd = self.clock.seconds()
            except VmshareError as exc:
                errors.append(f"ksmd CPU: {exc}")
        tuner: int | None = None
        try:
            tuner = tuner_holder()
        except VmshareError as exc:
            errors.append(f"tuner lock: {exc}")
        available: float | None = None
        try:
            available = float(self.procfs.meminfo()["MemAvailable"])
        except (VmshareError, KeyError) as exc:
            errors.append(f"meminfo: {exc}")
        for problem in errors:
            log.warning("metrics: %s", problem)
        return Snapshot(host=host, taken_at=time.time(), tuner_pid=tuner,
                        memory_available=available,
                        ksmd_cpu_seconds=ksmd, policy=policy, errors=tuple(errors),
                        daemon=self.daemon_figures() if self.daemon_figures else None)

    def _names(self, hv: Hypervisor) -> list[str] | None:
        if not self.scope:
            return None
        return [r.name for r in hv.list_vms()
                if any(fnmatch.fnmatchcase(r.name, g) for g in self.scope)]

    def _host(self, hv: Hypervisor, observer: Observer, errors: list[str]) -> HostView:
        try:
            names = self._names(hv)
            if names == []:
                return self._kernel_only(errors)
            return observer.host(names)
        except VmshareError as exc:
            errors.append(f"VMs: {exc}")
            return self._kernel_only(errors)

    def _kernel_only(self, errors: list[str]) -> HostView:
        try:
            ok = self.sysfs.available()
            return HostView(counters=self.sysfs.counters() if ok else {},
                            knobs=self.sysfs.knobs() if ok else {}, vms=(), ksm_available=ok)
        except VmshareError as exc:
            errors.append(f"KSM: {exc}")
            return HostView(counters={}, knobs={}, vms=(), ksm_available=False)


class _Options(Protocol):
    @property
    def config(self) -> Config:
        ...


class ExporterSeat(Protocol):
    """What the exporter needs of the daemon (the runner's Daemon is one)."""

    settings: DaemonSettings
    domains: tuple[str, ...]
    rejects: Rejects
    supervisor: Supervisor

    @property
    def opts(self) -> _Options:
        ...

    @property
    def rc(self) -> Reconciler:
        ...

    async def work(self, fn: Callable[[], T]) -> T:
        ...


async def run_exporter(seat: ExporterSeat, stop: asyncio.Event) -> None:
    """The daemon's /metrics (``[daemon] metrics_listen``): the same exporter as
    `vmshare metrics --listen`, one process per host. Snapshots are collected in
    the daemon's worker thread, between reconciles (never beside one), every
    ``metrics_interval`` seconds within ``metrics_cpu_budget`` percent of a core;
    the daemon's own figures (refused input, task deaths) are served with them.
    Raises UsageError when the address cannot be served (the supervisor logs it)."""
    settings = seat.settings
    loop = asyncio.get_running_loop()
    source = SnapshotSource(lambda: seat.rc.hv, seat.rc.sysfs, seat.rc.procfs, seat.opts.config,
                            scope=seat.domains,
                            daemon_figures=lambda: DaemonFigures(
                                dict(seat.rejects.counts), dict(seat.supervisor.deaths)))

    def take() -> Snapshot:
        future = asyncio.run_coroutine_threadsafe(seat.work(source.measured), loop)
        return future.result(timeout=TAKE_TIMEOUT)

    refresher = Refresher(take, interval=settings.metrics_interval,
                          cpu_budget=settings.metrics_cpu_budget / 100.0, take_measures=True)
    server = serve(settings.metrics_listen, lambda: exposition(refresher.latest()))
    thread = threading.Thread(target=server.serve_forever, name="vmshare-metrics-http",
                              daemon=True)
    thread.start()
    try:
        await asyncio.to_thread(refresher.start)
        log.info("serving Prometheus metrics on %s (every %g s, within %g%% of a core)",
                 server.url, settings.metrics_interval, settings.metrics_cpu_budget)
        await stop.wait()
    finally:
        await asyncio.to_thread(refresher.stop)
        server.shutdown()
        server.server_close()
