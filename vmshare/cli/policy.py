"""``vmshare policy show|set``, ``vmshare log``, and the policy side of enable/disable.

Policy lives in three places (see vmshare.policy.rules): the host config file, the
domain's own metadata element (written here with libvirt's metadata API) and
the host default. Every change made here is recorded in the audit log.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from vmshare.cli.context import Context, emit_json, out
from vmshare.cli.shown import MERGE_SETTINGS
from vmshare.errors import HypervisorError, PolicyError, UsageError

if TYPE_CHECKING:       # imported where used: start-up pays only for the command run
    from vmshare.config import Config, VmPolicy
    from vmshare.control.merge import MergeResult
    from vmshare.hypervisor.base import PolicyStore
    from vmshare.model import VmRef
    from vmshare.policy.rules import Decision
    from vmshare.policy.sources import PolicyView
    from vmshare.records.audit import AuditLog, AuditRecord


def warn(text: str) -> None:
    print(f"vmshare: warning: {text}", file=sys.stderr, flush=True)


def load(ctx: Context, *, lenient: bool = False) -> Config:
    """The config named by --config (or VMSHARE_CONFIG, or the default).

    ``lenient`` (disable): a broken config is a warning and the defaults
    apply, so that turning sharing off is never blocked by a typo.
    """
    from vmshare.config import Config, load_config
    try:
        return load_config(getattr(ctx.args, "config", None))
    except PolicyError as exc:
        if not lenient:
            raise
        warn(f"{exc}; using the defaults")
        return Config(path=None)


def audit_log(cfg: Config) -> AuditLog:
    """VMSHARE_AUDIT_LOG if set, else the config's [daemon] audit_log."""
    from vmshare.records.audit import AUDIT_ENV, AuditLog
    return AuditLog(None if os.environ.get(AUDIT_ENV) else cfg.daemon.audit_log, actor="cli")


def policy_text(p: VmPolicy | None) -> str:
    if p is None:
        return "-"
    parts = [f"merge={p.merge}"]
    if p.group:
        parts.append(f"group={p.group}")
    if p.force:
        parts.append("force")
    return " ".join(parts)


def policy_json(p: VmPolicy | None) -> dict[str, Any] | None:
    import dataclasses
    return None if p is None else dataclasses.asdict(p)


def decision_json(d: Decision) -> dict[str, Any]:
    return {"merge": d.merge, "group": d.group, "forced": d.forced, "reason": d.reason}


# ---------------------------------------------------------------- enable/disable
def run_merge(ctx: Context, ident: str, merge: bool, *, backend: str | None = None,
              force: bool = False, as_json: bool = False, reason: str | None = None) -> int:
    """enable/disable one VM through the one path (vmshare.control.merge), then print."""
    from vmshare.control.merge import Controller, NotFullyUnmergeable, disable, enable
    cfg = load(ctx, lenient=not merge)
    ctl = Controller(ctx.hv, ctx.procfs, ctx.observer())
    audit = audit_log(cfg)
    if merge:
        result = enable(ctl, cfg, ident, audit=audit, backend=backend,
                        reason=reason or "vmshare enable")
    else:
        try:
            result = disable(ctl, ident, audit=audit, backend=backend, force=force,
                             reason=reason or "vmshare disable")
        except NotFullyUnmergeable as exc:
            # What was done is true and audited; the VM is still not unmergeable.
            show_result(exc.result, as_json)
            raise
    show_result(result, as_json)
    return 0


def show_result(result: MergeResult, as_json: bool) -> None:
    if as_json:
        emit_json({"changes": [c.__dict__ | {"changed": c.changed} for c in result.changes],
                   "forced": result.forced[0] if result.forced else None,
                   "other_mergeable_bytes": result.other_mergeable_bytes})
        return
    for c in result.changes:
        if c.skipped:
            out(f"{c.vm}/{c.backend}: skipped ({c.skipped})")
        elif c.changed:
            out(f"{c.vm}/{c.backend}: merge {'on' if c.before else 'off'} -> "
                f"{'on' if c.after else 'off'} (verified)")
        else:
            out(f"{c.vm}/{c.backend}: merge already {'on' if c.after else 'off'} (verified)")
    for what in result.forced:
        out(f"forced: {what}")


# ---------------------------------------------------------------- policy show
def _state(v: PolicyView) -> str:
    if v.running:
        return "running"
    return "running?" if v.ref.running else "shut off"


def _decision_text(v: PolicyView) -> str:
    if not v.running:
        return f"({'on' if v.decision.merge else 'off'})"
    return ("on" if v.decision.merge else "off") + (" forced" if v.decision.forced else "")


