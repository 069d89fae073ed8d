"""`vmshare predict` and `vmshare scan`: the userspace engine's commands (an edge module).

predict: what kernel KSM would save if the given domains, dumps or processes
were mergeable, from a fresh engine run until its counters stop changing.
scan: one engine kept across passes over live domains, counters per pass.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from vmshare.cli import argtypes
from vmshare.errors import UsageError

if TYPE_CHECKING:       # imported where used: start-up pays only for the command run
    from vmshare.engine import EngineConfig, KsmCounters

#: the kernel's PID_MAX_LIMIT on 64-bit: no process id is larger
PID_MAX = 4_194_304
COUNTER_ORDER = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "ksm_zero_pages", "stable_node_chains", "stable_node_dups")


def _engine_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--max-page-sharing", type=argtypes.bounded_int(2, 2**31 - 1), default=256,
                   metavar="N",
                   help="the kernel knob to assume (default 256)")
    s.add_argument("--use-zero-pages", action="store_true",
                   help="assume use_zero_pages=1 (zero pages map the zero page)")
    s.add_argument("--json", action="store_true", help="JSON output, no progress bar")
    s.add_argument("--buffer-mib", type=argtypes.bounded_int(1, 4096), default=32,
                   metavar="MIB",
                   help="the bounded buffer every source is read through, whatever the "
                        "guest's size (default 32)")
    s.add_argument("--low-memory", action="store_true",
                   help="deprecated, no effect: every scan keeps no copy of guest memory")


LOW_MEMORY_NOTE = ("--low-memory is deprecated and has no effect: every scan reads through "
                   "a bounded buffer (--buffer-mib) and keeps no copy of guest memory")


def _config(a: argparse.Namespace) -> EngineConfig:
    from vmshare.engine import EngineConfig
    return EngineConfig(max_page_sharing=a.max_page_sharing, use_zero_pages=a.use_zero_pages)


def _progress(a: argparse.Namespace) -> Any:
    from vmshare.present.progress import ProgressBar
    return ProgressBar(enabled=not a.json)


def _counters_dict(c: KsmCounters) -> dict[str, int]:
    return {k: getattr(c, k) for k in COUNTER_ORDER}


# ---------------------------------------------------------------- predict
def targets_of(ctx: Any) -> tuple[list[Any], dict[str, str] | None, list[str]]:
    """The command's domains, --dump, --raw and --pid as targets, and with
    --trust-groups (or ``always_groups``) each one's trust group and notes."""
    from vmshare.prediction import predict as pr
    a = ctx.args
    if not (a.domains or a.dump or a.raw or a.pid):
        raise UsageError(f"nothing to {a.command}: give domains, --dump FILE or --pid PID")
    targets: list[pr.Target] = []
    if a.domains:
        observer = ctx.observer()
        targets += [pr.domain_target(ctx.hv, observer, name, ctx.procfs) for name in a.domains]
    for path in a.dump:
        targets.append(pr.dump_target(path))
    for path in a.raw:
        targets.append(pr.dump_target(path, raw=True))
    for pid in a.pid:
        targets.append(pr.pid_target(pid, ctx.procfs))
    pr.check_unique(targets)
    groups = None
    notes: list[str] = []
    if a.trust_groups:
        from vmshare.config import load_config
        groups, notes = pr.trust_groups(ctx.hv if a.domains else None, targets,
                                        load_config(a.config))
    return targets, groups, notes


def cmd_predict(ctx: Any) -> int:
    from vmshare.cli.context import emit_json, out
    from vmshare.prediction import predict as pr
    a = ctx.args
    config = _config(a)
    if a.estimate and (a.scans is not None or a.low_memory):
        raise UsageError("--scans and --low-memory are for the exact engine, not --estimate")
    if a.rate is not None and not a.estimate:
        raise UsageError("--rate is the sampling rate of --estimate: add --estimate")
    targets, groups, notes = targets_of(ctx)
    if a.estimate:
        from vmshare.cli.estimate import print_estimate
        return print_estimate(ctx, targets, groups, notes, config)
    with _progress(a) as bar:
        result = pr.predict(targets, config, groups=groups, scans=a.scans,
                            progress=bar.update, buffer_bytes=a.buffer_mib * 2**20)
    all_notes = [*notes, *result.notes, *([LOW_MEMORY_NOTE] if a.low_memory else [])]
    if a.json:
        emit_json(prediction_json(result, all_notes))
    else:
        out(prediction_text(result, all_notes))
    return 0


