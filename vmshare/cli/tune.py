"""`vmshare tune`: a KSM tuner driven by KSM's own feedback (see vmshare/tuner/decide.py).

The loop and its printing; collect and act are vmshare.tuner.loop's (the daemon
runs the same steps with ``--tune``). Nothing is restored on exit: while it
runs the tuner owns run, pages_to_scan and sleep_millisecs, and it says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from vmshare.cli import argtypes
from vmshare.cli.context import warn
from vmshare.cli.shown import TUNE_AMPLE_AVAILABLE, TUNE_CPU_BUDGET_PCT, TUNE_TIGHT_AVAILABLE
from vmshare.control.lock import ControlBusy, control_lock
from vmshare.errors import UsageError

if TYPE_CHECKING:       # imported where used: start-up pays only for the command run
    from vmshare.ksm.sysfs import KsmSysfs
    from vmshare.tuner.decide import Decision, Observation
    from vmshare.tuner.loop import Changes


def decision_line(obs: Observation, d: Decision,
                  changes: Changes | None) -> str:
    cpu = "   -  " if d.cpu_pct is None else f"{d.cpu_pct:5.1f}%"
    knobs = (f"run={d.run}" if d.pages_to_scan is None else
             f"run={d.run} pages_to_scan={d.pages_to_scan} sleep={d.sleep_millisecs}ms")
    note = " (dry run)" if changes is None else ""
    return (f"{time.strftime('%H:%M:%S')} {d.mode:<5} {knobs:<42} sharing={obs.pages_sharing:,} "
            f"scans={obs.full_scans} ksmd={cpu} avail={d.available_fraction:.0%}{note}"
            f"\n    {d.reason}")


def decision_json(obs: Observation, d: Decision,
                  changes: Changes | None) -> str:
    from dataclasses import asdict
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


def print_decision(obs: Observation, decision: Decision, changes: Changes | None, *,
                   json_out: bool) -> None:
    print(decision_json(obs, decision, changes) if json_out
          else decision_line(obs, decision, changes), flush=True)


def cmd_tune(ctx: Any) -> int:
    from vmshare.config import TunerPolicy
    from vmshare.records.audit import AuditLog
    from vmshare.tuner.loop import OWNED_KNOBS, Tuner, check_advisor, tuner_lock
    a = ctx.args
    try:
        policy = TunerPolicy(cpu_budget_pct=a.cpu_budget, tight_available=a.tight / 100.0,
                        ample_available=a.ample / 100.0)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    sysfs: KsmSysfs = ctx.sysfs
    sysfs.require()
    audit = None if a.dry_run else AuditLog(Path(a.audit_log) if a.audit_log else None,
                                            actor="tuner")
    say: Callable[[str], None] = (lambda s: None) if a.json else (
        lambda s: print(s, flush=True))

    def acting(what: str) -> contextlib.AbstractContextManager[None]:
        # Each act, not the whole run, holds the host's control lock: an
        # `enable` or `ksm set` waits for one step, never for the tuner to end.
        return (contextlib.nullcontext() if a.dry_run
                else control_lock(f"vmshare tune: {what}", wait=a.lock_wait))

    # Only --take-over can write (advisor_mode=none); a plain start reads.
    with acting("advisor take-over") if a.take_over else contextlib.nullcontext():
        line = check_advisor(sysfs, a.take_over, a.dry_run, audit)
    if line:
        say(line)
    tuner = Tuner(sysfs, ctx.procfs, policy, audit, dry_run=a.dry_run)
    if a.dry_run:
        say("dry run: decisions are printed, no knob is written")
    else:
        say(f"vmshare tune: owning {', '.join(OWNED_KNOBS)} (cpu budget {a.cpu_budget:g}% of "
            "a core); nothing is restored on exit by design")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Stop()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with contextlib.nullcontext() if a.dry_run else tuner_lock():
            steps = 0
            if a.once:      # one measured decision, after one interval
                tuner.start()
            else:           # scan at the budget at once, not after an idle interval
                try:
                    with acting("start"):
                        first = tuner.start(act_now=True)
                except ControlBusy as exc:
                    warn(f"{exc}; this step is skipped")
                    tuner.start()
                else:
                    print_decision(*first, json_out=a.json)
                    steps += 1
            while not (a.steps and steps >= a.steps):
                time.sleep(a.interval)
                try:
                    with acting("step"):
                        obs, decision, changes = tuner.step()
                except ControlBusy as exc:
                    warn(f"{exc}; this step is skipped")
                    continue
                print_decision(obs, decision, changes, json_out=a.json)
                steps += 1
                if a.once:
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
    s.add_argument("--interval", type=argtypes.seconds(), default=5.0, metavar="S",
                   help="seconds between observations, greater than 0 and at most "
                        f"{argtypes.MAX_SECONDS:g} (default 5)")
    s.add_argument("--cpu-budget", type=argtypes.finite_float(0, 100, lo_open=True),
                   default=TUNE_CPU_BUDGET_PCT, metavar="PCT",
                   help="ksmd CPU budget, percent of one core (default %(default)g)")
    s.add_argument("--tight", type=argtypes.PERCENT, default=TUNE_TIGHT_AVAILABLE * 100,
                   metavar="PCT",
                   help="memory is tight below this MemAvailable %% of RAM (default "
                        "%(default)g)")
    s.add_argument("--ample", type=argtypes.PERCENT, default=TUNE_AMPLE_AVAILABLE * 100,
                   metavar="PCT",
                   help="memory is ample at or above this MemAvailable %% of RAM (default "
                        "%(default)g): converged KSM is stopped")
    s.add_argument("--steps", type=argtypes.bounded_int(0, 10**9), default=0,
                   help="stop after this many decisions")
    s.add_argument("--dry-run", action="store_true", help="print decisions, write nothing")
    s.add_argument("--take-over", action="store_true",
                   help="switch the kernel's scan-time advisor off and tune instead")
    s.add_argument("--audit-log", metavar="PATH", help="audit log (default "
                   "$VMSHARE_AUDIT_LOG or /var/log/vmshare/audit.jsonl)")
    s.add_argument("--json", action="store_true", help="one JSON object per decision")
    s.set_defaults(func=cmd_tune)
