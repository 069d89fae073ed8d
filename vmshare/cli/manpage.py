"""vmshare(1), generated from the argparse definitions so that it cannot drift.

``python -m vmshare.cli.manpage [--out FILE]`` writes the page in roff
(man(7) macros). Every command, action and option comes from
``build_parser()``; the paths come from the code's own defaults and the exit
codes from the exception tree. Only the prose around them is written here,
as data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from vmshare import __version__
from vmshare.cli.context import EXIT_INTERNAL
from vmshare.cli.parsertree import Command, Option, ParserTree, Positional, vmshare_tree
from vmshare.config import CONFIG_ENV, DEFAULT_CONFIG, DaemonSettings
from vmshare.control.lock import CONTROL_LOCK, CONTROL_LOCK_ENV, ControlBusy
from vmshare.daemon.runner import DOMAINS_ENV
from vmshare.errors import VmshareError
from vmshare.hook.install import HOOK_NAME, HOOKS_DIR
from vmshare.ksm.sysfs import DEFAULT_ROOT as KSM_SYSFS
from vmshare.records.audit import AUDIT_ENV
from vmshare.tuner.loop import TUNER_LOCK, TUNER_LOCK_ENV

#: a paragraph, or a (tag, text) pair rendered as a tagged paragraph
Para = str | tuple[str, str]

HOOK_CONF = "/etc/vmshare/hook.conf"      # read by hooks/vmshare-qemu-hook (stdlib only)
INTERRUPTED = 130                          # main(): KeyboardInterrupt, as a shell reports SIGINT

SUMMARY = ("per-VM KSM control and exact per-VM memory-sharing accounting for "
           "QEMU/libvirt hosts")

DESCRIPTION: tuple[Para, ...] = (
    "Linux KSM (kernel samepage merging) lets identical guest pages share one physical "
    "page, but the kernel gives one host-wide switch and one number (pages_sharing). "
    "vmshare gives control and truth per VM: it makes a VM's RAM backends mergeable or "
    "not at run time (QEMU's merge property over QMP, verified against QEMU and the "
    "kernel), keeps that true by policy (opt-in, <nosharepages/>, trust groups) across "
    "start, save/restore, migration, reset and hotplug through a libvirt hook and a "
    "daemon, drives kernel KSM's knobs with validation and a tuner, and reports exact "
    "per-VM savings that add up to the host's pages_sharing, and what kernel KSM would "
    "save (a userspace KSM engine over live memory or dumps).",
    "vmshare must run as root: per-VM attribution reads /proc/kpageflags, "
    "/proc/kpagecount and other processes' pagemaps, and the KSM knobs are writable by "
    "root only. Through libvirt, QMP commands mark a domain \"tainted (custom-monitor)\" "
    "in libvirt's log; that is expected.",
    "A DOMAIN is a libvirt domain's name, UUID or id. The README in the source tree is "
    "the full manual, with an example of every command.",
)

#: more than the one-line help, for commands that need it (keys: command names)
COMMAND_NOTES: dict[str, tuple[Para, ...]] = {
    "list": ("MERGE is QEMU's merge property (query-memdev), MG the kernel's view (the mg "
             "VmFlag in /proc/PID/smaps). Memory KSM cannot merge (shared or hugetlbfs "
             "backends, <nosharepages/>, confidential guests) is \"not eligible\" with the "
             "reason.",),
    "enable": ("Runs qom-set /objects/ID merge, then checks both query-memdev and the mg "
               "flag: a disagreement is an error. Refused for a VM with <nosharepages/> or "
               "launchSecurity, and while a VM of another trust group is mergeable unless "
               "the VM's policy has force.",),
    "disable": ("Unmerging needs a new page per KSM page the VM maps: vmshare first "
                "compares that with MemAvailable minus a margin (the larger of 256 MiB "
                "and 5% of RAM) and refuses with the figures if it does not fit.",),
    "status": ("Per VM: KSM pages, the fair share of pages_sharing it saves (a KSM page "
               "mapped k times credits each mapping (k-1)/k of a page), zero pages, rmap "
               "items and the kernel's ksm_process_profit, with warnings for costly rmap "
               "ratios and transparent huge pages.",),
    "ksm set": ("Every value is validated by the kernel's rules before anything is "
                "written, every write is read back, and a failed batch is rolled back. "
                "merge_across_nodes and max_page_sharing change only while nothing is "
                "merged: without --unmerge such a change is refused.",),
    "policy set": ("The policy is written to the domain's libvirt metadata, live and "
                   "persistent, so it travels with the domain. Precedence, strongest "
                   "first: <nosharepages/> and launchSecurity, the host switch, the "
                   "domain's metadata, the host config's [vm.\"NAME\"] table, the host "
                   "default.",),
    "log": ("Every change vmshare made: who (cli, daemon or tuner, and the user), what, "
            "before, after and why.",),
    "predict": ("Runs the kernel's algorithm in userspace (stable and unstable trees, "
                "max_page_sharing chains, use_zero_pages) over the pages given and "
                "prints the counters kernel KSM would reach. Changes nothing.",),
    "tune": ("Scans within the ksmd CPU budget while full scans still find merges, then "
             "stops ksmd (merges kept) when memory is ample, or watches with a slow scan "
             "when it is not. It never unmerges, and leaves the knobs as it set them on "
             "exit. One tuner per host: it holds the tuner lock.",),
    "demo": ("Needs libvirtd and root. Every KSM knob is restored afterwards, with "
             "--keep too.",),
}

HOOK: tuple[Para, ...] = (
    f"vmshare hook install puts the hook at {HOOKS_DIR}/qemu.d/{HOOK_NAME}, a qemu.d "
    "drop-in that leaves an administrator's own qemu script and other drop-ins alone. "
    "libvirtd decides whether it has qemu hooks when it starts, so a hook installed while "
    "it runs may need a restart (vmshare hook status says so; --restart-libvirtd does it).",
    "libvirtd runs the hook synchronously for every domain event. The hook only records "
    "that something happened: it writes one spool entry, sends a best-effort datagram to "
    "wake the daemon, prints nothing on stdout (which would replace the domain XML on "
    "migrate and restore), always exits 0 within a second, and never calls libvirt. "
    "The daemon acts.",
    f"Its settings come from {HOOK_CONF} (key=value lines: spool_dir, socket, "
    "max_entries, fsync), then from the environment (see ENVIRONMENT).",
)

DAEMON: tuple[Para, ...] = (
    "vmshare daemon runs in the foreground (systemd's Type=simple) and logs to stderr. It "
    "turns the hook's spool entries, libvirt lifecycle events and QMP events into "
    "reconciles: decide each VM's merge state by policy (trust groups planned host-wide), "
    "act through the same verified path as vmshare enable, unmerge before merging, and "
    "record each real change in the audit log. It reconciles every running VM at start, "
    "after libvirtd reconnects (with exponential backoff), and every --resync-interval.",
    "Before acting it writes the intended change to its state file (atomically), so a "
    "daemon killed between acting and logging completes the audit record exactly once. "
    "Every --observe-interval it records each VM's KSM pages, from which vmshare remerge "
    "and vmshare status show how far a VM has merged again after a restore, migration, "
    "reset or hotplug; every [daemon] history_interval it adds a savings sample to the "
    "history database for vmshare history and vmshare report, and folds old samples into "
    "5-minute and hourly aggregates. With --tune (or [daemon] tune = true) it also "
    "runs the KSM tuner.",
    "SIGTERM and SIGINT stop it cleanly; SIGHUP is ignored (restart it to re-read the "
    "config). Under systemd (Type=notify, $NOTIFY_SOCKET) it sends READY=1 once it serves, "
    "STATUS= lines for systemctl status, WATCHDOG=1 while its event loop and worker "
    "thread make progress (WatchdogSec=) and STOPPING=1 as it stops. On hosts without "
    "libvirt, [daemon] qmp_sockets or --qmp-glob names the QEMU "
    "QMP sockets to watch.",
)


def _files() -> tuple[Para, ...]:
    d = DaemonSettings()
    return (
        (str(DEFAULT_CONFIG), "The host config (TOML): [host] enabled, default_merge, "
         "default_group; [vm.\"NAME\"] merge, group, force, by name or UUID; [daemon] the "
         "paths below and the daemon's settings. A missing file means the shipped "
         f"defaults (sharing opt-in: default_merge = \"off\"). ${CONFIG_ENV} or --config "
         "names another."),
        (HOOK_CONF, "The hook's own settings."),
        (str(d.audit_log), "The audit log, one JSON record per line."),
        (str(d.state_file), "The daemon's state: last observed KSM pages, re-merge "
         "records, actions in flight."),
        (str(d.history_db), "Savings samples recorded by the daemon (SQLite, WAL mode): "
         "raw samples, 5-minute and hourly aggregates."),
        (str(d.history_file), "The JSON-lines history of earlier versions, imported into "
         "the database at the daemon's first start and renamed <file>.imported."),
        (str(d.spool_dir), "The hook's spool: one entry per libvirt hook call."),
        (str(d.socket), "The daemon's wake-up socket (datagrams from the hook)."),
        (str(TUNER_LOCK), "The tuner lock, holding the pid of the one vmshare tuner that "
         "owns run, pages_to_scan and sleep_millisecs."),
        (str(CONTROL_LOCK), "The host's control lock: commands that change merge state, "
         "policy or knobs take it one at a time (the holder's pid and command inside)."),
        (f"{HOOKS_DIR}/qemu.d/{HOOK_NAME}", "The libvirt qemu hook, as installed by "
         "vmshare hook install."),
        (str(KSM_SYSFS), "Kernel KSM's knobs and counters."),
    )


ENVIRONMENT: tuple[Para, ...] = (
    (CONFIG_ENV, f"The host config, instead of {DEFAULT_CONFIG}."),
    (AUDIT_ENV, "The audit log, instead of the config's [daemon] audit_log."),
    (DOMAINS_ENV, "Comma-separated name globs: the daemon manages only these domains "
     "(as --domain); the others still count for trust groups."),
    (TUNER_LOCK_ENV, f"The tuner lock, instead of {TUNER_LOCK}."),
    ("VMSHARE_DEMO_DIR", "Where vmshare demo keeps its guests' consoles and overlays, "
     "instead of /var/lib/vmshare/demo."),
    ("VMSHARE_IMAGE_RETENTION_DAYS", "Days a guest image (vmshare demo's busybox and Debian "
     "images in /var/cache/vmshare) may go unused before it is pruned, instead of 14; "
     "\"never\" keeps them all."),
    (CONTROL_LOCK_ENV, f"The host's control lock, instead of {CONTROL_LOCK}."),
    ("VMSHARE_SYSFS_ROOT", "The KSM sysfs directory, instead of /sys/kernel/mm/ksm "
     "(for tests)."),
    ("VMSHARE_PROC_ROOT", "The procfs root, instead of /proc (for tests)."),
    ("VMSHARE_HOOK_CONF", f"The hook's settings file, instead of {HOOK_CONF}."),
    ("VMSHARE_SPOOL_DIR", "The hook's spool directory, over hook.conf."),
    ("VMSHARE_SOCKET", "The daemon's wake-up socket, for the hook, over hook.conf."),
    ("VMSHARE_SPOOL_MAX", "The most entries the hook leaves in the spool, over hook.conf."),
)

#: what each exit status means; every exit_code in the exception tree must be here
EXIT_MEANINGS: dict[int, str] = {
    0: "Success.",
    1: "An error, printed as one line \"vmshare: error: ...\": KSM unavailable, a knob "
       "refused, a domain not found or not running, a deadline passed, verification "
       "failed, an unmerge or scan refused for lack of memory, a policy forbids it.",
    2: "Bad usage: an unknown option, a malformed value, no command.",
    ControlBusy.exit_code: "Another command held the host's control lock for longer than "
                           "--lock-wait (its pid and command are named): try again.",
    EXIT_INTERNAL: "An internal error (a bug), printed as one line; --debug shows the "
                   "traceback.",
    INTERRUPTED: "Interrupted (SIGINT).",
}

SEE_ALSO = (("virsh", 1), ("libvirtd", 8), ("qemu-system-x86_64", 1), ("ksmtuned", 8))


def error_exit_codes() -> set[int]:
    """Every exit status the exception tree can give."""
    codes: set[int] = set()
    todo: list[type[VmshareError]] = [VmshareError]
    while todo:
        cls = todo.pop()
        codes.add(cls.exit_code)
        todo.extend(cls.__subclasses__())
    return codes


def esc(text: str) -> str:
    """``text`` as roff input text: backslashes, hyphens, and a leading control
    character (``.`` or ``'``) made literal."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{esc(text)}\\fR"


def _value(opt: Option) -> str:
    if opt.metavar is None:
        return ""
    value = italic(opt.metavar)
    return f" [{value}]" if opt.value_optional else f" {value}"


def _option_usage(opt: Option) -> str:
    flag = next((f for f in opt.flags if f.startswith("--")), opt.flags[0])
    text = bold(flag) + _value(opt)
    return text if opt.required else f"[{text}]"


def _positional_usage(p: Positional) -> str:
    name = italic(p.metavar)
    return {"?": f"[{name}]", "*": f"[{name}...]", "+": f"{name}..."}.get(str(p.nargs), name)


def synopsis(command: Command, *, globals_: bool = False) -> str:
    parts = [bold("vmshare")]
    if globals_:
        parts.append(f"[{italic('global options')}]")
    parts.append(bold(" ".join(command.path)))
    if command.actions:
        parts.append("|".join(bold(a.path[-1]) for a in command.actions))
    parts.extend(_option_usage(o) for o in command.options)
    parts.extend(_positional_usage(p) for p in command.positionals)
    return " ".join(parts)


def _paragraphs(paras: Iterable[Para]) -> list[str]:
    lines: list[str] = []
    for para in paras:
        if isinstance(para, tuple):
            lines += [".TP", bold(para[0]), esc(para[1])]
        else:
            lines += [".PP", esc(para)]
    return lines


def _option_item(opt: Option) -> list[str]:
    tag = ", ".join(bold(f) for f in opt.flags) + _value(opt)
    text = opt.help
    if opt.choices and opt.metavar != "|".join(opt.choices):
        text += f" One of: {', '.join(opt.choices)}."
    if opt.repeatable and "repeatable" not in text:
        text += " Repeatable."
    return [".TP", tag, esc(text)]


def _command_section(command: Command) -> list[str]:
    lines = [".SS", " ".join(("vmshare", *command.path)), ".PP", synopsis(command)]
    lines += [".PP", esc(command.help)]
    lines += _paragraphs(COMMAND_NOTES.get(command.name, ()))
    for p in command.positionals:
        if p.help:
            lines += [".TP", italic(p.metavar), esc(p.help)]
    if command.actions:
        lines += [".PP", "Actions:"]
        for action in command.actions:
            lines += [".TP", bold(action.path[-1]), esc(action.help)]
    for opt in command.options:
        lines += _option_item(opt)
    return lines


def render(tree: ParserTree) -> str:
    """The whole page, in roff."""
    # option names, paths and metavars are copied by readers: not hyphenated (.nh),
    # and ragged right (.ad l) rather than stretched around long paths
    lines = [f'.TH VMSHARE 1 "" "vmshare {__version__}" "vmshare manual"', ".nh", ".ad l",
             ".SH NAME", f"vmshare \\- {esc(SUMMARY)}", ".SH SYNOPSIS"]
    for command in tree.walk():
        if command.actions:
            continue    # each action has its own line
        lines += [".PP", synopsis(command, globals_=True)]
    lines += [".SH DESCRIPTION", esc(tree.description), *_paragraphs(DESCRIPTION)]
    lines += [".SH GLOBAL OPTIONS",
              "Before the command. Every command and action also takes "
              f"{bold('-h')}, {bold('--help')}."]
    for opt in tree.options:
        lines += _option_item(opt)
    lines.append(".SH COMMANDS")
    for command in tree.walk():
        lines += _command_section(command)
    lines += [".SH THE HOOK", *_paragraphs(HOOK)]
    lines += [".SH THE DAEMON", *_paragraphs(DAEMON)]
    lines += [".SH FILES", *_paragraphs(_files())]
    lines += [".SH ENVIRONMENT", *_paragraphs(ENVIRONMENT)]
    lines.append(".SH EXIT STATUS")
    for code in sorted(error_exit_codes() | set(EXIT_MEANINGS)):
        lines += [".TP", bold(str(code)), esc(EXIT_MEANINGS.get(code, "An error."))]
    lines.append(".SH SEE ALSO")
    lines += [f".BR {name} ({section}){',' if i < len(SEE_ALSO) - 1 else ''}"
              for i, (name, section) in enumerate(SEE_ALSO)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmshare.cli.manpage",
                                     description="Write vmshare(1) in roff.")
    parser.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        page = render(vmshare_tree())
    except VmshareError as exc:
        print(f"vmshare: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.out is None:
        sys.stdout.write(page)
        return 0
    try:
        Path(args.out).write_text(page, encoding="utf-8")
    except OSError as exc:
        print(f"vmshare: error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
