"""The daemon's asyncio main loop: events in, reconciles out, one at a time.

Triggers (libvirt events, QMP polls, the hook's spool, retries) go into one
queue; one consumer hands them, in order and de-duplicated, to the
Reconciler in a single worker thread (the adapters block, each call with a
deadline). Periodically the daemon observes every VM (the KSM pages that a
later reset is measured against) and reconciles everything (a safety net
for anything missed). When libvirtd goes away it reconnects with exponential
backoff up to ``[daemon] reconnect_max_seconds`` and then reconciles everything
(events were lost meanwhile). Sketches: vmshare.daemon.sketcher and .sketch_http.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from vmshare.config import Config
from vmshare.daemon import spool, wakeup
from vmshare.daemon.exporter import run_exporter
from vmshare.daemon.liveness import Liveness
from vmshare.daemon.reconcile import Outcome, Reconciler, Stats
from vmshare.daemon.rejects import Rejects
from vmshare.daemon.sketch_http import sketch_jobs
from vmshare.daemon.state import StateStore
from vmshare.daemon.supervisor import Supervisor, in_thread
from vmshare.daemon.triggers import QMP_EVENTS, HookSequence, Trigger, TriggerSink, backoff_delays
from vmshare.daemon.tuning import run_tuner
from vmshare.errors import HypervisorError, VmshareError
from vmshare.records.schema import printable

if TYPE_CHECKING:
    from vmshare.daemon.qmp_watch import QmpWatcher
    from vmshare.hypervisor.base import Hypervisor
    from vmshare.hypervisor.libvirt_events import LibvirtEvents

log = logging.getLogger("vmshare.daemon")
T = TypeVar("T")
EXIT_TASK_DIED = 70          # EX_SOFTWARE: a background task kept dying (a bug)
# Comma-separated name globs: the daemon manages only these domains (default: all). For hosts
# shared with other managers, and for tests that share one libvirtd with concurrent sessions.
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
        self.events: LibvirtEvents | None = None     # libvirt mode only
        self.lost = asyncio.Event()
        self.connected = asyncio.Event()
        self.scope = domain_scope(self.domains)
        # Refused input by kind, logged at a bounded rate: vmshare_daemon_bad_inputs_total
        self.rejects = Rejects(logging.getLogger("vmshare.daemon.spool"))
        self.supervisor = Supervisor()
        self.live = Liveness()   # READY, the watchdog and STATUS (service.py sends them)

    # -- plumbing ------------------------------------------------------------------

    async def work(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.live.timed(fn))

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
        sink = TriggerSink(self.deliver, self.on_disconnect)
        events = LibvirtEvents(self.opts.uri, sink, QMP_EVENTS, deadline=self.opts.deadline)
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

    def _set_hv(self, hv: Hypervisor) -> None:
        if self.reconciler is None:
            self.reconciler = Reconciler(hv, self.opts.config, state=self.state,
                                         audit_path=self.settings.audit_log,
                                         retry_after=self.opts.retry_after,
                                         scope=self.scope)
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
        changed = self.live.reconciled(outcomes)
        log.info("reconciled %d running VM(s) (%s): %d changed", len(outcomes), event, changed)
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
        """Take the hook's events (datagrams, then the spool) and deliver their triggers.

        Never raises: bad items are counted in ``self.rejects`` and set aside by
        the spool; a spool that cannot be read is logged and tried again at
        the next wake-up or resync.
        """
        events: list[spool.SpoolEvent] = []
        try:
            if sock is not None:
                events += [e for e in wakeup.drain_wakeups(sock, self.rejects) if not e.entry]
            events += spool.drain(self.settings.spool_dir, scope=self.scope,
                                  rejects=self.rejects)
        except VmshareError as exc:
            log.warning("cannot drain the hook spool: %s", exc)
        except Exception:   # a bug, not input: loud, and the daemon keeps serving
            log.exception("internal error draining the hook spool; still serving")
        for e in events:
            if self.scope is not None and not self.scope(e.domain):
                continue
            trigger = self.hooks.feed(e.domain, e.uuid, e.operation, e.sub_operation)
            log.debug("hook %s %s/%s -> %s", printable(e.domain), printable(e.operation),
                      printable(e.sub_operation), trigger)
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

    def _check_spool(self) -> None:
        """Refuse an unsafe spool and a second drainer before touching anything.

        Raises SpoolError (DaemonRunning for --once beside a running daemon)
        or AccessDenied.
        """
        spool.ensure_spool_dir(self.settings.spool_dir)
        if self.opts.once and wakeup.daemon_running(self.settings.socket):
            raise wakeup.DaemonRunning(
                f"a vmshare daemon is running (it answers on {self.settings.socket}); "
                "--once would take its spool entries and race its actions: stop it first")

    async def _run(self, stop: asyncio.Event) -> int:
        if self.opts.spool:
            self._check_spool()
        watcher: QmpWatcher | None = None
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
            sock = wakeup.bind_wakeup_socket(self.settings.socket)
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
            return await self._serve(stop, sock, watcher)
        finally:
            if sock is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(sock.fileno())
                sock.close()
                with contextlib.suppress(OSError):
                    self.settings.socket.unlink()

    async def _serve(self, stop: asyncio.Event, sock: socket.socket | None,
                     watcher: QmpWatcher | None) -> int:
        """Run the background tasks, each supervised, until ``stop``. Returns the exit
        status: EXIT_TASK_DIED when one kept dying."""
        if sock is not None:
            asyncio.get_running_loop().add_reader(sock.fileno(), lambda: self.drain_spool(sock))
        jobs: dict[str, Callable[[], Awaitable[None]]] = {
            "consume": lambda: self.consume(stop),
            "periodic": lambda: self.periodic(stop, sock),
        }
        if self.opts.tune if self.opts.tune is not None else self.settings.tune:
            jobs["tuner"] = lambda: run_tuner(self, stop)
        if self.settings.metrics_listen:
            jobs["metrics"] = lambda: run_exporter(self, stop)
        jobs.update(sketch_jobs(self, stop))
        if watcher is not None:
            jobs["qmp-watch"] = lambda: watcher.run(stop)
        else:
            jobs["libvirt-connection"] = lambda: self.watch_connection(stop)
        tasks = [asyncio.ensure_future(self.supervisor.run(name, job, stop))
                 for name, job in jobs.items()]
        log.info("running: %s", ", ".join(self.qmp_globs) if watcher else self.opts.uri)
        self.live.mark_ready()   # the wake-up socket is bound, the spool drained
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.supervisor.failed is not None:
            log.error("stopped because the %s task kept dying (see the tracebacks above)",
                      self.supervisor.failed)
            return EXIT_TASK_DIED
        return 0

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
            self.rejects.flush()

