"""Background work paced by a CPU budget: the metrics exporter's snapshots
(vmshare.present.metrics.Refresher) and the daemon's sketches
(vmshare.daemon.sketcher) both run a step now and then in their own thread and
must keep that thread's CPU within a fraction of one core, whatever the host's
size.

The rule, in one place: after a step that used ``cpu`` seconds of CPU, wait
at least ``cpu / budget`` seconds before the next, so over any run of steps
the thread's CPU is at most ``budget`` of the wall-clock time (a step's own
wall time is not counted as pause: the bound is conservative).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("vmshare.present.pacing")


def budget_pause(cpu_seconds: float, cpu_budget: float, due_in: float = 0.0) -> float:
    """Seconds to wait after a step that used ``cpu_seconds`` of CPU so the thread
    stays within ``cpu_budget`` (a fraction of one core, in (0, 1]), and never
    less than ``due_in`` (when the next step is due anyway)."""
    if not 0 < cpu_budget <= 1:
        raise ValueError("cpu_budget must be in (0, 1]")
    return max(due_in, max(0.0, cpu_seconds) / cpu_budget)


class PacedThread:
    """Runs ``step`` in a daemon thread until ``stop()``; each call returns how
    long to wait before the next (see ``budget_pause``). A step that raises is
    a bug of the caller's: logged with its traceback (once per hundred), then
    the loop waits ``on_error`` seconds and goes on, so the thread never dies
    silently."""

    def __init__(self, step: Callable[[], float], *, name: str, on_error: float) -> None:
        self.step = step
        self.name = name
        self.on_error = on_error
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, first_delay: float = 0.0) -> None:
        self._thread = threading.Thread(target=self._loop, args=(first_delay,),
                                        name=self.name, daemon=True)
        self._thread.start()

    def _loop(self, delay: float) -> None:
        while not self._stop.wait(delay):
            try:
                delay = self.step()
            except Exception:
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    log.exception("%s: internal error (%d so far); still running",
                                  self.name, self.errors)
                delay = self.on_error

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
