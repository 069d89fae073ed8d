"""`vmshare tune`: a KSM tuner driven by KSM's own feedback (see vmshare/tuner.py).

Collect (sysfs counters, ksmd's CPU time, MemAvailable/MemTotal), decide
(vmshare.tuner.decide, pure), act (KsmSysfs.set: validated, read back,
audit-logged as actor "tuner"). The tuner never unmerges (run=2 is never
written) and restores nothing when it exits: while it runs it owns run,
pages_to_scan and sleep_millisecs, and it says so.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from vmshare.audit import AuditLog
from vmshare.errors import KnobError, ProcessGone, ProcfsError, UsageError
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import RUN_UNMERGE, KsmSysfs
from vmshare.tuner import Decision, Observation, Policy, TunerState, decide

OWNED_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")


class KsmdClock:
    """ksmd's CPU time, for the kernel thread whose comm is ``ksmd``, found
    once and found again if it goes away. Raises ProcfsError when no ksmd
    thread exists."""

    def __init__(self, procfs: ProcFs) -> None:
        self.procfs = procfs
        self.pid: int | None = None

    def find(self) -> int:
        pids = self.procfs.pids_named("ksmd")
        if not pids:
            raise ProcfsError(f"no ksmd kernel thread under {self.procfs.root} "
                              "(kernel without KSM?)")
        self.pid = pids[0]
        return self.pid

    def seconds(self) -> float:
        for _attempt in range(2):
            pid = self.pid if self.pid is not None else self.find()
            try:
                stat = self.procfs.stat(pid)   # comm and CPU time from one read
                if stat.comm != "ksmd":
                    raise ProcessGone(f"pid {pid} is no longer ksmd")
                return stat.cpu_seconds
            except (ProcessGone, ProcfsError):
                self.pid = None
        raise ProcfsError("cannot read ksmd's CPU time from /proc/<ksmd>/stat")


@dataclass
class Collector:
    """Collect: one Observation from sysfs, ksmd's stat and /proc/meminfo."""

    sysfs: KsmSysfs
    procfs: ProcFs
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.ksmd = KsmdClock(self.procfs)

    def observe(self) -> Observation:
        c = self.sysfs.counters()
        info = self.procfs.meminfo()
        return Observation(
            time=self.clock(),
            pages_scanned=c.get("pages_scanned", 0), full_scans=c["full_scans"],
            pages_shared=c["pages_shared"], pages_sharing=c["pages_sharing"],
            pages_unshared=c["pages_unshared"], pages_volatile=c["pages_volatile"],
            general_profit=c.get("general_profit", 0),
            ksmd_cpu_seconds=self.ksmd.seconds(),
            mem_available=info.get("MemAvailable", info.get("MemFree", 0)),
            mem_total=info.get("MemTotal", 0),
            run=int(self.sysfs.read_knob("run")),
            pages_to_scan=int(self.sysfs.read_knob("pages_to_scan")),
            sleep_millisecs=int(self.sysfs.read_knob("sleep_millisecs")))


def act(sysfs: KsmSysfs, decision: Decision, audit: AuditLog | None
        ) -> list[tuple[str, int | str, int | str]]:
    """Apply a decision: each knob that differs is validated, written, read
    back (KsmSysfs.set) and audit-logged. Never unmerges.

    Returns (knob, before, after) for each change. Raises KnobError,
    AccessDenied, KsmUnavailable, AuditError.
    """
    changes: list[tuple[str, int | str, int | str]] = []
    for name, value in decision.knobs().items():
        if name == "run" and value == RUN_UNMERGE:
            raise KnobError("the tuner never unmerges (run=2)")
        sysfs.validate(name, value)
    for name, value in decision.knobs().items():
        before = sysfs.read_knob(name)
        if before == value:
            continue
        after = sysfs.set(name, value)
        if audit is not None:
            audit.record("knob", f"knob {name}", before, after,
                         f"tuner {decision.mode}: {decision.reason}")
        changes.append((name, before, after))
    return changes


def check_advisor(sysfs: KsmSysfs, take_over: bool, dry_run: bool,
                  audit: AuditLog | None) -> str | None:
    """Refuse to fight the kernel's own scan-time advisor unless told to take
    over; taking over sets advisor_mode=none. Returns a line to print, if any."""
    knobs = sysfs.knobs()
    if knobs.get("advisor_mode") != "scan-time":
        return None
    if not take_over:
        raise UsageError("the kernel's KSM advisor is on (advisor_mode=scan-time) and owns "
                         "pages_to_scan; pass --take-over to switch it off and tune instead")
    if dry_run:
        return "would switch the kernel advisor off (advisor_mode=scan-time -> none)"
    sysfs.set("advisor_mode", "none")
    if audit is not None:
        audit.record("knob", "knob advisor_mode", "scan-time", "none",
                     "tuner --take-over: the tuner owns pages_to_scan")
    return "kernel advisor switched off (advisor_mode=scan-time -> none)"


