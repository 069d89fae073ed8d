"""``vmshare daemon`` and ``vmshare remerge``: argument parsing only.

The daemon itself is vmshare.daemon.service (edge) over vmshare.daemon.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vmshare.cli import argtypes


def cmd_daemon(ctx: Any) -> int:
    from vmshare.config import load_config
    from vmshare.daemon.service import run_daemon
    a = ctx.args
    config = load_config(a.config)
    level = logging.DEBUG if a.debug else logging.INFO
    return run_daemon(config, once=a.once, uri=a.connect,
                      qmp_globs=tuple(a.qmp_glob or ()), observe_interval=a.observe_interval,
                      resync_interval=a.resync_interval, deadline=a.deadline,
                      domains=tuple(a.domain or ()), tune=True if a.tune else None,
                      level=level)


def cmd_remerge(ctx: Any) -> int:
    """Re-merge progress of running VMs: status's figures joined with the daemon's state."""
    from vmshare.cli.context import emit_json, out
    from vmshare.config import load_config
    from vmshare.observe import remerge
    from vmshare.present import text as report
    config = load_config(ctx.args.config)
    host = ctx.observer().host(ctx.args.domains or None)
    doc = remerge.status_for(report.status_json(host), config.daemon.state_file)
    if ctx.args.json:
        emit_json({"vms": [{"name": v["name"], "pid": v["pid"], "ksm_pages": v["ksm_pages"],
                            "remerge": v["remerge"]} for v in doc["vms"]]})
        return 0
    lines = remerge.status_lines(doc)
    out("\n".join(lines) if lines else "no VM is re-merging after a restore, migration, "
        "reset, hotplug or restart")
    return 0


MAX_INTERVAL = 86400.0
#: an interval: finite, 0.1 s to a day (nan, inf, 0 and negatives would spin or never fire)
INTERVAL = argtypes.finite_float(0.1, MAX_INTERVAL)




def register(sub: Any) -> None:
    s: argparse.ArgumentParser = sub.add_parser(
        "daemon", help="run the vmshare daemon: apply policy on lifecycle events")
    s.add_argument("--config", metavar="PATH", help="host config (default "
                   "/etc/vmshare/vmshare.toml or $VMSHARE_CONFIG)")
    s.add_argument("--once", action="store_true",
                   help="reconcile every running VM once and exit")
    s.add_argument("--qmp-glob", action="append", metavar="GLOB",
                   help="plain QEMU mode: watch QMP sockets matching GLOB (repeatable; "
                   "overrides [daemon] qmp_sockets)")
    s.add_argument("--domain", action="append", metavar="GLOB",
                   help="manage only domains whose name matches GLOB (repeatable; default "
                        "all; also $VMSHARE_DAEMON_DOMAINS, comma-separated); the others "
                        "still count for trust groups")
    s.add_argument("--observe-interval", type=INTERVAL, default=10.0, metavar="SECONDS",
                   help="how often to record each VM's KSM pages (default 10)")
    s.add_argument("--resync-interval", type=INTERVAL, default=60.0, metavar="SECONDS",
                   help="how often to reconcile everything regardless of events (default 60)")
    s.add_argument("--tune", action="store_true",
                   help="also run the KSM tuner (as `vmshare tune`; [daemon] tune, "
                        "tune_interval and tune_cpu_budget in the config)")
    s.set_defaults(func=cmd_daemon)

    s = sub.add_parser("remerge", help="re-merge progress after restore/migration/reset")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.add_argument("--config", metavar="PATH", help="host config naming the state file")
    s.add_argument("--json", action="store_true",
                   help="one JSON object: vms, each with its re-merge progress")
    s.set_defaults(func=cmd_remerge)
