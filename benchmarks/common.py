"""What every benchmark shares: the machine it ran on, and the whole
`vmshare predict` command measured in a fresh process (wall time, peak RSS,
page faults), with the cost of a page fault measured apart."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VMSHARE = str(Path(sys.executable).parent / "vmshare")


def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine() -> str:
    """One line: CPU model, cores, memory, kernel, load, date (UTC)."""
    mem = _first("/proc/meminfo", "MemTotal").split()[0]
    gib = int(mem) / 2**20 if mem.isdigit() else 0.0
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {_first('/proc/cpuinfo', 'model name')}, {os.cpu_count()} cores, "
            f"{gib:.1f} GiB, Linux {platform.release()}, load {load}, "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")


def fault_cost(mib: int = 256) -> float:
    """Seconds per minor fault here now: a fresh anonymous buffer touched page by page."""
    import mmap
    m = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = time.perf_counter()
    for o in range(0, mib << 20, 4096):
        m[o] = 1
    dt = time.perf_counter() - t
    m.close()
    return dt / (mib << 8)


@dataclass(frozen=True)
class Command:
    seconds: float
    max_rss: int          # bytes
    minor_faults: int
    output: dict[str, Any]


def bytecode() -> None:
    """Compile vmshare's modules to bytecode once, as installing the package
    does (pip, or Debian's python3 helpers): a command then starts as it does
    for a user, not compiling its sources first, even where
    PYTHONDONTWRITEBYTECODE keeps Python from writing them itself (measured:
    0.03 s a command)."""
    import compileall
    compileall.compile_dir(str(REPO / "vmshare"), quiet=1)


def run_predict(*args: str) -> Command:
    """`vmshare predict ARGS --json` in a fresh process, from start to answer.
    Its peak RSS and minor faults come from GNU time, whose own fork gives it
    a fresh peak: a child forked from this (bigger) process would inherit
    this process's peak RSS, which survives exec. The package's bytecode is
    compiled first (``bytecode``)."""
    import tempfile
    bytecode()
    with tempfile.NamedTemporaryFile("r") as report:
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M %R",
                               VMSHARE, "predict", *args, "--json"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"vmshare predict failed: {proc.stderr.strip()}")
        kib, minflt = report.read().split()[-2:]
    return Command(seconds, int(kib) * 1024, int(minflt), json.loads(proc.stdout))


def pages_sharing(c: Command) -> int:
    return int(c.output["totals"]["pages_sharing"])
