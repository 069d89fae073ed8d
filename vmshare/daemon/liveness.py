"""The daemon's health as the service manager sees it: READY, the watchdog, STATUS.

The daemon does its work in two places: the asyncio event loop (events, the
spool, the schedule) and one worker thread (every reconcile, observation
and tuner step; the adapters block there, each call under a deadline). The
watchdog ping has to mean both are alive, so ``keep_alive`` runs as a task
on the event loop (a blocked loop sends nothing) and pings only while the
worker is idle or its current step started less than half the watchdog
timeout ago (a step stuck in a call without a deadline, or waiting on a
lock another process never lets go, stops the pings and systemd restarts
the daemon). A step shorter than the watchdog timeout can never get the
daemon killed; one stuck for longer than 1.5 times the timeout always does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from vmshare.daemon.notify import Notifier

if TYPE_CHECKING:
    from vmshare.daemon.reconcile import Outcome

log = logging.getLogger("vmshare.daemon")
T = TypeVar("T")

STATUS_EVERY = 5.0      # seconds between STATUS checks (and pings, when that is sooner)


@dataclass
class Liveness:
    """What the worker is doing and what the last full reconcile found.
    ``on_ready`` runs once, when the daemon first serves."""

    clock: Callable[[], float] = time.monotonic
    busy_since: float | None = None
    watched: int | None = None          # running VMs in scope at the last reconcile
    changed: int = 0
    last_reconcile: float | None = None  # wall clock (time.time)
    on_ready: Callable[[], object] | None = None
    ready: bool = field(default=False)
    status_sent: str = ""               # the STATUS= text the manager last got

    def timed(self, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn`` wrapped to record, in the worker thread, when it starts and ends."""
        def step() -> T:
            self.busy_since = self.clock()
            try:
                return fn()
            finally:
                self.busy_since = None
        return step

    def stalled(self, limit: float) -> float | None:
        """How long the worker's current step has run, when that exceeds ``limit``."""
        since = self.busy_since
        if since is None:
            return None
        age = self.clock() - since
        return age if age > limit else None

    def reconciled(self, outcomes: Sequence[Outcome]) -> int:
        """Note a full reconcile's outcomes; returns how many changed a VM."""
        self.watched = len(outcomes)
        self.changed = sum(o.status == "changed" for o in outcomes)
        self.last_reconcile = time.time()
        return self.changed

    def mark_ready(self) -> None:
        if not self.ready:
            self.ready = True
            if self.on_ready is not None:
                self.on_ready()

    def summary(self) -> str:
        """"watching 3 domains, last reconcile 12:01:05 (1 changed)", or what
        it is still waiting for."""
        if self.last_reconcile is None or self.watched is None:
            return "starting: no reconcile yet"
        when = time.strftime("%H:%M:%S", time.localtime(self.last_reconcile))
        noun = "domain" if self.watched == 1 else "domains"
        return f"watching {self.watched} {noun}, last reconcile {when} ({self.changed} changed)"


async def keep_alive(notifier: Notifier, live: Liveness, status: Callable[[], str],
                     stop: asyncio.Event) -> None:
    """Until ``stop``: ping the watchdog (every half timeout, at most STATUS_EVERY
    apart) while the worker is not stuck, and send STATUS when it changes."""
    if not notifier.enabled:
        return
    limit = notifier.watchdog / 2 if notifier.watchdog else None
    period = min(limit, STATUS_EVERY) if limit else STATUS_EVERY
    loop = asyncio.get_running_loop()
    warned = False
    tick = loop.time()
    while not stop.is_set():
        stuck = live.stalled(limit) if limit else None
        if stuck is None:
            if limit:
                notifier.ping()
            text, warned = status(), False
        else:
            text = (f"not feeding the watchdog: one worker step has run for {stuck:.0f} s "
                    f"(timeout {notifier.watchdog:g} s)")
            if not warned:
                log.warning("%s; systemd will restart the daemon unless it finishes", text)
                warned = True
        if text != live.status_sent:
            notifier.status(text)
            live.status_sent = text
        tick = max(tick + period, loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), tick - loop.time())

