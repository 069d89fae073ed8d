"""The `vmshare` command: argument parsing, printing and exit codes only.

Modelled on virsh: ``-c/--connect URI`` picks the libvirt connection
(default qemu:///system); ``--qmp SOCKET`` talks to a plain QEMU instead.
A user mistake prints one line ``vmshare: error: ...`` and exits non-zero;
tracebacks appear only with --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmshare import __version__
from vmshare.errors import UsageError, VmshareError
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import DEFAULT_ROOT, KNOBS, KsmSysfs

log = logging.getLogger("vmshare")

EXIT_INTERNAL = 70

# Edge modules that add command groups (see build_parser).
EXTENSION_MODULES: tuple[str, ...] = ("vmshare.cli_policy", "vmshare.cli_hook",
                                      "vmshare.cli_engine", "vmshare.cli_metrics",
                                      "vmshare.cli_daemon", "vmshare.cli_tune")


class Context:
    """What every command needs; adapters are created on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sysfs = KsmSysfs(Path(os.environ.get("VMSHARE_SYSFS_ROOT", str(DEFAULT_ROOT))))
        self.procfs = ProcFs(Path(os.environ.get("VMSHARE_PROC_ROOT", "/proc")))
        self._hv: Any = None

    @property
    def hv(self) -> Any:
        if self._hv is None:
            from vmshare.hypervisor import connect
            self._hv = connect(self.args.connect, self.args.qmp, self.args.deadline)
        return self._hv

    def observer(self) -> Any:
        from vmshare.observe import Observer
        return Observer(self.hv, self.sysfs, self.procfs)

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()


def out(text: str = "") -> None:
    print(text, flush=True)


def emit_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False), flush=True)


# ---------------------------------------------------------------- commands
def cmd_list(ctx: Context) -> int:
    from vmshare.report import backend_json, mib, table
    obs = ctx.observer()
    rows: list[list[str]] = []
    data: list[dict[str, Any]] = []
    for ref in ctx.hv.list_vms():
        facts = ctx.hv.facts(ref)
        if facts.pid is None:
            rows.append([ref.name, "shut off", "-", "", "", "", "", ""])
            data.append({"name": ref.name, "uuid": ref.uuid, "running": False, "backends": []})
            continue
        views = obs.backends(ref, facts)
        entry: dict[str, Any] = {"name": ref.name, "uuid": ref.uuid, "running": True,
                                 "pid": facts.pid, "backends": []}
        for v in views:
            b = v.backend
            mg = "-" if v.mg_flag is None else ("yes" if v.mg_flag else "no")
            rows.append([ref.name, "running", b.id, b.qom_type.removeprefix("memory-backend-"),
                         mib(b.size), "on" if b.merge else "off", mg,
                         "yes" if v.ineligible_reason is None else f"no: {v.ineligible_reason}"])
            entry["backends"].append(backend_json(v))
        if not views:
            rows.append([ref.name, "running", "(none)", "", "", "", "", ""])
        data.append(entry)
    if ctx.args.json:
        emit_json({"vms": data})
    else:
        out(table(["DOMAIN", "STATE", "BACKEND", "TYPE", "SIZE", "MERGE", "MG", "ELIGIBLE"],
                  rows, right=(4,)))
    return 0


def cmd_merge(ctx: Context, merge: bool) -> int:
    # Trust groups, the host switch and the audit log live with the policy commands.
    from vmshare.cli_policy import run_merge
    return run_merge(ctx, ctx.args.domain, merge, backend=ctx.args.backend,
                     force=getattr(ctx.args, "force", False), as_json=ctx.args.json)


def cmd_status(ctx: Context) -> int:
    from vmshare import remerge, report
    host = ctx.observer().host(ctx.args.domains or None)
    # Re-merge progress after restore/migration/reset/hotplug, from the daemon's state.
    doc = remerge.status_for(report.status_json(host))
    if ctx.args.json:
        emit_json(doc)
        return 0
    out(report.host_summary(host))
    out()
    out(report.status_table(host))
    for line in remerge.status_lines(doc):
        out(line)
    if ctx.args.matrix:
        out()
        out(report.matrix(host))
    return 0


