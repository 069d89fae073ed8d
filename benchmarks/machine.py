"""One line describing the machine a benchmark ran on: CPU model, cores, memory,
kernel, the date and the load already on it (benchmarks print it beside their figures)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def _field(path: str, key: str) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return "?"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "?")


def describe() -> str:
    memory = _field("/proc/meminfo", "MemTotal")
    gib = f"{int(memory.split()[0]) / 2**20:.1f} GiB" if memory[:1].isdigit() else "?"
    return (f"machine: {_field('/proc/cpuinfo', 'model name')}, {os.cpu_count()} cores, "
            f"{gib} memory, kernel {platform.release()}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
            f"load average {os.getloadavg()[0]:.2f} (a shared machine)")
