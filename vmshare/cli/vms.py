"""``vmshare list``, ``enable``, ``disable`` and ``status``: the VMs, their merge
state and their exact savings."""

from __future__ import annotations

from typing import Any

from vmshare.cli.context import Context, emit_json, out
from vmshare.errors import DomainNotFound, DomainNotRunning, ProcessGone


def cmd_list(ctx: Context) -> int:
    from vmshare.present.text import backend_json, mib, table
    obs = ctx.observer()
    rows: list[list[str]] = []
    data: list[dict[str, Any]] = []
    for ref in ctx.hv.list_vms():
        try:
            facts = ctx.hv.facts(ref)
            maps = obs.mappings(ref, facts) if facts.pid is not None else None
        except (DomainNotFound, DomainNotRunning, ProcessGone):
            continue      # it went away while we listed: it is no longer on the host
        if facts.pid is None or maps is None:
            rows.append([ref.name, "shut off", "-", "", "", "", "", ""])
            data.append({"name": ref.name, "uuid": ref.uuid, "running": False, "backends": []})
            continue
        views = maps.backends
        entry: dict[str, Any] = {"name": ref.name, "uuid": ref.uuid, "running": True,
                                 "pid": facts.pid, "backends": [],
                                 "unmergeable": maps.unmergeable,
                                 "other_mergeable_bytes": maps.other_mergeable_bytes,
                                 "other_mergeable_mappings": len(maps.other_mergeable)}
        for v in views:
            b = v.backend
            mg = "-" if v.mg_flag is None else ("yes" if v.mg_flag else "no")
            rows.append([ref.name, "running", b.id, b.qom_type.removeprefix("memory-backend-"),
                         mib(b.size), "on" if b.merge else "off", mg,
                         "yes" if v.ineligible_reason is None else f"no: {v.ineligible_reason}"])
            entry["backends"].append(backend_json(v))
        if not views:
            rows.append([ref.name, "running", "(none)", "", "", "", "", ""])
        if maps.other_mergeable:
            # QEMU's other RAM blocks under mem-merge=on (VRAM, ROMs): mergeable
            # whatever the backends say, so the VM is not unmergeable.
            rows.append([ref.name, "running", "(other)", "non-RAM",
                         mib(maps.other_mergeable_bytes), "-", "yes",
                         f"{len(maps.other_mergeable)} mapping(s) outside the RAM backends; "
                         "never unmergeable until adopted ('vmshare policy adopt') and "
                         "restarted"])
        data.append(entry)
    if ctx.args.json:
        emit_json({"vms": data})
    else:
        out(table(["DOMAIN", "STATE", "BACKEND", "TYPE", "SIZE", "MERGE", "MG", "ELIGIBLE"],
                  rows, right=(4,)))
    return 0


def cmd_merge(ctx: Context, merge: bool) -> int:
    # Trust groups, the host switch and the audit log live with the policy commands.
    from vmshare.cli.policy import run_merge
    return run_merge(ctx, ctx.args.domain, merge, backend=ctx.args.backend,
                     force=getattr(ctx.args, "force", False), as_json=ctx.args.json)


def cmd_status(ctx: Context) -> int:
    from vmshare.observe import remerge
    from vmshare.present import text as report
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



def register(sub: Any) -> None:
    s = sub.add_parser("list", help="domains, their RAM backends, merge state, eligibility")
    s.add_argument("--json", action="store_true", help="one JSON object: vms")
    s.set_defaults(func=cmd_list)

    for name, merge in (("enable", True), ("disable", False)):
        s = sub.add_parser(name, help=f"make a domain's RAM {'' if merge else 'un'}mergeable "
                           "now, and verify it")
        s.add_argument("domain", metavar="DOMAIN", help="name, UUID or id")
        s.add_argument("--backend", metavar="ID", help="only this memory backend")
        s.add_argument("--json", action="store_true",
                       help="one JSON object: the changes made, each before and after")
        if not merge:
            s.add_argument("--force", action="store_true",
                           help="unmerge even if MemAvailable looks too small")
        s.set_defaults(func=lambda ctx, m=merge: cmd_merge(ctx, m))

    s = sub.add_parser("status", help="host KSM counters and exact per-VM savings")
    s.add_argument("domains", nargs="*", metavar="DOMAIN")
    s.add_argument("--json", action="store_true", help="one JSON object: host, vms")
    s.add_argument("--matrix", action="store_true", help="also show which VMs share with which")
    s.set_defaults(func=cmd_status)
