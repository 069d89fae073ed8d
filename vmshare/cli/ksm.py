"""``vmshare ksm show|start|stop|unmerge|set``: the kernel KSM engine's knobs and counters."""

from __future__ import annotations

from typing import Any

from vmshare.cli.context import Context, emit_json, out
from vmshare.errors import UsageError


def cmd_ksm(ctx: Context) -> int:
    from vmshare.control import knobs as control
    from vmshare.ksm.sysfs import KNOBS
    from vmshare.present import text as report
    a = ctx.args
    sysfs = ctx.sysfs
    sysfs.require()
    if a.ksm_cmd == "show":
        from vmshare.tuner.loop import OWNED_KNOBS, tuner_holder
        tuner = tuner_holder()
        if a.json:
            emit_json({"knobs": sysfs.knobs(), "counters": sysfs.counters(),
                       "tuner_pid": tuner})
        else:
            out(report.ksm_show(sysfs.counters(), sysfs.knobs(),
                                {k: s.meaning for k, s in KNOBS.items()}))
            out("tuner: none" if tuner is None else
                f"tuner: a vmshare tuner (pid {tuner}) owns {', '.join(OWNED_KNOBS)}")
        return 0
    if a.ksm_cmd == "start":
        assignments = {"run": "1"}
        if a.pages_to_scan is not None:
            assignments["pages_to_scan"] = str(a.pages_to_scan)
        if a.sleep_millisecs is not None:
            assignments["sleep_millisecs"] = str(a.sleep_millisecs)
        changes = control.apply_knobs(sysfs, ctx.procfs, assignments)
    elif a.ksm_cmd == "stop":
        changes = control.apply_knobs(sysfs, ctx.procfs, {"run": "0"})
    elif a.ksm_cmd == "unmerge":
        before = control.unmerge_all(sysfs, ctx.procfs, force=a.force)
        out(f"unmerged: pages_sharing {before:,} -> {sysfs.read_int('pages_sharing'):,}; "
            "ksmd stopped (run=2)")
        return 0
    else:
        assignments = {}
        for item in a.assignments:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise UsageError(f"expected KNOB=VALUE, got {item!r}")
            assignments[name.strip()] = value.strip()
        changes = control.apply_knobs(sysfs, ctx.procfs, assignments,
                                      allow_unmerge=a.unmerge, force=a.force)
    for name, before_v, after_v in changes:
        out(f"{name}: {before_v} -> {after_v}")
    return 0



def register(sub: Any) -> None:
    s = sub.add_parser("ksm", help="the kernel KSM engine: start|stop|unmerge|show|set")
    ksub = s.add_subparsers(dest="ksm_cmd", metavar="ACTION", required=True)
    k = ksub.add_parser("show", help="every knob and counter, with the kernel's meaning")
    k.add_argument("--json", action="store_true",
                   help="one JSON object: knobs, counters, tuner_pid")
    k = ksub.add_parser("start", help="run ksmd (run=1)")
    k.add_argument("--pages-to-scan", type=int, help="set pages_to_scan too")
    k.add_argument("--sleep-millisecs", type=int, help="set sleep_millisecs too")
    ksub.add_parser("stop", help="stop ksmd, keep merged pages (run=0)")
    k = ksub.add_parser("unmerge", help="stop ksmd and unmerge everything (run=2)")
    k.add_argument("--force", action="store_true", help="skip the free-memory check")
    k = ksub.add_parser("set", help="set knobs: KNOB=VALUE ...")
    k.add_argument("assignments", nargs="+", metavar="KNOB=VALUE")
    k.add_argument("--unmerge", action="store_true",
                   help="unmerge first if a knob can only change with nothing merged")
    k.add_argument("--force", action="store_true", help="skip the free-memory check")
    s.set_defaults(func=cmd_ksm)
