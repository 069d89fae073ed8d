"""Kernel KSM knobs and counters under /sys/kernel/mm/ksm.

The only module that reads or writes that directory. The root is injectable
so tests run against temporary trees. Every write is validated against the
kernel's own rules first (mm/ksm.c *_store handlers) and read back after.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vmshare.errors import AccessDenied, KnobError, KsmUnavailable, VmshareError
from vmshare.model import COUNTER_MEANINGS

DEFAULT_ROOT = Path("/sys/kernel/mm/ksm")
UINT_MAX = 2**32 - 1
ULONG_MAX = 2**64 - 1

RUN_STOP, RUN_MERGE, RUN_UNMERGE = 0, 1, 2


@dataclass(frozen=True)
class KnobSpec:
    """A writable knob: its kernel meaning and the values the kernel accepts."""

    meaning: str
    parse: Callable[[str], int | str]
    # Knobs the kernel refuses (EBUSY) to change while anything is merged.
    needs_unmerged: bool = False


def _uint(lo: int, hi: int) -> Callable[[str], int | str]:
    def parse(text: str) -> int | str:
        text = text.strip()
        if not text.isdigit():
            raise ValueError(f"expected a whole number from {lo} to {hi}, got {text!r}")
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range ({lo} to {hi})")
        return value
    return parse


def _bool(text: str) -> int | str:
    value = text.strip().lower()
    if value in ("1", "y", "yes", "on", "true"):
        return 1
    if value in ("0", "n", "no", "off", "false"):
        return 0
    raise ValueError(f"expected 0 or 1, got {text!r}")


def _advisor_mode(text: str) -> int | str:
    value = text.strip()
    if value not in ("none", "scan-time"):
        raise ValueError(f"expected 'none' or 'scan-time', got {text!r}")
    return value


# Writable knobs, with the kernel's meanings (Documentation/admin-guide/mm/ksm.rst).
KNOBS: dict[str, KnobSpec] = {
    "run": KnobSpec("0: stop ksmd but keep merged pages; 1: run ksmd; 2: stop ksmd and "
                    "unmerge all merged pages", _uint(0, 2)),
    "pages_to_scan": KnobSpec("how many pages to scan before ksmd goes to sleep",
                              _uint(0, UINT_MAX)),
    "sleep_millisecs": KnobSpec("how many milliseconds ksmd sleeps before the next scan",
                                _uint(0, UINT_MAX)),
    "merge_across_nodes": KnobSpec("1: merge pages across NUMA nodes; 0: only within a node",
                                   _uint(0, 1), needs_unmerged=True),
    "max_page_sharing": KnobSpec("maximum sharing allowed for each KSM page (>= 2)",
                                 _uint(2, 2**31 - 1), needs_unmerged=True),
    "use_zero_pages": KnobSpec("1: merge empty pages with the kernel zero page", _bool),
    "stable_node_chains_prune_millisecs": KnobSpec(
        "how often stale stable_node dups are pruned", _uint(0, UINT_MAX)),
    "smart_scan": KnobSpec("1: skip pages that did not merge in earlier scans", _bool),
    "advisor_mode": KnobSpec("none: fixed pages_to_scan; scan-time: ksmd sets pages_to_scan "
                             "to reach advisor_target_scan_time", _advisor_mode),
    # kstrtoul into an unsigned int: larger values would be truncated, not refused.
    "advisor_max_cpu": KnobSpec("upper CPU limit for ksmd in percent (advisor)",
                                _uint(0, UINT_MAX)),
    "advisor_min_pages_to_scan": KnobSpec("lower limit of pages_to_scan (advisor)",
                                          _uint(0, ULONG_MAX)),
    "advisor_max_pages_to_scan": KnobSpec("upper limit of pages_to_scan (advisor)",
                                          _uint(0, ULONG_MAX)),
    "advisor_target_scan_time": KnobSpec("seconds a full scan should take (advisor)",
                                         _uint(1, ULONG_MAX)),
}

# Restore order: plain knobs before run, and the EBUSY-guarded ones while stopped.
_RESTORE_ORDER = [
    "merge_across_nodes", "max_page_sharing", "use_zero_pages", "smart_scan",
    "stable_node_chains_prune_millisecs", "advisor_mode", "advisor_max_cpu",
    "advisor_min_pages_to_scan", "advisor_max_pages_to_scan", "advisor_target_scan_time",
    "pages_to_scan", "sleep_millisecs", "run",
]


@dataclass(frozen=True)
class KnobSnapshot:
    """Every writable knob's value as read at one moment."""

    values: Mapping[str, int | str]


