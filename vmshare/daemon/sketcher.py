"""The daemon's content sketches (``[sketch] interval``): each running VM in the
daemon's scope sketched from its live memory, as `vmshare sketch DOMAIN` does,
and the host's sketch, ``HOST.sketch`` in ``[sketch] dir`` (the file
`vmshare sketch` writes by default and `vmshare place --sketches DIR` reads),
rewritten atomically whenever one VM's part changes.

One step at a time, in a thread of its own: the libvirt side (which VMs run,
their trust groups, opening a VM's memory) runs as short steps in the daemon's
worker, between reconciles; reading and hashing the memory, the long part,
runs here, so the worker and the watchdog that follows it never wait for a
sketch. A VM is sketched again when its sketch is ``interval`` seconds old or
its QEMU process changed (restart, migration back, restore); a VM that stopped
or left the scope leaves the host sketch at the next look (at most
``RECHECK`` seconds, or ``interval`` when shorter). After each step the thread
waits long enough to keep its CPU (and the worker's share of the step) within
``[sketch] cpu_budget`` percent of one core (vmshare.present.pacing), so a
large VM is refreshed less often than asked rather than over budget. Samples
are taken at ``[sketch] rate``, at most ``max_entries`` per VM.

A missing or unsafe key, an unwritable directory, a VM that cannot be read:
one log line per distinct problem (again only after it was fixed and came
back), and the daemon goes on; the host sketch keeps its last good contents.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from vmshare.config import Config, SketchSettings
from vmshare.daemon.reconcile import Reconciler
from vmshare.errors import (
    DeadlineExceeded,
    DomainNotFound,
    DomainNotRunning,
    ProcessGone,
    VmshareError,
)
from vmshare.model import PAGE_SIZE
from vmshare.observe.host import Observer
from vmshare.prediction.sketch import process_started, sketch_pages
from vmshare.prediction.targets import domain_target, trust_groups
from vmshare.present.pacing import PacedThread, budget_pause
from vmshare.records.schema import printable
from vmshare.records.sketchfile import (
    Sketch,
    SketchKey,
    VmSketch,
    load_key,
    rate_threshold,
    restrict,
    write_sketch,
)
from vmshare.sources import PageSource

log = logging.getLogger("vmshare.daemon.sketcher")
T = TypeVar("T")
RECHECK = 10.0          # seconds between looks for VMs that restarted or went away
WORK_TIMEOUT = 600.0    # seconds a step may wait for the daemon's worker


@dataclass(frozen=True)
class Running:
    """A running VM as the sketcher tracks it: ``process`` (pid, start ticks)
    names its QEMU process for good, so a restart is seen even on a reused pid."""

    name: str
    process: tuple[int, int]
    started: int                 # Unix seconds, what the sketch records


@dataclass(frozen=True)
class Opened:
    """A VM's memory opened for reading (None: nothing eligible), its trust group."""

    source: PageSource | None
    group: str | None
    notes: tuple[str, ...] = ()


@dataclass
class _Held:
    vm: VmSketch
    threshold: int               # the threshold its sample obeys
    process: tuple[int, int]
    made: float                  # clock() when sketched