def cmd_policy_show(ctx: Context) -> int:
    from vmshare.config import config_path
    from vmshare.policy.sources import survey
    from vmshare.present.text import table
    cfg = load(ctx)
    hv = ctx.hv
    everyone = hv.list_vms()
    refs = [hv.lookup(d) for d in ctx.args.domains] if ctx.args.domains else everyone
    views = survey(hv, cfg, refs, observer=ctx.observer(), others=everyone)
    host = cfg.host
    source = str(cfg.path) if cfg.path else f"{config_path(None)} (absent: shipped defaults)"
    if ctx.args.json:
        emit_json({
            "config": str(cfg.path) if cfg.path else None,
            "host": {"enabled": host.enabled, "default_merge": host.default_merge,
                     "default_group": host.default_group},
            "vms": [{"name": v.ref.name, "uuid": v.ref.uuid, "running": v.running,
                     "metadata": policy_json(v.own), "config": policy_json(v.table),
                     "mergeable_now": v.mergeable_now, "wish": decision_json(v.wish),
                     "decision": decision_json(v.decision), "warnings": list(v.warnings)}
                    for v in views]})
    else:
        out(f"config: {source}")
        out(f"host:   sharing {'enabled' if host.enabled else 'DISABLED (host-wide switch)'}, "
            f"default merge={host.default_merge}, default trust group {host.default_group!r}")
        out()
        rows = [[v.ref.name, _state(v),
                 "-" if v.mergeable_now is None else ("yes" if v.mergeable_now else "no"),
                 policy_text(v.own), policy_text(v.table), _decision_text(v),
                 v.decision.group, v.decision.reason] for v in views]
        out(table(["DOMAIN", "STATE", "MERGEABLE", "METADATA", "CONFIG", "DECISION", "GROUP",
                   "REASON"], rows))
    for v in views:
        for w in v.warnings:
            warn(f"{v.ref.name}: {w}")
    return 0


# ---------------------------------------------------------------- policy set
def _write_policy(hv: PolicyStore, ref: VmRef, policy: VmPolicy) -> str:
    """LIVE when running, plus CONFIG when persistent; returns where it went."""
    if ref.running:
        try:
            hv.set_policy(ref, policy, live=True, config=True)
            return "live and persistent definition"
        except HypervisorError as exc:
            if "transient" not in str(exc):
                raise
        hv.set_policy(ref, policy, live=True, config=False)
        return "live definition (transient domain)"
    hv.set_policy(ref, policy, live=False, config=True)
    return "persistent definition"


def cmd_policy_set(ctx: Context) -> int:
    from vmshare.config import VmPolicy
    from vmshare.control.adopt import adopt, describe
    from vmshare.hypervisor.base import PolicyStore
    from vmshare.policy.sources import survey
    a = ctx.args
    if a.merge is None and a.group is None and a.force is None:
        raise UsageError("nothing to set: give --merge, --group and/or --force/--no-force")
    cfg = load(ctx)
    hv = ctx.hv
    if not isinstance(hv, PolicyStore):
        raise UsageError("per-domain policy is libvirt domain metadata; with --qmp, use a "
                         "[vm.\"NAME\"] table in the config file")
    ref = hv.lookup(a.domain)
    try:
        before = hv.get_policy(ref)
    except PolicyError as exc:
        warn(f"replacing malformed policy metadata: {exc}")
        before = None
    base = before or VmPolicy()
    group = base.group if a.group is None else (a.group or None)
    after = VmPolicy(merge=a.merge or base.merge, group=group,
                     force=base.force if a.force is None else a.force)
    where = _write_policy(hv, ref, after)
    audit = audit_log(cfg)
    audit.record("policy", ref.name, policy_json(before), policy_json(after),
                 "vmshare policy set", vm=ref.name)
    out(f"{ref.name}: policy {policy_text(after)} (was {policy_text(before)}); "
        f"written to the {where}")
    # A domain vmshare has a policy for is one it manages: bring it to <nosharepages/>.
    out(describe(adopt(hv, ref, audit=audit, reason="vmshare policy set")))
    if not a.apply:
        return 0
    everyone = hv.list_vms()
    view = next(v for v in survey(hv, cfg, [ref], observer=ctx.observer(), others=everyone))
    if not view.running:
        out(f"{ref.name}: not running; the policy applies when it starts")
        return 0
    d = view.decision
    out(f"{ref.name}: decision merge={'on' if d.merge else 'off'} "
        f"(trust group {d.group!r}): {d.reason}")
    return run_merge(ctx, ref.uuid or ref.name, d.merge,
                     reason=f"vmshare policy set --apply: {d.reason}")