def cmd_ksm(ctx: Context) -> int:
    from vmshare import control, report
    a = ctx.args
    sysfs = ctx.sysfs
    sysfs.require()
    if a.ksm_cmd == "show":
        from vmshare.tuning import OWNED_KNOBS, tuner_holder
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


def cmd_history(ctx: Context) -> int:
    import time

    from vmshare import history
    from vmshare.config import load_config
    from vmshare.report import mib, table
    a = ctx.args
    store = history.HistoryStore(load_config(a.config).daemon.history_file)
    try:
        since = time.time() - history.parse_duration(a.since) if a.since else 0.0
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from exc
    samples = list(store.read(since))
    if a.json:
        emit_json({"file": str(store.path), "samples": samples})
        return 0
    if not samples:
        out(f"no history in {store.path} (the daemon records it every "
            "[daemon] history_interval seconds)")
        return 0
    names = sorted({n for s in samples for n in s.get("vms", {})})
    if a.domain:
        if a.domain not in names:
            raise UsageError(f"no history for {a.domain!r} in {store.path}")
        names = [a.domain]
    span = samples[-1]["time"] - samples[0]["time"]
    out(f"{len(samples)} samples over {span / 3600:.1f} h from {store.path}")
    for label, vm in [("host", None), *[(n, n) for n in names[:8]]]:
        s = history.summary(samples, vm)
        out(f"  {label:<20} {history.sparkline(history.downsample(s['series'], 40))}  "
            f"now {mib(s['last'])}, min {mib(s['min'])}, max {mib(s['max'])}")
    rows = []
    shown = names[:6]
    for rec in history.downsample(samples, a.rows):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["time"]))
        rows.append([when, mib(history.host_saved_bytes(rec)),
                     *[mib(history.vm_saved_bytes(rec, n)) for n in shown]])
    out()
    out(table(["TIME", "HOST SAVED", *[f"{n} SAVED" for n in shown]], rows,
              right=tuple(range(1, 2 + len(shown)))))
    return 0


def cmd_report(ctx: Context) -> int:
    import socket
    import time

    from vmshare import history, report_html
    from vmshare.config import load_config
    a = ctx.args
    host = ctx.observer().host()
    try:
        since = time.time() - history.parse_duration(a.since)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from exc
    store = history.HistoryStore(load_config(a.config).daemon.history_file)
    page = report_html.render(host, list(store.read(since)),
                              hostname=socket.gethostname()).encode("utf-8")
    target = Path(a.html)
    # Operator data: 0600, written whole or not at all (the daemon state's writer).
    from vmshare.daemon.state import StateError, write_atomic
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: no directory {target.parent}")
    try:
        write_atomic(target, page)
    except StateError as exc:
        raise UsageError(str(exc)) from exc
    out(f"wrote {target} ({len(page):,} bytes)")
    return 0