class Sketcher:
    """Keeps the host sketch fresh, one ``step()`` at a time (``PacedThread``
    calls it). ``running`` and ``opener`` are the libvirt side (run in the
    daemon's worker); each returns its result and the CPU seconds it used."""

    def __init__(self, settings: SketchSettings, *, host: str,
                 running: Callable[[], tuple[list[Running], float]],
                 opener: Callable[[Running], tuple[Opened, float]],
                 clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        if not settings.interval > 0:
            raise ValueError("the sketcher needs [sketch] interval > 0")
        self.settings = settings
        self.host = host
        self.path = settings.dir / f"{host}.sketch"
        self.running = running
        self.opener = opener
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.threshold = rate_threshold(settings.rate)
        self.max_entries = settings.max_entries
        self.budget = settings.cpu_budget / 100.0
        self.recheck = min(RECHECK, settings.interval)
        self.key: SketchKey | None = None
        self.held: dict[str, _Held] = {}
        self.failed: dict[str, tuple[tuple[int, int], float]] = {}   # name: (process, when)
        self.dirty = True            # the file does not yet hold what is held
        self.problems: dict[str, str] = {}
        self.sketched = 0            # VM sketches made
        self.sketch_cpu = 0.0        # CPU seconds they took
        self.sketch_pages = 0        # pages they read

    # -- one step ----------------------------------------------------------------------

    def step(self) -> float:
        """Look at the running VMs, sketch the most overdue one, rewrite the host
        sketch if anything changed. Returns the seconds to wait before the next step."""
        cpu0 = self.cpu_clock()
        if self._load_key() is None:
            return self.recheck
        try:
            running, worker_cpu = self.running()
        except VmshareError as exc:
            self._problem("list", f"cannot list the VMs to sketch: {exc}")
            return self.recheck
        self._clear("list")
        now = self.clock()
        self._forget_gone(running)
        due = self._due(running, now)
        if due:
            worker_cpu += self._sketch(due[0])
        if self.dirty:
            self._write()
        cpu = self.cpu_clock() - cpu0 + worker_cpu
        if len(due) > 1:
            return budget_pause(cpu, self.budget)
        return budget_pause(cpu, self.budget, min(self.recheck, self._next_due(self.clock())))

    def _forget_gone(self, running: Sequence[Running]) -> None:
        live = {r.name: r.process for r in running}
        for name in [n for n, h in self.held.items() if live.get(n) != h.process]:
            log.info("%s %s: its sketch leaves the host sketch", printable(name),
                     "restarted" if name in live else "is gone")
            del self.held[name]
            self.dirty = True
        for name in [n for n, (p, _) in self.failed.items() if live.get(n) != p]:
            del self.failed[name]

    def _due(self, running: Sequence[Running], now: float) -> list[Running]:
        """The VMs to sketch now, most overdue first (never sketched, then oldest)."""
        interval = self.settings.interval
        due = []
        for r in running:
            held = self.held.get(r.name)
            failed = self.failed.get(r.name)
            if failed is not None and now - failed[1] < interval:
                continue
            if held is None or now - held.made >= interval:
                due.append((held.made if held else float("-inf"), r.name, r))
        return [r for _, _, r in sorted(due, key=lambda d: (d[0], d[1]))]

    def _next_due(self, now: float) -> float:
        made = [h.made for h in self.held.values()] + [w for _, w in self.failed.values()]
        if not made:
            return self.settings.interval
        return max(0.0, min(made) + self.settings.interval - now)

    # -- sketching and writing ---------------------------------------------------------

    def _sketch(self, vm: Running) -> float:
        """Sketch one VM; returns the worker's CPU seconds spent opening it."""
        assert self.key is not None
        name = printable(vm.name)
        try:
            opened, worker_cpu = self.opener(vm)
        except (DomainNotFound, DomainNotRunning, ProcessGone):
            self.failed[vm.name] = (vm.process, self.clock())
            return 0.0              # stopped meanwhile: the next look drops it
        except VmshareError as exc:
            self.failed[vm.name] = (vm.process, self.clock())
            self._problem(f"vm:{vm.name}", f"{name}: cannot sketch: {exc}")
            return 0.0
        if opened.source is None:
            self.failed[vm.name] = (vm.process, self.clock())
            why = "; ".join(opened.notes) or f"{name}: nothing eligible to sketch"
            self._problem(f"vm:{vm.name}", f"{printable(why)}; left out of the host sketch")
            return worker_cpu
        cpu0 = self.cpu_clock()
        try:
            sk, thr = sketch_pages(opened.source, self.key, self.threshold, self.max_entries)
        except (ProcessGone, DomainNotRunning):
            self.failed[vm.name] = (vm.process, self.clock())
            return worker_cpu
        except VmshareError as exc:
            self.failed[vm.name] = (vm.process, self.clock())
            self._problem(f"vm:{vm.name}", f"{name}: cannot sketch: {exc}")
            return worker_cpu
        finally:
            opened.source.close()
        cpu = self.cpu_clock() - cpu0
        self._clear(f"vm:{vm.name}")
        self.held[vm.name] = _Held(replace(sk, name=vm.name, group=opened.group,
                                           started=vm.started), thr, vm.process, self.clock())
        self.failed.pop(vm.name, None)
        self.sketched += 1
        self.sketch_cpu += cpu
        self.sketch_pages += sk.pages
        gib = sk.pages * PAGE_SIZE / 2**30
        log.info("sketched %s: %d MiB read in %.2f s of CPU (%.2f s per GiB)", name,
                 sk.pages * PAGE_SIZE >> 20, cpu, cpu / gib if gib else 0.0)
        self.dirty = True
        return worker_cpu

    def host_sketch(self) -> Sketch:
        """The host's sketch of what is held now (every VM cut to the lowest threshold)."""
        assert self.key is not None
        low = min([h.threshold for h in self.held.values()], default=self.threshold)
        vms = tuple(restrict(self.held[n].vm, low) for n in sorted(self.held))
        return Sketch(self.host, self.key.key_id, self.threshold, low, int(time.time()), vms)

    def _write(self) -> None:
        try:
            write_sketch(self.path, self.host_sketch())
        except VmshareError as exc:
            self._problem("write", f"cannot write the host sketch: {exc}; "
                          "keeping the VMs' sketches in memory and trying again")
            return
        self._clear("write")
        self.dirty = False

    def _load_key(self) -> SketchKey | None:
        if self.key is None:
            try:
                self.key = load_key(self.settings.key_file)
            except VmshareError as exc:
                self._problem("key", f"no sketches: {exc}")
                return None
            if self._clear("key"):
                log.info("sketch key %s loaded: sketching resumes", self.settings.key_file)
        return self.key

    # -- logging each problem once ---------------------------------------------------

    def _problem(self, kind: str, message: str) -> None:
        if self.problems.get(kind) != message:
            log.error("%s", message)
            self.problems[kind] = message

    def _clear(self, kind: str) -> bool:
        return self.problems.pop(kind, None) is not None


# -- the daemon's side ------------------------------------------------------------------

def running_in_scope(hv: Any, procfs: Any, scope: Callable[[str], bool] | None) -> list[Running]:
    """The running VMs in ``scope`` with their QEMU process. Raises HypervisorError
    when the hypervisor cannot be listed; a VM that stops meanwhile is left out."""
    out = []
    for ref in hv.list_vms():
        if scope is not None and not scope(ref.name):
            continue
        try:
            pid = hv.facts(ref).pid
            if pid is None:
                continue
            out.append(Running(ref.name, (pid, procfs.start_time(pid)),
                               process_started(pid, procfs)))
        except (DomainNotFound, DomainNotRunning, ProcessGone):
            continue
    return out


def open_vm(hv: Any, observer: Any, config: Config, vm: Running) -> Opened:
    """``vm``'s eligible RAM, opened as `vmshare sketch DOMAIN` does, and its trust
    group. Raises what domain_target raises, PolicyError."""
    target = domain_target(hv, observer, vm.name, observer.procfs)
    groups, _ = trust_groups(hv, [target], config)
    source = target.open()
    return Opened(source, groups.get(vm.name), tuple(target.notes))


class _Options(Protocol):
    @property
    def config(self) -> Config:
        ...


class SketcherSeat(Protocol):
    """What the sketcher needs of the daemon (the runner's Daemon is one)."""

    scope: Callable[[str], bool] | None

    @property
    def opts(self) -> _Options:
        ...

    @property
    def rc(self) -> Reconciler:
        ...

    async def work(self, fn: Callable[[], T]) -> T:
        ...


def measured(fn: Callable[[], T]) -> Callable[[], tuple[T, float]]:
    """``fn`` returning also the CPU seconds its thread spent in it."""
    def call() -> tuple[T, float]:
        cpu0 = time.thread_time()
        result = fn()
        return result, time.thread_time() - cpu0
    return call


async def run_sketcher(seat: SketcherSeat, stop: asyncio.Event) -> None:
    """Keep the host sketch fresh until ``stop`` (``[sketch] interval`` > 0)."""
    config = seat.opts.config
    settings = config.sketch
    loop = asyncio.get_running_loop()

    def in_worker(fn: Callable[[], T]) -> tuple[T, float]:
        future = asyncio.run_coroutine_threadsafe(seat.work(measured(fn)), loop)
        try:
            return future.result(timeout=WORK_TIMEOUT)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise DeadlineExceeded(f"the daemon's worker did not take the sketcher's step "
                                   f"within {WORK_TIMEOUT:g} s") from exc

    def observer() -> Observer:     # the connection may have been replaced meanwhile
        return Observer(seat.rc.hv, seat.rc.sysfs, seat.rc.procfs)

    def running() -> tuple[list[Running], float]:
        return in_worker(lambda: running_in_scope(seat.rc.hv, seat.rc.procfs, seat.scope))

    def opener(vm: Running) -> tuple[Opened, float]:
        return in_worker(lambda: open_vm(seat.rc.hv, observer(), config, vm))

    sketcher = Sketcher(settings, host=socket.gethostname(), running=running, opener=opener)
    pacer = PacedThread(sketcher.step, name="vmshare-sketcher", on_error=sketcher.recheck)
    pacer.start()
    log.info("keeping %s fresh: each VM re-sketched every %g s at rate %.6g (at most %d "
             "samples), within %g%% of a core", sketcher.path, settings.interval,
             settings.rate, settings.max_entries, settings.cpu_budget)
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(pacer.stop)