def _source_json(s: Any) -> dict[str, Any]:
    from vmshare.model import PAGE_SIZE
    return {"name": s.name, "kind": s.kind, "pages": s.pages, "ksm_pages": s.ksm_pages,
            "saved_bytes": s.saved_bytes, "saved_pages": round(float(s.saved), 3),
            "zero_pages": s.zero_pages, "zero_content_pages": s.zero_content_pages,
            "unshared_pages": s.unshared_pages,
            "shares_with": {k: v * PAGE_SIZE for k, v in s.shares_with.items()}}


def prediction_json(result: Any, notes: list[str]) -> dict[str, Any]:
    from vmshare.model import PAGE_SIZE
    totals = result.totals()
    return {
        "config": {"max_page_sharing": result.config.max_page_sharing,
                   "use_zero_pages": int(result.config.use_zero_pages),
                   "trust_groups": any(g.group is not None for g in result.groups)},
        "groups": [{"group": g.group, "scans": g.scans, "converged": g.converged,
                    "counters": _counters_dict(g.counters), "saved_bytes": g.saved_bytes,
                    "sources": [_source_json(s) for s in g.sources]}
                   for g in result.groups],
        "totals": {**totals, "saved_bytes": totals["pages_sharing"] * PAGE_SIZE},
        "page_size": PAGE_SIZE,
        "notes": notes,
    }


def _counters_line(c: dict[str, int]) -> str:
    return ", ".join(f"{k}={c[k]:,}" for k in COUNTER_ORDER)


def prediction_text(result: Any, notes: list[str]) -> str:
    from vmshare.model import PAGE_SIZE
    from vmshare.present.text import mib, table
    cfg = result.config
    lines = [f"Prediction by the userspace KSM engine (max_page_sharing={cfg.max_page_sharing}, "
             f"use_zero_pages={int(cfg.use_zero_pages)})"]
    for g in result.groups:
        lines.append("")
        state = (f"converged after {g.scans} scans" if g.converged
                 else f"not converged after {g.scans} scans (memory still changing)")
        head = f"Trust group {g.group!r}: " if g.group is not None else ""
        lines.append(f"{head}{state}")
        rows = [[s.name, s.kind, f"{s.pages:,}", f"{s.ksm_pages:,}", mib(s.saved_bytes),
                 f"{s.zero_pages:,}", f"{s.zero_content_pages:,}", f"{s.unshared_pages:,}"]
                for s in g.sources]
        lines.append(table(["SOURCE", "KIND", "PAGES", "KSM PAGES", "SAVED", "ZERO PAGES",
                            "ZERO CONTENT", "UNSHARED"], rows, right=(2, 3, 4, 5, 6, 7)))
        names = [s.name for s in g.sources]
        if len(names) > 1:
            lines.append("")
            lines.append("Pages of each row's source on a KSM page the column's source maps "
                         "too (MiB):")
            by = {s.name: s.shares_with for s in g.sources}
            mrows = [[x, *["-" if x == y else f"{by[x].get(y, 0) * PAGE_SIZE / 2**20:,.1f}"
                           for y in names]] for x in names]
            lines.append(table(["SHARES WITH", *names], mrows,
                               right=tuple(range(1, len(names) + 1))))
        lines.append(f"Counters: {_counters_line(_counters_dict(g.counters))}")
    totals = result.totals()
    zero_content = sum(s.zero_content_pages for g in result.groups for s in g.sources)
    lines.append("")
    lines.append(f"Total: pages_sharing={totals['pages_sharing']:,} would save "
                 f"{mib(totals['pages_sharing'] * PAGE_SIZE)} over "
                 f"pages_shared={totals['pages_shared']:,}; ksm_zero_pages="
                 f"{totals['ksm_zero_pages']:,}; all-zero pages seen: {zero_content:,} "
                 f"({mib(zero_content * PAGE_SIZE)})")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


