"""Savings history: periodic samples of the host's KSM counters and each VM's
figures. The daemon keeps them in an SQLite database (history_db); this module
holds the sample format, the reader of the JSON-lines files earlier versions
wrote (imported once, history_import), and the helpers that present samples.

A sample: ``{"time": t, "host": {counter: int}, "vms": {name: {figure: int}}}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vmshare.model import PAGE_SIZE
from vmshare.records.jsonlines import read_lines
from vmshare.records.schema import RecordError, decode, get_int, get_map, get_number, printable

HOST_FIELDS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
               "full_scans", "ksm_zero_pages", "general_profit")
VM_FIELDS = ("saved_bytes", "ksm_pages", "ram_bytes", "zero_pages")
SPARK = "▁▂▃▄▅▆▇█"
T = TypeVar("T")
#: --resolution: auto, raw samples, 5-minute or hourly aggregates (history_db.RESOLUTIONS)
RESOLUTION_CHOICES = ("auto", "raw", "5m", "1h")
#: auto: the finest resolution that holds the window in at most this many samples
AUTO_MAX_SAMPLES = 1500


class HistoryError(RecordError):
    """The history file cannot be written or read."""


class LegacyHistory:
    """The JSON-lines history of vmshare before the database (``<file>`` and its
    one rotation ``<file>.1``), read once by the import. Errors: HistoryError,
    AccessDenied."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.skipped = 0
        self.first_problem = ""

    def files(self) -> list[Path]:
        """The rotation first (it is older), then the file."""
        return [self.path.with_name(self.path.name + ".1"), self.path]

    def read(self, path: Path) -> Iterator[dict[str, Any]]:
        """The valid samples of ``path`` (one of :meth:`files`), in file order.

        A line that is not a valid sample (a torn line from a crash, a
        hand edit) is skipped and counted in ``self.skipped``, with the first
        problem in ``self.first_problem``. Raises AccessDenied or HistoryError
        (a file that cannot be read).
        """
        for item in read_lines(path, parse_sample, HistoryError, str(path)):
            if isinstance(item, HistoryError):
                self.skipped += 1
                self.first_problem = self.first_problem or str(item)
            else:
                yield item


MAX_LINE_BYTES = 1 << 20
INT64_MAX = 2**63 - 1       # what an SQLite INTEGER holds


def parse_sample(raw: bytes, what: str) -> dict[str, Any]:
    """Validate one history line: ``time`` a finite number, ``host`` counters and
    each VM's figures non-negative integers. Unknown keys are kept.

    Raises HistoryError naming ``what`` (file:line) and the problem.
    """
    rec = decode(raw, HistoryError, what, max_bytes=MAX_LINE_BYTES)
    if not isinstance(rec, dict):
        raise HistoryError(f"{what}: not a JSON object")
    get_number(rec, "time", HistoryError, what)
    host = get_map(rec, "host", HistoryError, what, required=False)
    for key in host:
        # general_profit is the kernel's signed estimate; every other counter is >= 0
        get_int(host, key, HistoryError, f"{what}: host", maximum=INT64_MAX,
                minimum=-INT64_MAX if key == "general_profit" else 0)
    vms = get_map(rec, "vms", HistoryError, what, required=False)
    for name in vms:
        vm = get_map(vms, name, HistoryError, f"{what}: vms")
        for key in VM_FIELDS:
            if key in vm:
                get_int(vm, key, HistoryError, f"{what}: vms.{printable(name, 60)}", minimum=0,
                        maximum=INT64_MAX)
    return rec


def parse_duration(text: str) -> float:
    """'90s', '15m', '6h', '2d' -> seconds. Raises ValueError."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise ValueError(f"expected a duration like 30m, 6h or 2d, not {text!r}")
    return float(text[:-1]) * units[text[-1]]


def sparkline(values: Sequence[float]) -> str:
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))]
                   for v in values)


def downsample(samples: Sequence[T], rows: int) -> list[T]:
    """At most ``rows`` samples, evenly spaced, always keeping the last.

    Raises ValueError for fewer than one row.
    """
    if rows < 1:
        raise ValueError(f"need at least one row, not {rows}")
    if len(samples) <= rows:
        return list(samples)
    step = len(samples) / rows
    picked = [samples[int(i * step)] for i in range(rows - 1)]
    return [*picked, samples[-1]]


def host_saved_bytes(rec: dict[str, Any]) -> int:
    """The host's saving in one sample: pages_sharing x page size."""
    return int(rec.get("host", {}).get("pages_sharing", 0)) * PAGE_SIZE


def vm_saved_bytes(rec: dict[str, Any], vm: str) -> int:
    """One VM's saved_bytes in one sample (0 when it was not running)."""
    return int(rec.get("vms", {}).get(vm, {}).get("saved_bytes", 0))


def summary(samples: Sequence[dict[str, Any]], vm: str | None = None) -> dict[str, Any]:
    """Per-VM (or host) saved bytes over the samples: first, last, min, max."""
    values = [float(host_saved_bytes(r) if vm is None else vm_saved_bytes(r, vm))
              for r in samples]
    return {"samples": len(values), "first": values[0] if values else 0,
            "last": values[-1] if values else 0, "min": min(values, default=0),
            "max": max(values, default=0), "series": values}