# ---------------------------------------------------------------- policy adopt
def cmd_policy_adopt(ctx: Context) -> int:
    import dataclasses

    from vmshare.control.adopt import adopt, describe
    a = ctx.args
    if bool(a.domains) == bool(a.all):
        raise UsageError("name the domains to adopt, or give --all (not both)")
    cfg = load(ctx, lenient=True)
    hv = ctx.hv
    refs = hv.list_vms() if a.all else [hv.lookup(d) for d in a.domains]
    audit = audit_log(cfg)
    results = [adopt(hv, ref, audit=audit) for ref in refs]
    if a.json:
        emit_json({"domains": [dataclasses.asdict(r) for r in results]})
    else:
        for r in results:
            out(describe(r))
    return 0


# ---------------------------------------------------------------- log
def _record_line(r: AuditRecord) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time))
    return (f"{when}  {r.actor}/{r.user}  {r.action}  {r.target}  "
            f"{_short(r.before)} -> {_short(r.after)}  {r.reason}")


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        from vmshare.config import VmPolicy
        return policy_text(VmPolicy(**value)) if set(value) == {"merge", "group", "force"} \
            else str(value)
    return "-" if value is None else str(value)


def cmd_log(ctx: Context) -> int:
    import dataclasses
    a = ctx.args
    if a.tail is not None and a.tail < 0:
        raise UsageError(f"--tail must be 0 or more, not {a.tail}")
    log = audit_log(load(ctx, lenient=True))
    records: list[AuditRecord] = []
    for item in log.read():
        if isinstance(item, str):
            warn(item)
            continue
        if a.vm and item.vm != a.vm and item.target.split("/", 1)[0] != a.vm:
            continue
        records.append(item)
    if a.tail is not None:
        records = records[-a.tail:] if a.tail else []
    if a.json:
        emit_json({"log": str(log.path), "records": [dataclasses.asdict(r) for r in records]})
    elif not records:
        out(f"no audit records in {log.path}")
    else:
        for r in records:
            out(_record_line(r))
    return 0


# ---------------------------------------------------------------- parser
def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH",
                   help="host config file (default $VMSHARE_CONFIG or /etc/vmshare/vmshare.toml)")


def register(sub: Any) -> None:
    s = sub.add_parser("policy", help="per-VM policy: show|set|adopt")
    psub = s.add_subparsers(dest="policy_cmd", metavar="ACTION", required=True)
    p = psub.add_parser("show", help="each VM's policy sources, decision, trust group and why")
    p.add_argument("domains", nargs="*", metavar="DOMAIN")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: config, host, and per VM its sources and decision")
    _config_option(p)
    p.set_defaults(func=cmd_policy_show)

    p = psub.add_parser("adopt", help="bring domains to <nosharepages/> (QEMU mem-merge=off) "
                        "so that vmshare turns merging on per RAM backend")
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="name, UUID or id")
    p.add_argument("--all", action="store_true", help="every domain libvirt knows")
    p.add_argument("--json", action="store_true", help="one JSON object: what each domain "
                   "came to")
    _config_option(p)
    p.set_defaults(func=cmd_policy_adopt)

    p = psub.add_parser("set", help="write a domain's own policy (libvirt domain metadata), "
                        "and adopt it (see adopt)")
    p.add_argument("domain", metavar="DOMAIN", help="name, UUID or id")
    p.add_argument("--merge", choices=MERGE_SETTINGS,
                   help="on, off, or inherit (the host config decides)")
    p.add_argument("--group", metavar="NAME", help="trust group ('' removes it)")
    p.add_argument("--force", dest="force", action="store_true", default=None,
                   help="may merge while another trust group merges")
    p.add_argument("--no-force", dest="force", action="store_false",
                   help="clear force: obey trust groups again")
    p.add_argument("--apply", action="store_true",
                   help="then make the running VM match its decision now")
    _config_option(p)
    p.set_defaults(func=cmd_policy_set)

    s = sub.add_parser("log", help="the audit log of every change vmshare made")
    s.add_argument("--json", action="store_true",
                   help="one JSON object: the log's path and its records")
    s.add_argument("--vm", metavar="NAME", help="only changes to this VM")
    s.add_argument("--tail", type=int, metavar="N", help="only the last N records")
    _config_option(s)
    s.set_defaults(func=cmd_log)
