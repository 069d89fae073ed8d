"""A small progress bar for long work, on stderr and only on a terminal.

Never shown when stderr is not a tty (pipes, logs, tests) or when the caller
disables it (``--json``): machine-readable output stays clean. Redraws are
throttled so a fast loop does not spend its time writing to the terminal.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Self, TextIO

BAR_WIDTH = 30
MIN_REDRAW_SECONDS = 0.1


class ProgressBar:
    """``update(fraction, label)`` draws ``label [#####.....]  42%`` in place.

    Use as a context manager; the line is cleared when the block ends. With
    ``enabled=False`` or a non-tty stream every call is a no-op.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.active = bool(enabled and isatty is not None and isatty())
        self._last_draw = float("-inf")
        self._drawn = False
        self._last_text = ""

    def update(self, fraction: float, label: str = "") -> None:
        if not self.active:
            return
        now = time.monotonic()
        if now - self._last_draw < MIN_REDRAW_SECONDS and fraction < 1.0:
            return
        self._last_draw = now
        frac = min(1.0, max(0.0, fraction))
        filled = round(frac * BAR_WIDTH)
        text = f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac * 100:3.0f}%"
        pad = " " * max(0, len(self._last_text) - len(text))
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()
        self._last_text = text
        self._drawn = True

    def clear(self) -> None:
        if self.active and self._drawn:
            self.stream.write("\r" + " " * len(self._last_text) + "\r")
            self.stream.flush()
            self._drawn = False
            self._last_text = ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.clear()
