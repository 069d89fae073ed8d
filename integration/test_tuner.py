"""`vmshare tune` against real kernel KSM and real processes: the tuner merges
the workload fully, then stops ksmd (memory ample) or slows it (memory not
ample), keeps the merges, and logs every knob it wrote.

Every knob is saved and restored by the kernel_ksm fixture; the tuner itself
restores nothing by design, so the fixture's restore is what undoes it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import DaemonProc, wait_for, write_config
from integration.ksm_fixtures import REPO, MemProc, kernel_ksm, memprocs, start_memproc
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.records.audit import AuditLog, AuditRecord
from vmshare.tuner.loop import KsmdClock, tuner_lock

__all__ = ["kernel_ksm", "memprocs"]

IDENTICAL, UNIQUE, PROCS = 8192, 8192, 3        # 3 x 64 MiB, half identical


def run_tune(tmp_path: Path, *args: str, timeout: float = 180) -> tuple[list[dict[str, Any]],
                                                                         str]:
    env = {**os.environ, "VMSHARE_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = subprocess.run([sys.executable, "-m", "vmshare", "tune", "--json", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()], proc.stderr


def start_workload(memprocs: list[MemProc]) -> None:
    for _ in range(PROCS):
        memprocs.append(start_memproc(identical=IDENTICAL, unique=UNIQUE, seed=3131))


def test_tuner_converges_then_stops_ksmd_keeping_merges(
        kernel_ksm: KsmSysfs, memprocs: list[MemProc], tmp_path: Path) -> None:
    sysfs = kernel_ksm
    kernel_ksm.set("pages_to_scan", 100)      # a slow start the tuner must fix
    start_workload(memprocs)
    sysfs.set("run", 1)
    decisions, _ = run_tune(tmp_path, "--interval", "1", "--cpu-budget", "30",
                            "--tight", "5", "--ample", "10", "--steps", "40")
    modes = [d["mode"] for d in decisions]
    assert "idle" in modes, [d["reason"] for d in decisions]
    first_idle = modes.index("idle")
    assert all(m == "merge" for m in modes[:first_idle])
    # everything that can merge had merged when ksmd was stopped
    stop = decisions[first_idle]
    assert stop["knobs"] == {"run": 0}
    assert stop["observation"]["pages_sharing"] == (PROCS - 1) * IDENTICAL
    assert sysfs.read_knob("run") == 0
    # merges kept; ksmd costs nothing while stopped. On a shared machine another
    # process taking 5% of RAM rightly wakes the tuner (it says why); nothing else
    # may, and an interval that starts and ends stopped costs nothing
    assert sysfs.read_int("pages_sharing") == (PROCS - 1) * IDENTICAL
    pairs = list(itertools.pairwise(decisions[first_idle:]))
    woken = [d["reason"] for prev, d in pairs if prev["mode"] == "idle" != d["mode"]]
    assert all("MemAvailable fell by" in why or "memory no longer ample" in why
               for why in woken), woken
    idle_cpu = [d["cpu_pct"] for prev, d in pairs if prev["mode"] == d["mode"] == "idle"]
    assert len(idle_cpu) >= 5 and max(idle_cpu) < 1.0, [
        (d["mode"], d["cpu_pct"], d["reason"]) for d in decisions]
    # merging ran at the budget, not at the 100 pages it found
    assert max(d["knobs"].get("pages_to_scan", 0) for d in decisions[:first_idle]) > 1000
    measured = [d["cpu_pct"] for d in decisions[1:first_idle] if d["cpu_pct"] is not None]
    assert measured and max(measured) < 30 * 1.5
    # every knob write is in the audit log as the tuner's, none of them an unmerge
    recs = [r for r in AuditLog(tmp_path / "audit.jsonl").read()
            if isinstance(r, AuditRecord)]
    assert recs and all(r.actor == "tuner" and r.action == "knob" for r in recs)
    assert {"knob pages_to_scan", "knob run"} <= {r.target for r in recs}
    assert all(not (r.target == "knob run" and r.after == 2) for r in recs)
    applied = [c for d in decisions for c in d["applied"]]
    assert len(applied) == len(recs)


def test_tuner_watches_slowly_when_memory_is_not_ample(
        kernel_ksm: KsmSysfs, memprocs: list[MemProc], tmp_path: Path) -> None:
    sysfs = kernel_ksm
    start_workload(memprocs)
    sysfs.set("run", 1)
    # --ample 100: memory is never ample here, so the tuner must watch, not stop
    decisions, _ = run_tune(tmp_path, "--interval", "1", "--cpu-budget", "30",
                            "--tight", "5", "--ample", "100", "--steps", "30")
    modes = [d["mode"] for d in decisions]
    assert "watch" in modes and "idle" not in modes, [d["reason"] for d in decisions]
    first_watch = modes.index("watch")
    assert decisions[first_watch]["observation"]["pages_sharing"] == (PROCS - 1) * IDENTICAL
    merge_pages = max(d["knobs"]["pages_to_scan"] for d in decisions[:first_watch])
    watch_pages = decisions[-1]["knobs"]["pages_to_scan"]
    assert decisions[-1]["mode"] == "watch" and sysfs.read_knob("run") == 1
    assert watch_pages * 20 < merge_pages
    # ksmd's cost while watching, measured independently of the tuner
    clock = KsmdClock(ProcFs())
    t0, c0 = time.monotonic(), clock.seconds()
    time.sleep(3)
    pct = 100 * (clock.seconds() - c0) / (time.monotonic() - t0)
    assert pct < 5.0
    assert sysfs.read_int("pages_sharing") == (PROCS - 1) * IDENTICAL


def test_tuner_refuses_the_kernel_advisor_unless_told(
        kernel_ksm: KsmSysfs, tmp_path: Path) -> None:
    if "advisor_mode" not in kernel_ksm.knobs():
        pytest.skip("this kernel has no KSM advisor (advisor_mode)")
    kernel_ksm.set("advisor_mode", "scan-time")
    env = {**os.environ, "VMSHARE_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    proc = subprocess.run([sys.executable, "-m", "vmshare", "tune", "--once", "--interval",
                           "0.2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--take-over" in proc.stderr
    assert kernel_ksm.read_knob("advisor_mode") == "scan-time"
    proc = subprocess.run([sys.executable, "-m", "vmshare", "tune", "--once", "--interval",
                           "0.2", "--take-over"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "advisor switched off" in proc.stdout and "nothing restored" in proc.stdout
    assert kernel_ksm.read_knob("advisor_mode") == "none"


def test_daemon_runs_the_tuner(kernel_ksm: KsmSysfs, memprocs: list[MemProc],
                               tmp_path: Path) -> None:
    """`[daemon] tune = true`: the daemon runs the same tuner beside its policy
    work (scoped here to no domain at all), merging the workload at the
    budget and then stopping ksmd with the merges kept, every knob it writes
    audit-logged as the tuner's."""
    kernel_ksm.set("pages_to_scan", 100)
    start_workload(memprocs)
    kernel_ksm.set("run", 1)
    daemon = DaemonProc(write_config(tmp_path, {}, tune=True), tmp_path / "daemon.log",
                        domains=("vmshare-it-no-such-domain-*",))
    try:
        daemon.wait_log("KSM tuner: owning run, pages_to_scan, sleep_millisecs")
        wait_for(lambda: kernel_ksm.read_int("pages_sharing") == (PROCS - 1) * IDENTICAL,
                 120, lambda: f"not merged: {kernel_ksm.counters()}\n{daemon.text()[-2000:]}")
        wait_for(lambda: kernel_ksm.read_knob("run") == 0, 120,
                 lambda: f"ksmd not stopped:\n{daemon.text()[-2000:]}")
    finally:
        daemon.kill(signal.SIGTERM)
    assert kernel_ksm.read_int("pages_sharing") == (PROCS - 1) * IDENTICAL   # merges kept
    recs = [r for r in AuditLog(tmp_path / "audit.jsonl").read()
            if isinstance(r, AuditRecord) and r.action == "knob"]
    assert recs and all(r.actor == "tuner" for r in recs)
    raised = [r.after for r in recs if r.target == "knob pages_to_scan"]
    assert raised and max(int(v) for v in raised) > 1000    # scanned at the budget, not 100
    assert any(r.target == "knob run" and r.after == 0 for r in recs)
    assert "KSM tuner idle" in daemon.text()
    # one tuner per host: with another one holding the lock, the daemon does
    # its policy work but leaves the knobs alone, and says why
    with tuner_lock():
        second = DaemonProc(write_config(tmp_path, {}, tune=True), tmp_path / "second.log",
                            domains=("vmshare-it-no-such-domain-*",))
        try:
            second.wait_log(f"KSM tuner not started: another vmshare tuner (pid {os.getpid()})")
            second.wait_log("running: qemu:///system")
        finally:
            second.kill(signal.SIGTERM)
