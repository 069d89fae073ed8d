"""Background tasks of the daemon, supervised: a task that dies is never silent.

A task that raises is logged at ERROR with its traceback and started again
a second later. One that dies TASK_DEATHS times within TASK_DEATH_WINDOW
seconds stops the daemon (``failed`` names it; the runner exits with status
70): a daemon that looks healthy while it has stopped reconciling is the
worst way to fail, and a supervisor (systemd) restarting a visibly failed
daemon is the better one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vmshare.errors import DeadlineExceeded

log = logging.getLogger("vmshare.daemon")

TASK_DEATHS = 5
TASK_DEATH_WINDOW = 300.0


@dataclass
class Supervisor:
    """Restarts dying tasks; ``deaths`` counts them per task name since start."""

    deaths: dict[str, int] = field(default_factory=dict)
    failed: str | None = None
    restart_delay: float = 1.0

    async def run(self, name: str, job: Callable[[], Awaitable[None]],
                  stop: asyncio.Event) -> None:
        """Run ``job()`` until it returns or ``stop`` is set; restart it when it
        raises, or set ``stop`` and ``failed`` when it keeps dying."""
        loop = asyncio.get_running_loop()
        recent: list[float] = []
        while not stop.is_set():
            try:
                await job()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                now = loop.time()
                recent = [t for t in recent if now - t < TASK_DEATH_WINDOW] + [now]
                giving_up = len(recent) >= TASK_DEATHS
                self.deaths[name] = self.deaths.get(name, 0) + 1
                log.exception("background task %s died (%d time(s) in %.0f s); %s", name,
                              len(recent), TASK_DEATH_WINDOW,
                              "stopping the daemon" if giving_up else "restarting it")
                if giving_up:
                    self.failed = name
                    stop.set()
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.restart_delay)


async def in_thread(fn: Callable[[], Any], deadline: float, what: str) -> Any:
    """Run a blocking call in the default executor with a deadline."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(None, fn), deadline)
    except TimeoutError as exc:
        raise DeadlineExceeded(f"{what}: no answer within {deadline:g} s") from exc
