"""argparse ``type=`` helpers shared by every command group: numbers that are
finite and in range, and strings that are not empty.

A number from the command line reaches arithmetic, ``time.sleep`` and
deadlines; ``float("inf")``, ``nan`` or ``1e308`` there overflows or waits
forever, so each option states its range and a value outside it is a usage
error (exit 2) that names the option, the range and the value given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

#: The longest wait any option may ask for: an hour. Longer is a typo or a hang.
MAX_SECONDS = 3600.0


def _range_text(lo: float, hi: float, lo_open: bool) -> str:
    low = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
    return f"{low} and at most {hi:g}"


def finite_float(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str], float]:
    """A ``type=`` for a float in [lo, hi] (or (lo, hi] with ``lo_open``).

    The returned function raises argparse.ArgumentTypeError (exit 2) for text
    that is not a number, nan, an infinity, or a value out of range.
    """
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {_range_text(lo, hi, lo_open)}, not {text!r}")
        return value
    parse.__name__ = "number"
    return parse


def bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    """A ``type=`` for an integer in [lo, hi].

    The returned function raises argparse.ArgumentTypeError for text that is
    not a decimal integer or a value out of range.
    """
    def parse(text: str) -> int:
        # int() would take 5,000 digits and spend time on them; nothing here needs 20.
        if len(text.strip()) > 20:
            raise argparse.ArgumentTypeError(f"not an integer in [{lo}, {hi}]: {text[:24]!r}...")
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi}, "
                                             f"not {value}")
        return value
    parse.__name__ = "integer"
    return parse


def seconds(*, zero_ok: bool = False, hi: float = MAX_SECONDS) -> Callable[[str], float]:
    """A ``type=`` for a duration in seconds: positive (or >= 0 with
    ``zero_ok``), finite, at most ``hi``. Raises as ``finite_float``."""
    return finite_float(0.0, hi, lo_open=not zero_ok)


def nonempty(what: str) -> Callable[[str], str]:
    """A ``type=`` refusing an empty (or all-blank) string: an unset shell
    variable must not silently select a default. Raises
    argparse.ArgumentTypeError naming ``what``."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(
                f"empty {what}; leave the option out for the default")
        return text
    parse.__name__ = what
    return parse


#: Common instances.
DEADLINE = seconds()
PERCENT = finite_float(0.0, 100.0)
POSITIVE_COUNT = bounded_int(1, 1_000_000)


def rate(text: str) -> float:
    """A sampling rate in (0, 1], as a decimal or a fraction 1/N."""
    from vmshare.config import parse_rate
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
