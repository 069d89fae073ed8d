"""Fleet scale: `vmshare fleet` against a Prometheus holding a day of a big fleet.

A synthetic history (benchmarks/fleet_synth.py: 1,000 hosts x 40 VMs x 24 h at
30 s by default, the exporter's series and labels) is written as OpenMetrics
one two-hour window at a time, each window backfilled with `promtool tsdb
create-blocks-from openmetrics` into the storage of a Prometheus started
afterwards (Debian's package), and its text deleted once backfilled: disk holds
at most two windows of text. Then, as whole commands (a new Python process
each, as an operator runs them), best and median of --repeat runs:
`fleet status` (goal 2 s), `fleet top` (1 s), one host's `fleet history` (1 s),
the whole fleet's history, beside the bare start-up of `vmshare --version`.
Every answer is checked against the model (hosts, VMs, total saving, each
host's flags, the top sharers): a wrong answer fails the run.

"Now" and the backfill: promtool cannot write into a running Prometheus's head
block, so the data ends at the moment the benchmark starts (END) and the
Prometheus started afterwards scrapes nothing (its head stays empty). By the
time it answers, END is minutes in the past, further than the 5 min look-back,
so `fleet status` and `fleet top` run with `--at END` (every instant query
evaluated at END; for an operator, the same as running it at END); history
runs as is, over the last --hours up to the real now.

    .venv/bin/python benchmarks/fleet_scale.py [--hosts 1000] [--vms 40] [--hours 24]
        [--interval 30] [--repeat 5] [--dir /var/tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from benchmarks.fleet_synth import (  # noqa: E402
    HOST_SERIES,
    VM_SERIES,
    Expected,
    Host,
    expected,
    make_fleet,
    write_window,
)
from integration.prometheus_fixture import run_prometheus  # noqa: E402

WINDOW = 7200          # promtool cuts 2 h blocks aligned to the epoch: one file each
GOALS = {"status": 2.0, "top": 1.0, "history one host": 1.0}


def backfill(fleet: list[Host], end: int, hours: float, interval: int,
             work: Path, storage: Path) -> dict[str, float]:
    """Write and backfill window after window; promtool runs on one window while
    the next is written. Returns samples, text bytes and the times spent."""
    start = end - int(hours * 3600) + interval
    figures = {"samples": 0.0, "text_bytes": 0.0, "write_s": 0.0, "promtool_s": 0.0}
    running: tuple[subprocess.Popen[bytes], Path, float] | None = None

    def finish() -> None:
        assert running is not None
        proc, path, began = running
        if proc.wait() != 0:
            raise SystemExit(f"promtool failed on {path.name}")
        figures["promtool_s"] += time.monotonic() - began
        path.unlink()

    t0 = time.monotonic()
    for w in range(start // WINDOW * WINDOW, end + 1, WINDOW):
        path = work / f"window-{w}.om"
        began = time.monotonic()
        with open(path, "w", buffering=1 << 22) as out:
            figures["samples"] += write_window(out, fleet, max(w, start), w + WINDOW, end,
                                               interval)
        figures["write_s"] += time.monotonic() - began
        figures["text_bytes"] += path.stat().st_size
        if running is not None:
            finish()
        running = (subprocess.Popen(["promtool", "tsdb", "create-blocks-from", "openmetrics",
                                     "-q", str(path), str(storage)],
                                    stdout=subprocess.DEVNULL), path, time.monotonic())
    if running is not None:
        finish()
    figures["wall_s"] = time.monotonic() - t0
    return figures


def timed(argv: Sequence[str], repeat: int) -> tuple[list[float], str]:
    """Seconds of each run of a whole `vmshare` command, and its last output."""
    runs, text = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "vmshare", *argv], capture_output=True,
                              text=True, cwd=REPO, timeout=300)
        runs.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"vmshare {' '.join(argv)} failed: {proc.stderr.strip()}")
        text = proc.stdout
    return runs, text


def check_status(doc: dict[str, Any], want: Expected) -> list[str]:
    """What is wrong in `fleet status --json` against the model (empty: nothing)."""
    wrong = []
    if len(doc["hosts"]) != want.hosts or doc["vms"] != want.vms:
        wrong.append(f"{len(doc['hosts'])} hosts, {doc['vms']} VMs; want {want.hosts}, "
                     f"{want.vms}")
    if doc["total_saved_bytes"] != want.total_saved:
        wrong.append(f"total {doc['total_saved_bytes']}, want {want.total_saved}")
    marks = {"down": "exporter down", "off": "KSM off", "unavailable": "KSM unavailable",
             "stuck": "stale (", "costly": "ksmd costs more"}
    for kind, mark in marks.items():
        got = sum(1 for h in doc["hosts"] if any(f.startswith(mark) for f in h["flags"]))
        if got != want.by_kind.get(kind, 0):
            wrong.append(f"{got} hosts flagged {mark!r}, want {want.by_kind.get(kind, 0)}")
    drifted = sum(len(h["drifted"]) for h in doc["hosts"])
    flagged = sum(1 for h in doc["hosts"] if h["flags"])
    if drifted != want.drifted:
        wrong.append(f"{drifted} VMs drifted, want {want.drifted}")
    if flagged != sum(want.by_kind.get(k, 0) for k in marks) + want.drifted:
        wrong.append(f"{flagged} hosts flagged in all")
    if [v["saved_bytes"] for v in doc["top"]] != want.top_saved:
        wrong.append("top sharers differ from the model's")
    return wrong


def settle(storage: Path, quiet: float, limit: float = 900.0) -> float:
    """Wait until Prometheus stops compacting the backfilled blocks (their count
    unchanged for ``quiet`` seconds); returns the seconds waited."""
    t0 = time.monotonic()
    last, since = -1, time.monotonic()
    while time.monotonic() - t0 < limit:
        blocks = sum(1 for p in storage.iterdir() if p.is_dir() and len(p.name) == 26)
        if blocks != last:
            last, since = blocks, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(1.0)
    return time.monotonic() - t0


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def row(name: str, runs: list[float]) -> str:
    goal = GOALS.get(name)
    best, median = min(runs), statistics.median(runs)
    verdict = "-" if goal is None else f"≤ {goal:g} s: {'met' if median <= goal else 'MISSED'}"
    shown = " ".join(f"{r:.2f}" for r in runs)
    return f"  {name:<20} best {best:6.2f} s  median {median:6.2f} s  {verdict:<16} ({shown})"


def measure(url: str, fleet: list[Host], end: int, args: argparse.Namespace,
            say: Callable[[str], None]) -> list[str]:
    """Time the commands, print the table, check the answers; returns what is wrong."""
    common = ["--prometheus", url, "--timeout", "60"]
    one = next(h for h in [*fleet[len(fleet) // 2:], *fleet] if h.kind == "ok").instance
    plan = [
        ("startup", ["--version"]),
        ("status", ["fleet", "status", *common, "--at", str(end)]),
        ("top", ["fleet", "top", *common, "--top", "10", "--at", str(end)]),
        ("history one host", ["fleet", "history", *common, "--since", f"{args.hours:g}h",
                              "--host", one]),
        ("history fleet", ["fleet", "history", *common, "--since", f"{args.hours:g}h"]),
    ]
    outputs = {}
    say(f"commands (seconds per whole command, {args.repeat} runs each):")
    for name, argv in plan:
        runs, outputs[name] = timed(argv, args.repeat)
        say(row(name, runs))
    say("")
    say("fleet status, first lines:")
    for line in outputs["status"].splitlines()[:6]:
        say(f"  {line}")
    say("fleet top, first lines:")
    for line in outputs["top"].splitlines()[:4]:
        say(f"  {line}")
    _, text = timed(["fleet", "status", *common, "--at", str(end), "--json"], 1)
    want = expected(fleet, end, 10)
    wrong = check_status(json.loads(text), want)
    if len(outputs["top"].splitlines()) != min(10, want.vms) + 1:
        wrong.append("fleet top did not print its table")
    if one.split(":")[0] not in outputs["history one host"]:
        wrong.append("history did not show the host")
    return wrong


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=40)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--interval", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the text and the TSDB go")
    ap.add_argument("--settle", type=float, default=30.0, metavar="SECONDS",
                    help="measure once the block count held this long (Prometheus "
                         "compacts the backfilled blocks; 0: at once)")
    ap.add_argument("--keep", action="store_true", help="leave the data directory")
    args = ap.parse_args(argv)
    if shutil.which("promtool") is None or shutil.which("prometheus") is None:
        raise SystemExit("needs Debian's prometheus package (promtool and prometheus)")

    def say(text: str) -> None:
        print(text, flush=True)

    end = int(time.time()) // args.interval * args.interval
    fleet = make_fleet(args.hosts, args.vms)
    series = args.hosts * (HOST_SERIES + VM_SERIES * args.vms)
    say(machine())
    say(f"fleet: {args.hosts} hosts x {args.vms} VMs, {args.hours:g} h at {args.interval} s "
        f"ending {time.strftime('%H:%M:%S', time.localtime(end))} (END={end}); "
        f"{series:,} series")
    work = Path(tempfile.mkdtemp(prefix="vmshare-fleet-", dir=args.dir))
    try:
        storage = work / "data"
        fig = backfill(fleet, end, args.hours, args.interval, work, storage)
        say(f"backfill: {fig['samples']:,.0f} samples, {fig['text_bytes'] / 1e9:.2f} GB of "
            f"OpenMetrics text (two windows on disk at most); writing {fig['write_s']:.1f} s, "
            f"promtool {fig['promtool_s']:.1f} s, wall {fig['wall_s']:.1f} s")
        config = {"global": {"scrape_interval": "30s"}}
        t0 = time.monotonic()
        with run_prometheus(config, storage, "--storage.tsdb.retention.time=30d") as prom:
            ready = time.monotonic() - t0
            waited = settle(storage, args.settle) if args.settle > 0 else 0.0
            say(f"prometheus: ready in {ready:.1f} s, compaction settled after {waited:.0f} s; "
                f"TSDB {du(storage) / 2**20:,.0f} MiB")
            wrong = measure(prom.url, fleet, end, args, say)
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for problem in wrong:
        say(f"WRONG: {problem}")
    say("answers: " + ("checked against the model" if not wrong else "WRONG"))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
