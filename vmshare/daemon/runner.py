"""The daemon's asyncio main loop: events in, reconciles out, one at a time.

Triggers (libvirt events, QMP polls, the hook's spool, retries) go into one
queue; one consumer hands them, in order and de-duplicated, to the
Reconciler in a single worker thread (the adapters block, each call with a
deadline). Periodically the daemon observes every VM (the KSM pages that a
later reset is measured against) and reconciles everything (a safety net
for anything missed). When libvirtd goes away it reconnects with
exponential backoff up to ``[daemon] reconnect_max_seconds`` and then
reconciles everything, since events were lost meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vmshare.config import Config
from vmshare.daemon import spool
from vmshare.daemon.reconcile import Outcome, Reconciler, Stats
from vmshare.daemon.state import StateStore
from vmshare.daemon.triggers import (
    QMP_EVENTS,
    HookSequence,
    Trigger,
    backoff_delays,
    device_added_trigger,
    lifecycle_trigger,
    qmp_trigger,
)
from vmshare.errors import DeadlineExceeded, HypervisorError, UsageError, VmshareError

log = logging.getLogger("vmshare.daemon")
T = TypeVar("T")
# Comma-separated name globs: the daemon manages only these domains (default:
# all). For hosts shared with other managers, and for tests that share one
# libvirtd with concurrent test sessions.
DOMAINS_ENV = "VMSHARE_DAEMON_DOMAINS"


def domain_scope(globs: tuple[str, ...]) -> Callable[[str], bool] | None:
    """A predicate on VM names for ``globs`` (fnmatch), or None for all VMs."""
    if not globs:
        return None
    return lambda name: any(fnmatch.fnmatchcase(name, g) for g in globs)


@dataclass(frozen=True)
class DaemonOptions:
    config: Config
    once: bool = False
    uri: str = "qemu:///system"
    qmp_globs: tuple[str, ...] = ()
    observe_interval: float = 10.0
    resync_interval: float = 60.0
    deadline: float = 10.0
    retry_after: float = 30.0
    spool: bool = True
    domains: tuple[str, ...] = ()     # name globs to manage; () = every VM
    tune: bool | None = None          # run the KSM tuner; None: [daemon] tune


class Daemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.settings = opts.config.daemon
        self.qmp_globs = opts.qmp_globs or self.settings.qmp_sockets
        self.domains = opts.domains or tuple(
            g.strip() for g in os.environ.get(DOMAINS_ENV, "").split(",") if g.strip())
        self.queue: asyncio.Queue[Trigger] = asyncio.Queue()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "vmshare-reconcile")
        self.state = StateStore(self.settings.state_file)
        self.reconciler: Reconciler | None = None
        self.hooks = HookSequence()
        self.stats = Stats()
        self.events: Any = None          # LibvirtEvents in libvirt mode
        self.lost = asyncio.Event()
        self.connected = asyncio.Event()

    # -- plumbing ------------------------------------------------------------------

    async def work(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def deliver(self, trigger: Trigger) -> None:
        self.queue.put_nowait(trigger)

    def on_disconnect(self, why: str) -> None:
        if self.connected.is_set():
            log.warning("%s; reconnecting", why)
        self.connected.clear()
        self.lost.set()

    # -- connecting ----------------------------------------------------------------

    async def connect_libvirt(self) -> None:
        """Open the event connection and the adapter. Raises HypervisorError."""
        from vmshare.hypervisor.libvirt import LibvirtHypervisor
        from vmshare.hypervisor.libvirt_events import LibvirtEvents, register_event_loop
        register_event_loop(asyncio.get_running_loop())
        events = LibvirtEvents(self.opts.uri, _TriggerSink(self), QMP_EVENTS,
                               deadline=self.opts.deadline)
        await in_thread(events.open, self.opts.deadline, f"connect to {self.opts.uri}")
        try:
            hv = await in_thread(lambda: LibvirtHypervisor(self.opts.uri, self.opts.deadline),
                                 self.opts.deadline * 2, f"connect to {self.opts.uri}")
        except BaseException:
            events.close()
            raise
        old_events, self.events = self.events, events
        if old_events is not None:
            await in_thread(old_events.close, self.opts.deadline, "close old connection")
        self._set_hv(hv)
        self.lost.clear()
        self.connected.set()

    def _set_hv(self, hv: Any) -> None:
        if self.reconciler is None:
            self.reconciler = Reconciler(hv, self.opts.config, state=self.state,
                                         audit_path=self.settings.audit_log,
                                         retry_after=self.opts.retry_after,
                                         scope=domain_scope(self.domains))
            if self.domains:
                log.info("managing only domains matching %s", ", ".join(self.domains))
        else:
            old = self.reconciler.hv
            self.reconciler.hv = hv
            with contextlib.suppress(VmshareError):
                self.pool.submit(old.close)

    async def reconnect(self, stop: asyncio.Event) -> bool:
        """Reconnect with exponential backoff; False when stopped first."""
        for delay in backoff_delays(self.settings.reconnect_max_seconds):
            if stop.is_set():
                return False
            try:
                await self.connect_libvirt()
            except (VmshareError, OSError) as exc:
                log.warning("libvirt still unreachable (%s); next try in %.1f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            log.info("reconnected to %s", self.opts.uri)
            return True
        return False   # pragma: no cover - backoff_delays never ends

    # -- reconciling ---------------------------------------------------------------

    @property
    def rc(self) -> Reconciler:
        assert self.reconciler is not None
        return self.reconciler

    async def reconcile_all(self, event: str) -> list[Outcome]:
        try:
            outcomes = await self.work(lambda: self.rc.reconcile_all(event))
        except HypervisorError as exc:
            log.warning("cannot reconcile (%s): %s", event, exc)
            log.debug("detail", exc_info=True)
            self._check_connection()
            return []
        self.stats.add(outcomes)
        changed = [o for o in outcomes if o.status == "changed"]
        log.info("reconciled %d running VM(s) (%s): %d changed", len(outcomes), event,
                 len(changed))
        return outcomes

    async def observe(self) -> None:
        try:
            await self.work(self.rc.observe)
        except (VmshareError, OSError) as exc:
            log.warning("cannot observe VMs: %s", exc)
            log.debug("detail", exc_info=True)
            self._check_connection()

    def _check_connection(self) -> None:
        if self.events is not None and not self.events.alive():
            self.on_disconnect("libvirt calls fail and the connection is dead")

    async def handle(self, batch: list[Trigger]) -> None:
        seen: set[tuple[str, str, str | None]] = set()
        for t in batch:
            key = (t.uuid or t.vm, t.action, t.resets)
            if key in seen:
                continue
            seen.add(key)
            try:
                outcome = await self.work(lambda t=t: self.rc.handle(t))   # type: ignore[misc]
            except (VmshareError, OSError) as exc:
                log.warning("%s: cannot handle %s: %s", t.vm, t.event, exc)
                log.debug("detail", exc_info=True)
                self._check_connection()
                continue
            self.stats.add(outcome)
            if outcome.status == "failed":
                self._check_connection()

    async def consume(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            getter = asyncio.ensure_future(self.queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            batch = [getter.result()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if self.connected.is_set():
                await self.handle(batch)
            # while disconnected, the reconcile after reconnecting covers these

    # -- spool -----------------------------------------------------------------------

    def drain_spool(self, sock: socket.socket | None) -> None:
        events: list[spool.SpoolEvent] = []
        try:
            if sock is not None:
                events += [e for e in spool.drain_wakeups(sock) if not e.entry]
            events += spool.drain(self.settings.spool_dir)
        except VmshareError as exc:
            log.warning("cannot drain the hook spool: %s", exc)
            return
        for e in events:
            trigger = self.hooks.feed(e.domain, e.uuid, e.operation, e.sub_operation)
            log.debug("hook %s %s/%s -> %s", e.domain, e.operation, e.sub_operation, trigger)
            if trigger is not None:
                self.deliver(trigger)

    # -- main ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (or once). Returns the exit status."""
        try:
            return await self._run(stop)
        finally:
            if self.events is not None:
                with contextlib.suppress(Exception):
                    self.events.close()
            if self.reconciler is not None:
                with contextlib.suppress(Exception):
                    self.reconciler.hv.close()
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, stop: asyncio.Event) -> int:
        watcher = None
        if self.qmp_globs:
            from vmshare.daemon.qmp_watch import QmpWatcher
            from vmshare.hypervisor.qmp_fleet import QmpFleet
            fleet = QmpFleet(self.opts.deadline)
            watcher = QmpWatcher(self.qmp_globs, fleet, self.deliver)
            self._set_hv(fleet)
            await watcher.poll_once()
            while not self.queue.empty():   # the first poll's "appeared": covered below
                self.queue.get_nowait()
            self.connected.set()
        elif self.opts.once:
            await self.connect_libvirt()
        else:
            if not await self.reconnect(stop):
                return 0
        written = await self.work(self.rc.complete_pending)
        if written:
            log.info("audited %d action(s) the previous run made before it stopped", written)
        sock = None
        if self.opts.spool and not self.opts.once:
            sock = spool.bind_wakeup_socket(self.settings.socket)
        try:
            if self.opts.spool:
                self.drain_spool(sock)
                batch = []
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                await self.handle(batch)
            await self.reconcile_all("daemon-start")
            await self.observe()
            if self.opts.once:
                return 0
            loop = asyncio.get_running_loop()
            if sock is not None:
                loop.add_reader(sock.fileno(), lambda: self.drain_spool(sock))
            tasks = [asyncio.ensure_future(self.consume(stop)),
                     asyncio.ensure_future(self.periodic(stop, sock))]
            if self.opts.tune if self.opts.tune is not None else self.settings.tune:
                tasks.append(asyncio.ensure_future(self.tune(stop)))
            if watcher is not None:
                tasks.append(asyncio.ensure_future(watcher.run(stop)))
            else:
                tasks.append(asyncio.ensure_future(self.watch_connection(stop)))
            log.info("running: %s", ", ".join(self.qmp_globs) if watcher else self.opts.uri)
            await stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return 0
        finally:
            if sock is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(sock.fileno())
                sock.close()
                with contextlib.suppress(OSError):
                    self.settings.socket.unlink()

    async def watch_connection(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            lost = asyncio.ensure_future(self.lost.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({lost, stopper}, return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            if await self.reconnect(stop):
                await self.reconcile_all("reconnect")

    async def periodic(self, stop: asyncio.Event, sock: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        next_observe = loop.time() + self.opts.observe_interval
        next_resync = loop.time() + self.opts.resync_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set() or not self.connected.is_set():
                continue
            for name in self.rc.due():
                self.deliver(Trigger(name, "apply", "retry"))
            now = loop.time()
            if now >= next_observe:
                next_observe = now + self.opts.observe_interval
                await self.observe()
            if now >= next_resync:
                next_resync = now + self.opts.resync_interval
                if self.opts.spool:
                    self.drain_spool(sock)
                await self.reconcile_all("periodic")

    async def tune(self, stop: asyncio.Event) -> None:
        """The KSM tuner's loop (vmshare.tuner.loop), in the worker thread between
        reconciles: it owns run, pages_to_scan and sleep_millisecs while the
        daemon runs, audit-logs each change as actor "tuner", never unmerges,
        and leaves the knobs as they are when the daemon stops."""
        from vmshare.config import TunerPolicy
        from vmshare.records.audit import AuditLog
        from vmshare.tuner.loop import OWNED_KNOBS, Tuner, check_advisor, tuner_lock

        rc = self.rc
        audit = AuditLog(self.settings.audit_log, actor="tuner")
        policy = TunerPolicy(cpu_budget_pct=self.settings.tune_cpu_budget)
        held = contextlib.ExitStack()

        def setup() -> Tuner:
            try:
                check_advisor(rc.sysfs, False, False, audit)
            except UsageError as exc:
                raise UsageError("the kernel's KSM advisor is on (advisor_mode=scan-time) "
                                 "and owns pages_to_scan; switch it off (vmshare ksm set "
                                 "advisor_mode=none) to let the daemon tune") from exc
            held.enter_context(tuner_lock())
            tuner = Tuner(rc.sysfs, rc.procfs, policy, audit)
            tuner.start()
            return tuner

        with held:
            try:
                tuner = await self.work(setup)
            except (VmshareError, OSError) as exc:
                log.error("KSM tuner not started: %s", exc)
                return
            log.info("KSM tuner: owning %s, a decision every %g s, ksmd CPU budget %g%% "
                     "of a core", ", ".join(OWNED_KNOBS), self.settings.tune_interval,
                     policy.cpu_budget_pct)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.tune_interval)
                if stop.is_set():
                    return
                try:
                    _obs, decision, changes = await self.work(tuner.step)
                except (VmshareError, OSError) as exc:
                    log.warning("KSM tuner: %s", exc)
                    continue
                if changes:
                    log.info("KSM tuner %s: %s (%s)", decision.mode,
                             ", ".join(f"{n} {b} -> {a}" for n, b, a in changes),
                             decision.reason)


class _TriggerSink:
    """Turns the libvirt adapter's raw events into the daemon's triggers."""

    def __init__(self, runner: Daemon) -> None:
        self.runner = runner

    def lifecycle(self, name: str, uuid: str | None, event: int, detail: int) -> None:
        trigger = lifecycle_trigger(name, uuid, event, detail)
        if trigger is not None:
            self.runner.deliver(trigger)

    def device_added(self, name: str, uuid: str | None, alias: str) -> None:
        self.runner.deliver(device_added_trigger(name, uuid, alias))

    def qmp_event(self, name: str, uuid: str | None, event: str,
                  data: dict[str, Any]) -> None:
        trigger = qmp_trigger(name, uuid, event, data)
        if trigger is not None:
            self.runner.deliver(trigger)

    def disconnected(self, reason: str) -> None:
        self.runner.on_disconnect(reason)


async def in_thread(fn: Callable[[], Any], deadline: float, what: str) -> Any:
    """Run a blocking call in the default executor with a deadline."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(None, fn), deadline)
    except TimeoutError as exc:
        raise DeadlineExceeded(f"{what}: no answer within {deadline:g} s") from exc
