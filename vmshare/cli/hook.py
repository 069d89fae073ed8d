"""``vmshare hook install|uninstall|status``: the libvirt qemu hook (vmshare.hook.install)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmshare.cli.context import Context, emit_json, out
from vmshare.cli.shown import HOOKS_DIR

if TYPE_CHECKING:
    from vmshare.hook import install as hookinstall


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def status_json(st: hookinstall.HookStatus) -> dict[str, Any]:
    return {"path": str(st.path), "state": st.state, "written_at": st.written_at,
            "other_scripts": list(st.other_scripts), "monolithic_hook": st.monolithic_hook,
            "libvirtd": {"running": st.libvirtd.running, "pid": st.libvirtd.pid,
                         "started_at": st.libvirtd.started_at},
            "restart_needed": st.restart_needed, "messages": list(st.messages)}


def print_status(st: hookinstall.HookStatus) -> None:
    out(f"hook:      {st.path}: {st.state}" + (f" (written {_when(st.written_at)})"
                                              if st.written_at else ""))
    daemon = st.libvirtd
    out("libvirtd:  " + (f"running, pid {daemon.pid}, started {_when(daemon.started_at)}"
                         if daemon.running else "not running"))
    out("others:    " + (", ".join(st.other_scripts) or "none")
        + f"; monolithic {st.path.parent.parent / 'qemu'}: "
        + ("yes" if st.monolithic_hook else "no"))
    out("restart:   " + ("needed" if st.restart_needed else "not needed"))
    for m in st.messages:
        out(f"note:      {m}")


def cmd_hook(ctx: Context) -> int:
    from vmshare.hook import install as hookinstall
    a = ctx.args
    hooks_dir = Path(a.hooks_dir)
    if a.hook_cmd == "status":
        st = hookinstall.status(hooks_dir)
        if a.json:
            emit_json(status_json(st))
        else:
            print_status(st)
        return 0
    if a.hook_cmd == "uninstall":
        res = hookinstall.uninstall(hooks_dir)
        out(f"removed {res.path}" if res.removed else f"{res.path} was not installed")
        return 0
    result = hookinstall.install(hooks_dir)
    out(f"{result.action} {result.path}")
    st = result.status
    if a.restart_libvirtd:
        if not st.libvirtd.running:
            out("libvirtd is not running; it will load the hook when it starts")
        else:
            r = hookinstall.restart_libvirtd()
            out(f"restarted libvirtd: pid {r.old_pid} -> {r.new_pid} ({r.seconds:.1f} s); "
                "running domains keep running")
            st = hookinstall.status(hooks_dir)
    elif st.restart_needed:
        out("libvirtd reads its hooks when it starts: this hook is not live until "
            "libvirtd restarts (run 'vmshare hook install --restart-libvirtd', or "
            "send it SIGHUP)")
    for m in st.messages:
        out(f"note: {m}")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("hook", help="the libvirt qemu hook: install|uninstall|status")
    hsub = s.add_subparsers(dest="hook_cmd", metavar="ACTION", required=True)
    for name, text in (("install", "install qemu.d/vmshare (libvirtd reads hooks at start-up)"),
                       ("uninstall", "remove qemu.d/vmshare if vmshare installed it"),
                       ("status", "is the hook installed, and has libvirtd loaded it?")):
        h = hsub.add_parser(name, help=text)
        h.add_argument("--hooks-dir", default=HOOKS_DIR, metavar="DIR",
                       help=f"libvirt's hooks directory (default {HOOKS_DIR})")
        if name == "install":
            h.add_argument("--restart-libvirtd", action="store_true",
                           help="restart libvirtd afterwards so it loads the hook")
        if name == "status":
            h.add_argument("--json", action="store_true",
                           help="one JSON object: the hook's state and libvirtd's")
    s.set_defaults(func=cmd_hook)


__all__ = ["register", "status_json"]