def decision_line(obs: Observation, d: Decision,
                  changes: list[tuple[str, int | str, int | str]] | None) -> str:
    cpu = "   -  " if d.cpu_pct is None else f"{d.cpu_pct:5.1f}%"
    knobs = (f"run={d.run}" if d.pages_to_scan is None else
             f"run={d.run} pages_to_scan={d.pages_to_scan} sleep={d.sleep_millisecs}ms")
    note = " (dry run)" if changes is None else ""
    return (f"{time.strftime('%H:%M:%S')} {d.mode:<5} {knobs:<42} sharing={obs.pages_sharing:,} "
            f"scans={obs.full_scans} ksmd={cpu} avail={d.available_fraction:.0%}{note}"
            f"\n    {d.reason}")


def decision_json(obs: Observation, d: Decision,
                  changes: list[tuple[str, int | str, int | str]] | None) -> str:
    doc: dict[str, Any] = {"time": time.time(), "mode": d.mode, "knobs": d.knobs(),
                           "reason": d.reason, "cpu_pct": d.cpu_pct,
                           "gain_per_scan": d.gain_per_scan,
                           "available_fraction": round(d.available_fraction, 4),
                           "observation": asdict(obs), "facts": d.facts,
                           "applied": None if changes is None else
                           [{"knob": n, "before": b, "after": a} for n, b, a in changes]}
    return json.dumps(doc, sort_keys=False)


class Stop(Exception):
    pass


def cmd_tune(ctx: Any) -> int:
    a = ctx.args
    if a.interval <= 0:
        raise UsageError("--interval must be positive")
    try:
        policy = Policy(cpu_budget_pct=a.cpu_budget, tight_available=a.tight / 100.0,
                        ample_available=a.ample / 100.0)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    sysfs: KsmSysfs = ctx.sysfs
    sysfs.require()
    audit = None if a.dry_run else AuditLog(Path(a.audit_log) if a.audit_log else None,
                                            actor="tuner")
    say: Callable[[str], None] = (lambda s: None) if a.json else (
        lambda s: print(s, flush=True))
    line = check_advisor(sysfs, a.take_over, a.dry_run, audit)
    if line:
        say(line)
    collector = Collector(sysfs, ctx.procfs)
    if a.dry_run:
        say("dry run: decisions are printed, no knob is written")
    else:
        say(f"vmshare tune: owning {', '.join(OWNED_KNOBS)} (cpu budget {a.cpu_budget:g}% of "
            "a core); nothing is restored on exit by design")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Stop()

    old = signal.signal(signal.SIGTERM, on_term)
    state = TunerState()
    try:
        state = decide(state, collector.observe(), policy)[1]
        steps = 0
        while True:
            time.sleep(a.interval)
            obs = collector.observe()
            decision, state = decide(state, obs, policy)
            changes = None if a.dry_run else act(sysfs, decision, audit)
            print(decision_json(obs, decision, changes) if a.json
                  else decision_line(obs, decision, changes), flush=True)
            steps += 1
            if a.once or (a.steps and steps >= a.steps):
                break
    except (Stop, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
    if not a.dry_run:
        k = sysfs.knobs()
        say(f"vmshare tune: exiting; KSM knobs left as the tuner set them (run={k['run']}, "
            f"pages_to_scan={k['pages_to_scan']}, sleep_millisecs={k['sleep_millisecs']}): "
            "nothing restored, by design")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    s = sub.add_parser("tune", help="tune kernel KSM from its own feedback within a ksmd "
                                    "CPU budget (a better ksmtuned)")
    s.add_argument("--once", action="store_true",
                   help="one step: observe, wait --interval, observe, decide, act")
    s.add_argument("--interval", type=float, default=5.0, metavar="S",
                   help="seconds between observations (default 5)")
    s.add_argument("--cpu-budget", type=float, default=Policy.cpu_budget_pct, metavar="PCT",
                   help="ksmd CPU budget, percent of one core (default %(default)g)")
    s.add_argument("--tight", type=float, default=Policy.tight_available * 100, metavar="PCT",
                   help="memory is tight below this MemAvailable %% of RAM (default "
                        "%(default)g)")
    s.add_argument("--ample", type=float, default=Policy.ample_available * 100, metavar="PCT",
                   help="memory is ample at or above this MemAvailable %% of RAM (default "
                        "%(default)g): converged KSM is stopped")
    s.add_argument("--steps", type=int, default=0, help="stop after this many decisions")
    s.add_argument("--dry-run", action="store_true", help="print decisions, write nothing")
    s.add_argument("--take-over", action="store_true",
                   help="switch the kernel's scan-time advisor off and tune instead")
    s.add_argument("--audit-log", metavar="PATH", help="audit log (default "
                   "$VMSHARE_AUDIT_LOG or /var/log/vmshare/audit.jsonl)")
    s.add_argument("--json", action="store_true", help="one JSON object per decision")
    s.set_defaults(func=cmd_tune)