# ---------------------------------------------------------------- scan
def cmd_scan(ctx: Any) -> int:
    from vmshare.cli.context import emit_json, out
    from vmshare.model import PAGE_SIZE
    from vmshare.prediction import predict as pr
    from vmshare.present.text import mib
    a = ctx.args
    observer = ctx.observer()
    scanner = pr.LiveScanner([pr.domain_target(ctx.hv, observer, n, ctx.procfs)
                              for n in a.domains], _config(a),
                             buffer_bytes=a.buffer_mib * 2**20)
    if a.low_memory and not a.json:
        out(f"note: {LOW_MEMORY_NOTE}")
    headers = ["PASS", "SECONDS", "PAGES", "SHARED", "SHARING", "UNSHARED", "VOLATILE",
               "ZERO", "CHAINS", "DUPS", "SAVED"]
    widths = [max(len(h), w) for h, w in
              zip(headers, (4, 7, 11, 9, 11, 11, 9, 9, 6, 6, 12), strict=True)]
    if not a.json:
        out("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    i = 0
    while a.count == 0 or i < a.count:
        if i:
            time.sleep(a.interval)
        with _progress(a) as bar:
            label = f"pass {i + 1}"

            def show(frac: float, bar: Any = bar, label: str = label) -> None:
                bar.update(frac, label)
            p = scanner.scan(progress=show)
        c = _counters_dict(p.counters)
        if a.json:
            emit_json({"pass": p.index, "seconds": round(p.stats.seconds, 3),
                       "pages": p.stats.pages_fed, "counters": c,
                       "saved_bytes": c["pages_sharing"] * PAGE_SIZE,
                       "sources": [_source_json(s) for s in p.sources],
                       "notes": list(p.notes)})
        else:
            cells = [str(p.index), f"{p.stats.seconds:.2f}", f"{p.stats.pages_fed:,}",
                     f"{c['pages_shared']:,}", f"{c['pages_sharing']:,}",
                     f"{c['pages_unshared']:,}", f"{c['pages_volatile']:,}",
                     f"{c['ksm_zero_pages']:,}", f"{c['stable_node_chains']:,}",
                     f"{c['stable_node_dups']:,}", mib(c["pages_sharing"] * PAGE_SIZE)]
            out("  ".join(x.rjust(w) for x, w in zip(cells, widths, strict=True)))
            for n in p.notes if p.index == 1 else ():
                out(f"note: {n}")
        i += 1
    return 0


# ---------------------------------------------------------------- parser
def target_options(s: argparse.ArgumentParser) -> None:
    """DOMAIN..., --dump, --raw, --pid: what ``targets_of`` reads (predict, sketch)."""
    s.add_argument("domains", nargs="*", metavar="DOMAIN", help="running domains (live RAM)")
    s.add_argument("--dump", action="append", default=[], metavar="FILE",
                   help="a guest memory dump (ELF core or kdump); repeatable")
    s.add_argument("--raw", action="append", default=[], metavar="FILE",
                   help="a raw guest RAM image (pmemsave); repeatable")
    s.add_argument("--pid", action="append", default=[], type=argtypes.bounded_int(1, PID_MAX),
                   metavar="PID",
                   help="a process's private anonymous memory; repeatable")


def register(sub: Any) -> None:
    s = sub.add_parser("predict", help="what kernel KSM would save for these domains, dumps "
                       "or processes (userspace engine, changes nothing)")
    target_options(s)
    s.add_argument("--trust-groups", action="store_true",
                   help="share only within trust groups (one engine per group)")
    s.add_argument("--config", metavar="FILE", help="host config for trust groups and, "
                   "with --estimate, [sketch] rate "
                   "(default $VMSHARE_CONFIG or /etc/vmshare/vmshare.toml)")
    s.add_argument("--scans", type=argtypes.bounded_int(1, 1000), metavar="N",
                   help="run exactly N scans (default: until the counters stop changing, "
                   "at most 5)")
    s.add_argument("--estimate", action="store_true",
                   help="estimate from a content sample (one read of each page, no "
                        "engine run), with 95%% intervals")
    s.add_argument("--rate", type=argtypes.rate, default=None, metavar="R",
                   help="with --estimate: the sampling rate, e.g. 1/16 or 0.0625 "
                        "(default: the config's [sketch] rate, 1/16)")
    _engine_options(s)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("scan", help="live incremental engine scan of domains, counters "
                       "per pass")
    s.add_argument("domains", nargs="+", metavar="DOMAIN")
    s.add_argument("--interval", type=argtypes.seconds(zero_ok=True), default=2.0,
                   metavar="SECONDS", help="pause between passes, 0 to "
                   f"{argtypes.MAX_SECONDS:g} (default 2)")
    s.add_argument("--count", type=argtypes.bounded_int(0, 10**9), default=5, metavar="N",
                   help="number of passes, 0 for until interrupted (default 5)")
    _engine_options(s)
    s.set_defaults(func=cmd_scan)