def cmd_demo(ctx: Context) -> int:
    from vmshare.demo import DemoOptions, run_demo
    a = ctx.args
    opts = DemoOptions(guests=a.guests, memory_mib=a.memory, identical_mib=a.identical,
                       unique_mib=a.unique, zero_mib=a.zero, keep=a.keep,
                       timeout=a.timeout, uri=a.connect or "qemu:///system")
    return run_demo(opts, out=out)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmshare",
        description="Per-VM KSM control and exact per-VM memory-sharing accounting.")
    p.add_argument("--version", action="version", version=f"vmshare {__version__}")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt connection URI, as in virsh (default qemu:///system)")
    p.add_argument("--qmp", metavar="SOCKET",
                   help="talk to a plain QEMU over its QMP unix socket instead of libvirt")
    p.add_argument("--deadline", type=float, default=10.0, metavar="SECONDS",
                   help="deadline for every libvirt/QMP call (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("list", help="domains, their RAM backends, merge state, eligibility")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    for name, merge in (("enable", True), ("disable", False)):
        s = sub.add_parser(name, help=f"make a domain's RAM {'' if merge else 'un'}mergeable "
                           "now, and verify it")
        s.add_argument("domain", metavar="DOMAIN", help="name, UUID or id")
        s.add_argument("--backend", metavar="ID", help="only this memory backend")
        s.add_argument("--json", action="store_true")
        if not merge:
            s.add_argument("--force", action="store_true",
                           help="unmerge even if MemAvailable looks too small")
        s.set_defaults(func=lambda ctx, m=merge: cmd_merge(ctx, m))

    s = sub.add_parser("status", help="host KSM counters and exact per-VM savings")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.add_argument("--json", action="store_true", help="one JSON object: host, vms")
    s.add_argument("--matrix", action="store_true", help="also show which VMs share with which")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("ksm", help="the kernel KSM engine: start|stop|unmerge|show|set")
    ksub = s.add_subparsers(dest="ksm_cmd", metavar="ACTION", required=True)
    k = ksub.add_parser("show", help="every knob and counter, with the kernel's meaning")
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("start", help="run ksmd (run=1)")
    k.add_argument("--pages-to-scan", type=int)
    k.add_argument("--sleep-millisecs", type=int)
    ksub.add_parser("stop", help="stop ksmd, keep merged pages (run=0)")
    k = ksub.add_parser("unmerge", help="stop ksmd and unmerge everything (run=2)")
    k.add_argument("--force", action="store_true", help="skip the free-memory check")
    k = ksub.add_parser("set", help="set knobs: KNOB=VALUE ...")
    k.add_argument("assignments", nargs="+", metavar="KNOB=VALUE")
    k.add_argument("--unmerge", action="store_true",
                   help="unmerge first if a knob can only change with nothing merged")
    k.add_argument("--force", action="store_true", help="skip the free-memory check")
    s.set_defaults(func=cmd_ksm)

    s = sub.add_parser("history", help="savings over time, as recorded by the daemon")
    s.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this VM")
    s.add_argument("--since", metavar="DURATION", help="e.g. 30m, 6h, 2d (default: all)")
    s.add_argument("--rows", type=int, default=20, help="table rows (default 20)")
    s.add_argument("--config", metavar="PATH", help="host config naming the history file")
    s.add_argument("--json", action="store_true", help="every sample, as recorded")
    s.set_defaults(func=cmd_history)

    s = sub.add_parser("report", help="a self-contained HTML report (charts, matrix, history)")
    s.add_argument("--html", required=True, metavar="FILE", help="where to write it (0600)")
    s.add_argument("--since", default="24h", metavar="DURATION",
                   help="history shown (default 24h)")
    s.add_argument("--config", metavar="PATH", help="host config naming the history file")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("demo", help="boot small guests, merge them, show per-VM savings")
    s.add_argument("--guests", type=int, default=3)
    s.add_argument("--memory", type=int, default=256, metavar="MiB")
    s.add_argument("--identical", type=int, default=96, metavar="MiB")
    s.add_argument("--unique", type=int, default=32, metavar="MiB")
    s.add_argument("--zero", type=int, default=16, metavar="MiB")
    s.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    s.add_argument("--keep", action="store_true", help="leave the guests running")
    s.set_defaults(func=cmd_demo)

    # Command groups that live in their own edge modules: each has
    # ``register(sub)`` adding its subparsers with ``func(ctx: Context) -> int``.
    for module in EXTENSION_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="vmshare: %(levelname)s: %(name)s: %(message)s")
    func: Callable[[Context], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    ctx = Context(args)
    try:
        return func(ctx)
    except VmshareError as exc:
        log.debug("error detail", exc_info=True)
        print(f"vmshare: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vmshare: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:   # a bug: one line, traceback only with --debug
        if args.debug:
            raise
        print(f"vmshare: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        with contextlib.suppress(VmshareError):
            ctx.close()
