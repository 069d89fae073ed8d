"""Savings history: periodic samples of the host's KSM counters and each VM's
figures, as JSON lines, written by the daemon and read by `vmshare history`.

A sample is small (a few hundred bytes per VM); the file is rotated to
``<file>.1`` when it passes ``max_bytes``, so at most twice that is kept.
Appends go through audit.append_line, as the audit log's do (one write()
under an exclusive lock); a torn last line from a crash is skipped by the reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vmshare.errors import AccessDenied
from vmshare.model import PAGE_SIZE
from vmshare.records.audit import append_line
from vmshare.records.schema import RecordError, decode, get_int, get_map, get_number, printable

HOST_FIELDS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
               "full_scans", "ksm_zero_pages", "general_profit")
VM_FIELDS = ("saved_bytes", "ksm_pages", "ram_bytes", "zero_pages")
SPARK = "▁▂▃▄▅▆▇█"
T = TypeVar("T")


class HistoryError(RecordError):
    """The history file cannot be written or read."""


class HistoryStore:
    """Append-only JSON-lines history with one rotation. Errors: HistoryError,
    AccessDenied."""

    def __init__(self, path: Path, max_bytes: int = 16 * 2**20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.skipped = 0
        self.first_problem = ""

    def append(self, record: dict[str, Any]) -> None:
        try:
            text = json.dumps(record, separators=(",", ":"), sort_keys=True, allow_nan=False)
        except ValueError as exc:
            raise HistoryError(f"cannot write {self.path}: {exc}") from exc
        line = (text + "\n").encode()
        try:
            append_line(self.path, line, rotate_over=self.max_bytes)
        except PermissionError as exc:
            raise AccessDenied(f"cannot write {self.path}: permission denied") from exc
        except OSError as exc:
            raise HistoryError(f"cannot write {self.path}: {exc.strerror}") from exc

    def read(self, since: float = 0.0) -> Iterator[dict[str, Any]]:
        """Samples newer than ``since``, oldest first, from the rotated file too.

        A line that is not a valid sample (a torn line from a crash, a
        hand edit) is skipped and counted in ``self.skipped``, with the first
        problem in ``self.first_problem``. Raises AccessDenied or HistoryError
        (a file that cannot be read).
        """
        self.skipped = 0
        self.first_problem = ""
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                f = open(path, "rb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                continue
            except PermissionError as exc:
                raise AccessDenied(f"cannot read {path}: permission denied") from exc
            except OSError as exc:
                raise HistoryError(f"cannot read {path}: {exc.strerror}") from exc
            with f:
                for number, raw in enumerate(f, 1):
                    try:
                        rec = parse_sample(raw, f"{path}:{number}")
                    except HistoryError as exc:
                        self.skipped += 1
                        self.first_problem = self.first_problem or str(exc)
                        continue
                    if rec["time"] > since:
                        yield rec


MAX_LINE_BYTES = 1 << 20


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
        get_int(host, key, HistoryError, f"{what}: host", minimum=0)
    vms = get_map(rec, "vms", HistoryError, what, required=False)
    for name in vms:
        vm = get_map(vms, name, HistoryError, f"{what}: vms")
        for key in VM_FIELDS:
            if key in vm:
                get_int(vm, key, HistoryError, f"{what}: vms.{printable(name, 60)}", minimum=0)
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
