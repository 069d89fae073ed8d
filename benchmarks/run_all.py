"""Run every benchmark, each in a fresh process, in the README's order, and
print one table: each benchmark's summary (its last line, or its "summary:"
line) with the machine it ran on; every run's whole output is kept in
benchmarks/logs/<name>-<date>-<HHMMSS>.log. Benchmarks that touch KSM, libvirt or
guests must run under the shared lock:

  flock -o /tmp/vmshare-ksm-dev.lock .venv/bin/python benchmarks/run_all.py [NAME ...]

(-o: the lock's descriptor is not passed on, so a daemon started meanwhile,
such as virtlogd, does not keep holding the lock after the run.)

NAME picks benchmarks (a script's name without .py, or engine_vs_ksmd_thp or
engine_vs_ksmd_cold: that script with --thp or --cold); ``--quick`` gives the
engine's benchmarks only (the ones this script needs no guests for).
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, machine

#: (name, command line relative to the repo), the README's order
BENCHMARKS: list[tuple[str, list[str]]] = [
    ("attribution", ["benchmarks/attribution.py"]),
    ("engine_throughput", ["benchmarks/engine_throughput.py"]),
    ("engine_scaling", ["benchmarks/engine_scaling.py"]),
    ("engine_vs_ksmd", ["benchmarks/engine_vs_ksmd.py"]),
    ("engine_vs_ksmd_thp", ["benchmarks/engine_vs_ksmd.py", "--thp"]),
    ("engine_vs_ksmd_cold", ["benchmarks/engine_vs_ksmd.py", "--cold"]),   # drops the page cache
    ("live_scan", ["benchmarks/live_scan.py"]),
    ("live_read", ["benchmarks/live_read.py"]),
    ("measure_hook_time", ["hooks/measure_hook_time.py"]),
    ("tuner_vs_advisor", ["benchmarks/tuner_vs_advisor.py"]),
    ("tuner_vs_ksmtuned", ["benchmarks/tuner_vs_ksmtuned.py"]),
    ("exporter_cost", ["benchmarks/exporter_cost.py"]),
    ("history_db", ["benchmarks/history_db.py"]),
    ("sketch_place", ["benchmarks/sketch_place.py"]),
    ("fleet_scale", ["benchmarks/fleet_scale.py"]),       # about 45 min: a day of 1,000 hosts
    ("scrape_cost", ["benchmarks/scrape_cost.py"]),
    ("fuzz_inputs", ["benchmarks/fuzz_inputs.py"]),
    ("cli_startup", ["benchmarks/cli_startup.py"]),
]
QUICK = {"engine_throughput", "engine_scaling", "engine_vs_ksmd", "engine_vs_ksmd_thp",
         "live_scan", "live_read"}


def summary(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    marked = [ln for ln in lines if ln.startswith("summary:")]
    return (marked[-1].removeprefix("summary:").strip() if marked
            else lines[-1] if lines else "(no output)")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")]
    unknown = set(names) - {n for n, _ in BENCHMARKS}
    if unknown:
        raise SystemExit(f"no such benchmark: {', '.join(sorted(unknown))}")
    chosen = [(n, c) for n, c in BENCHMARKS
              if (n in names if names else (n in QUICK if quick else True))]
    logs = REPO / "benchmarks" / "logs"
    logs.mkdir(exist_ok=True)
    day = f"{datetime.now(UTC):%Y-%m-%d-%H%M%S}"   # one log per run, never overwritten
    rows: list[tuple[str, float, int, str]] = []
    for name, cmd in chosen:
        print(f"running {name} ...", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        out = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.stderr.strip() else "")
        (logs / f"{name}-{day}.log").write_text(f"$ {' '.join(cmd)}\n{out}\n"
                                               f"[exit {proc.returncode}, {seconds:.1f} s]\n")
        rows.append((name, seconds, proc.returncode, summary(proc.stdout if proc.returncode == 0
                                                             else out)))
    print(machine())
    width = max(len(n) for n, *_ in rows) if rows else 10
    for name, seconds, rc, text in rows:
        state = "ok" if rc == 0 else f"FAILED (exit {rc})"
        print(f"{name:<{width}}  {seconds:6.1f} s  {state:<6}  {text}")
    return 1 if any(rc for _, _, rc, _ in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
