"""Bad input the daemon refused: counted always, logged at a bounded rate.

A thousand malformed datagrams must not become a thousand log lines (a
flood drowns the one line that matters and fills the disk), and must not
become zero either. Each kind of input (``spool_entry``, ``datagram``, ...)
gets ``burst`` WARNING lines per ``window`` seconds; past that the rejects
are only counted, and the next line of that kind says how many were not
logged. ``counts`` holds the total per kind since the daemon started: the
figure the metrics export (``vmshare_daemon_bad_inputs_total{kind=...}``).
Messages are escaped (vmshare.records.schema.printable): a domain name or
a reason quoting outside text cannot forge a log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmshare.records.schema import printable

KINDS = ("spool_entry", "datagram", "spool_dropped")
MAX_SKIPPED = 10_000


@dataclass
class Rejects:
    """Counter and rate-limited logger of refused input. Not thread-safe: the
    daemon feeds it from its event loop only."""

    log: logging.Logger = field(default_factory=lambda: logging.getLogger("vmshare.daemon"))
    burst: int = 5
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    counts: dict[str, int] = field(default_factory=dict)
    _logged: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    _skipped: set[str] = field(default_factory=set)

    def reject(self, kind: str, reason: str) -> None:
        """Count one refused item of ``kind``; log it unless this kind is over its rate.

        ``reason`` names the item and the problem (a SpoolEntryError's text)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self.clock()
        start, logged, hidden = self._logged.get(kind, (now, 0, 0))
        if now - start >= self.window:
            start, logged = now, 0
        if logged < self.burst:
            note = f" ({hidden} more not logged)" if hidden else ""
            self.log.warning("refused %s%s; %d bad %s(s) since start", printable(reason, 400),
                             note, self.counts[kind], kind.replace("_", " "))
            self._logged[kind] = (start, logged + 1, 0)
        else:
            self._logged[kind] = (start, logged, hidden + 1)

    def flush(self) -> None:
        """Log how many rejects of each kind went unlogged in a window that has ended."""
        now = self.clock()
        for kind, (start, _logged, hidden) in list(self._logged.items()):
            if hidden and now - start >= self.window:
                self.log.warning("%d more bad %s(s) not logged in the last %.0f s; %d refused "
                                 "since start", hidden, kind.replace("_", " "), now - start,
                                 self.counts[kind])
                self._logged[kind] = (now, 0, 0)

    def skip(self, name: str) -> None:
        """Remember an item that could not be moved aside, so it is refused only once
        (at most MAX_SKIPPED names are remembered)."""
        if len(self._skipped) < MAX_SKIPPED:
            self._skipped.add(name)

    def skipped(self, name: str) -> bool:
        return name in self._skipped

    def total(self) -> int:
        return sum(self.counts.values())