class KsmSysfs:
    """Reads and writes /sys/kernel/mm/ksm (or a test tree shaped like it).

    Errors: KsmUnavailable when the directory is missing, AccessDenied on
    EACCES/EPERM, KnobError for unknown knobs, bad values, kernel refusals
    and read-back mismatches.
    """

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    # ---- reading -------------------------------------------------------
    def available(self) -> bool:
        return (self.root / "run").is_file()

    def require(self) -> None:
        if not self.available():
            raise KsmUnavailable(
                f"kernel KSM is not available: {self.root}/run does not exist "
                "(kernel built without CONFIG_KSM?)")

    def _read(self, name: str) -> str:
        path = self.root / name
        try:
            return path.read_text().strip()
        except FileNotFoundError as exc:
            self.require()
            raise KnobError(f"{name}: this kernel has no such KSM file ({path})") from exc
        except PermissionError as exc:
            raise AccessDenied(f"cannot read {path}: permission denied (run as root)") from exc
        except OSError as exc:
            raise KnobError(f"cannot read {path}: {exc.strerror}") from exc

    def read_int(self, name: str) -> int:
        text = self._read(name)
        try:
            return int(text)
        except ValueError as exc:
            raise KnobError(f"{name}: unexpected content {text!r}") from exc

    def read_knob(self, name: str) -> int | str:
        if name not in KNOBS:
            raise KnobError(f"unknown KSM knob {name!r}; known: {', '.join(sorted(KNOBS))}")
        text = self._read(name)
        if name == "advisor_mode":
            # Shown as "[none] scan-time": the bracketed word is current.
            for word in text.split():
                if word.startswith("[") and word.endswith("]"):
                    return word[1:-1]
            return text
        try:
            return int(text)
        except ValueError as exc:
            raise KnobError(f"{name}: unexpected content {text!r}") from exc

    def knobs(self) -> dict[str, int | str]:
        """Every writable knob this kernel has, by kernel name."""
        self.require()
        return {name: self.read_knob(name) for name in KNOBS if (self.root / name).exists()}

    def counters(self) -> dict[str, int]:
        """Every read-only counter this kernel has, by kernel name."""
        self.require()
        return {name: self.read_int(name) for name in COUNTER_MEANINGS
                if (self.root / name).exists()}

    # ---- writing -------------------------------------------------------
    def validate(self, name: str, value: str | int) -> int | str:
        """Parse a knob value by the kernel's rules; nothing is written.

        Raises KnobError naming the knob and the accepted values.
        """
        spec = KNOBS.get(name)
        if spec is None:
            if name in COUNTER_MEANINGS:
                raise KnobError(f"{name} is a read-only counter, not a knob")
            raise KnobError(f"unknown KSM knob {name!r}; known: {', '.join(sorted(KNOBS))}")
        try:
            return spec.parse(str(value))
        except ValueError as exc:
            raise KnobError(f"bad value for {name}: {exc}") from exc

    def set(self, name: str, value: str | int) -> int | str:
        """Validate, write, and read back one knob. Returns the value now in force.

        Raises KnobError (bad value, EBUSY while pages are merged, read-back
        mismatch), AccessDenied, KsmUnavailable.
        """
        parsed = self.validate(name, value)
        self.require()
        path = self.root / name
        if not path.exists():
            raise KnobError(f"{name}: this kernel has no such knob ({path})")
        if name == "pages_to_scan" and (self.root / "advisor_mode").exists() \
                and self.read_knob("advisor_mode") != "none":
            # pages_to_scan_store returns EINVAL while an advisor is on.
            raise KnobError("pages_to_scan is set by the kernel's advisor while "
                            "advisor_mode is not none; set advisor_mode=none first")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except PermissionError as exc:
            raise AccessDenied(f"cannot write {path}: permission denied (run as root)") from exc
        except OSError as exc:
            raise KnobError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            os.write(fd, f"{parsed}\n".encode())
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise KnobError(
                    f"the kernel refused to change {name} while pages are merged "
                    "(EBUSY): unmerge first ('vmshare ksm unmerge')") from exc
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise AccessDenied(f"cannot write {path}: permission denied") from exc
            raise KnobError(f"the kernel refused {name}={parsed}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        now = self.read_knob(name)
        # run=2 reads back as 2 only while unmerging completes synchronously;
        # every other knob must read back exactly.
        if now != parsed:
            raise KnobError(f"{name} reads back {now!r} after writing {parsed!r}")
        return now

    # ---- snapshots -----------------------------------------------------
    def snapshot(self) -> KnobSnapshot:
        return KnobSnapshot(dict(self.knobs()))

    def restore(self, snap: KnobSnapshot, *, unmerge_timeout: float = 60.0) -> None:
        """Put every knob back as it was in ``snap``.

        The NUMA and max_page_sharing knobs can only change with nothing
        merged, so if they differ KSM is unmerged first (as the kernel's own
        selftest does). Raises KnobError if any knob could not be restored.
        """
        current = self.knobs()
        guarded = [n for n in snap.values if KNOBS[n].needs_unmerged
                   and current.get(n) != snap.values[n]]
        if guarded and self.read_int("pages_shared") > 0:
            self.unmerge(timeout=unmerge_timeout)
        failures: list[str] = []
        for name in _RESTORE_ORDER:
            if name not in snap.values or name not in current:
                continue
            want = snap.values[name]
            if self.read_knob(name) == want:
                continue
            if name == "pages_to_scan" and snap.values.get("advisor_mode") == "scan-time":
                continue  # the advisor owns pages_to_scan; the kernel refuses writes
            try:
                self.set(name, want)
            except VmshareError as exc:
                failures.append(f"{name}: {exc}")
        if failures:
            raise KnobError("could not restore KSM knobs: " + "; ".join(failures))

    # ---- compound operations ------------------------------------------
    def unmerge(self, *, timeout: float = 60.0) -> None:
        """run=2: stop ksmd and break every merged page; wait until none is shared.

        The kernel does the unmerge synchronously inside the write, so this
        usually returns at once. Raises KnobError on timeout.
        """
        self.set("run", RUN_UNMERGE)
        deadline = time.monotonic() + timeout
        while self.read_int("pages_shared") or self.read_int("pages_sharing"):
            if time.monotonic() > deadline:
                raise KnobError(f"pages still shared {timeout:.0f}s after run=2")
            time.sleep(0.05)

    def wait_full_scans(self, count: int, *, timeout: float,
                        progress: Callable[[dict[str, int]], None] | None = None) -> int:
        """Wait until full_scans has advanced by ``count``; returns the new value.

        Raises KnobError when ksmd is not running or the deadline passes.
        """
        if self.read_knob("run") != RUN_MERGE:
            raise KnobError("ksmd is not running (run != 1): full_scans will not advance")
        start = self.read_int("full_scans")
        deadline = time.monotonic() + timeout
        while True:
            now = self.read_int("full_scans")
            if progress is not None:
                progress(self.counters())
            if now - start >= count:
                return now
            if time.monotonic() > deadline:
                raise KnobError(f"ksmd completed {now - start} of {count} full scans "
                                f"within {timeout:.0f}s")
            time.sleep(0.1)
