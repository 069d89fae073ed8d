"""The history database at scale: 50 VMs sampled every 30 s for 90 days.

The samples are generated (a slow random walk per VM, so the aggregates are not
constant) and go through the store's own path: appended an hour at a time, and
after each hour HistoryDb.maintain runs with the default retention, as the
daemon runs it, so the database ends as the daemon would keep it (raw samples
for the last 7 days, 5-minute aggregates for 90, hourly ones). Then: the file's
size, the rows of each table, what one daemon sample and one retention run
cost on a database that size, and the wall time of whole `vmshare history`
commands in a subprocess (interpreter start included), best and median of
REPEATS, beside `vmshare --version` as the floor.

Run:  .venv/bin/python benchmarks/history_db.py [DAYS [VMS [INTERVAL]]]
"""

from __future__ import annotations

import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine
from vmshare.records.history_db import HistoryDb, Retention

REPO = Path(__file__).resolve().parent.parent
REPEATS = 7
COMMANDS = (
    ("--version",),
    ("history", "--since", "30d", "--json"),
    ("history", "--since", "30d"),
    ("history", "--since", "90d", "--json"),
    ("history", "--since", "7d", "--json"),
    ("history", "--since", "24h", "--json"),
    ("history", "--since", "6h", "--json"),
    ("history", "--since", "30d", "--json", "--resolution", "5m"),
)


class Host:
    """50 VMs whose saved bytes wander, a host whose counters follow them."""

    def __init__(self, vms: int) -> None:
        self.rng = random.Random(7)
        self.saved = [self.rng.randrange(2**28, 2**30) for _ in range(vms)]
        self.scans = 0

    def sample(self, t: float) -> dict[str, Any]:
        vms = {}
        for j, s in enumerate(self.saved):
            s = max(0, s + self.rng.randrange(-2**20, 2**20 + 1))
            self.saved[j] = s
            vms[f"guest-{j:03d}"] = {"saved_bytes": s, "ksm_pages": s // 4096 + 512,
                                     "ram_bytes": 2**32, "zero_pages": 1024}
        self.scans += self.rng.random() < 0.05
        sharing = sum(self.saved) // 4096
        return {"time": round(t, 3),
                "host": {"pages_shared": sharing // 3, "pages_sharing": sharing,
                         "pages_unshared": 200_000, "pages_volatile": 5_000,
                         "full_scans": self.scans, "ksm_zero_pages": 1024 * len(vms),
                         "general_profit": sharing * 4000},
                "vms": vms}


def generate(db: HistoryDb, days: float, vms: int, interval: float, now: float) -> float:
    host, keep = Host(vms), Retention()
    start = now - days * 86400
    per_hour = int(3600 // interval)
    t, hours, began = start, int(days * 24), time.perf_counter()
    for h in range(hours):
        db.append_many([host.sample(t + i * interval) for i in range(per_hour)])
        t += per_hour * interval
        while db.maintain(t, keep, budget_s=5.0):
            pass
        if h % (24 * 10) == 0:
            print(f"  generated {h / 24:4.0f} of {days:g} days "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
    return time.perf_counter() - began


def timed(cmd: tuple[str, ...], env: dict[str, str]) -> tuple[float, float, int]:
    walls, size = [], 0
    for _ in range(REPEATS):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "vmshare", *cmd], cwd=REPO, env=env,
                           capture_output=True, timeout=300)
        walls.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.decode()[-500:]}")
        size = len(r.stdout)
    return min(walls), statistics.median(walls), size


def main() -> int:
    days, vms, interval = (float(sys.argv[1]) if len(sys.argv) > 1 else 90.0,
                           int(sys.argv[2]) if len(sys.argv) > 2 else 50,
                           float(sys.argv[3]) if len(sys.argv) > 3 else 30.0)
    print(f"{machine()}; Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}")
    print(f"{vms} VMs, a sample every {interval:g} s, {days:g} days, default retention "
          "(raw 7 d, 5-minute 90 d, hourly 730 d)")
    with tempfile.TemporaryDirectory(prefix="vmshare-histbench-") as tmp:
        path = Path(tmp) / "history.sqlite"
        now = time.time()
        db = HistoryDb.open_writer(path)
        took = generate(db, days, vms, interval, now)
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = path.stat().st_size
        rows = {table: db.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("host_raw", "vm_raw", "host_agg", "vm_agg")}
        print(f"generated in {took:.0f} s; database {size / 2**20:.1f} MiB; rows: "
              + ", ".join(f"{k} {v:,}" for k, v in rows.items()))
        host = Host(vms)
        t = time.perf_counter()
        for i in range(20):
            db.append(host.sample(now + interval * (i + 1)))
        append_ms = (time.perf_counter() - t) / 20 * 1e3
        t = time.perf_counter()
        db.maintain(now + 600, Retention(), budget_s=60)
        maintain_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        HistoryDb.open_writer(path).close()     # the daemon's start: quick_check, migrate
        open_ms = (time.perf_counter() - t) * 1e3
        db.close()
        print(f"one daemon sample (a transaction of {vms + 1} rows): {append_ms:.1f} ms; "
              f"a retention run 10 min later: {maintain_ms:.0f} ms; the daemon's open "
              f"(quick_check included): {open_ms:.0f} ms")
        cfg = Path(tmp) / "vmshare.toml"
        cfg.write_text(f'[daemon]\nhistory_db = "{path}"\nhistory_interval = {interval}\n')
        env = dict(os.environ, VMSHARE_CONFIG=str(cfg))
        print(f"\nwhole commands (subprocess, best and median of {REPEATS}):")
        for cmd in COMMANDS:
            best, median, out = timed(cmd, env)
            print(f"  vmshare {' '.join(cmd):<44} {best * 1e3:7.0f} ms  {median * 1e3:7.0f} ms"
                  f"  {out / 2**20:6.2f} MiB out", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
