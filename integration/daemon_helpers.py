"""Helpers for the daemon's integration tests: config in a tmp dir, the daemon as a
subprocess, and polling the real merge state through the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp: Path, vms: dict[str, str], *, default_merge: str = "on",
                 qmp_globs: tuple[str, ...] = (), tune: bool = False,
                 force: bool = False) -> Path:
    """A config in ``tmp`` with every daemon path inside ``tmp``; ``vms``: name ->
    merge setting, each table with ``force`` when asked."""
    lines = ["[host]", f'default_merge = "{default_merge}"']
    for name, merge in vms.items():
        lines += [f'[vm."{name}"]', f'merge = "{merge}"'] + (["force = true"] if force else [])
    lines += ["[daemon]", f'spool_dir = "{tmp}/spool"', f'socket = "{tmp}/run/wake.sock"',
              f'audit_log = "{tmp}/audit.jsonl"', f'state_file = "{tmp}/state.json"',
              f'history_file = "{tmp}/history.jsonl"', f'history_db = "{tmp}/history.sqlite"',
              "history_interval = 1.0",
              "reconnect_max_seconds = 2.0"]
    if qmp_globs:
        lines.append("qmp_sockets = [" + ", ".join(f'"{g}"' for g in qmp_globs) + "]")
    if tune:
        lines += ["tune = true", "tune_interval = 1.0", "tune_cpu_budget = 30.0"]
    path = tmp / "vmshare.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProc:
    """The daemon as a subprocess. ``domains``: name globs it may manage
    (VMSHARE_DAEMON_DOMAINS); test sessions share one libvirtd, and a daemon
    managing every domain would change other sessions' guests. ``env``: more
    environment (e.g. NOTIFY_SOCKET). ``wrap``: a command prefix (e.g. nsenter
    into a second host's namespace)."""

    def __init__(self, config: Path, log: Path, *extra: str,
                 domains: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 wrap: tuple[str, ...] = ()) -> None:
        self.log = log
        self.fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        more, env = env or {}, dict(os.environ)
        env.pop("VMSHARE_DAEMON_DOMAINS", None)
        if domains:
            env["VMSHARE_DAEMON_DOMAINS"] = ",".join(domains)
        env.update(more)
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "vmshare", "--debug", "daemon", "--config", str(config),
             "--observe-interval", "1", "--resync-interval", "5", *extra],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.fh, stderr=self.fh,
            start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 30.0, after: int = 0) -> None:
        wait_for(lambda: needle in self.text()[after:], timeout,
                 lambda: f"daemon log lacks {needle!r}:\n{self.text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.fh.close()


def wait_for(cond: Callable[[], Any], timeout: float, message: Callable[[], str] | str,
             poll: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(poll)


def cli_json(*args: str, config: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if config is not None:
        env["VMSHARE_CONFIG"] = str(config)
    r = subprocess.run([sys.executable, "-m", "vmshare", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def backends(name: str, *options: str) -> dict[str, tuple[bool, bool | None]]:
    """backend id -> (QEMU merge property, kernel mg flag) of one running VM
    ({} when it is not running). ``options``: ("--qmp", SOCKET) for plain QEMU."""
    from vmshare.errors import VmshareError
    from vmshare.hypervisor import connect
    from vmshare.ksm.procfs import ProcFs
    from vmshare.ksm.sysfs import KsmSysfs
    from vmshare.observe.host import Observer
    qmp = options[1] if options[:1] == ("--qmp",) else None
    try:
        hv = connect(None, qmp)
        try:
            ref = hv.lookup(name)
            facts = hv.facts(ref)
            if facts.pid is None:
                return {}
            views = Observer(hv, KsmSysfs(), ProcFs()).backends(ref, facts)
            return {v.backend.id: (v.backend.merge, v.mg_flag) for v in views}
        finally:
            hv.close()
    except VmshareError:
        return {}


def all_merge(name: str, want: bool, *options: str) -> bool:
    b = backends(name, *options)
    return bool(b) and all(m == want and mg == want for m, mg in b.values())


def real_ksm_pages(pid: int) -> int:
    """KSM pages (KPF_KSM in /proc/kpageflags) in the guest RAM of QEMU ``pid``: its
    largest MADV_DONTFORK mapping. Independent of vmshare's attribution, whose
    zero-page shortcut counts pages mapped to the huge zero page as KSM pages
    (guest RAM never written after a restore or an incoming migration)."""
    import numpy as np

    from vmshare.ksm.procfs import ProcFs
    from vmshare.model import PAGE_SIZE
    procfs = ProcFs()
    vma = max((v for v in procfs.smaps(pid) if "dc" in v.vmflags), key=lambda v: v.size)
    entries = procfs.pagemap(pid, vma.start, vma.size // PAGE_SIZE)
    present = (entries >> np.uint64(63)) & np.uint64(1) == 1
    pfns = entries[present] & np.uint64((1 << 55) - 1)
    flags = procfs.kpageflags(pfns[pfns != 0])
    return int(((flags >> np.uint64(21)) & np.uint64(1)).sum())


def libvirt_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def systemd_verify(unit: str, tmp: Path, command: Path | None = None) -> str:
    """`systemd-analyze verify` on the unit text ``unit`` with its ExecStart= command
    replaced by ``command`` (default: this checkout's), which verify needs to
    exist; "" when it is clean, else its exit status and output (it exits 0 for
    lines it ignores, so any output is a finding)."""
    command = command or Path(sys.executable).parent / "vmshare"
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run integration/setup.sh (Debian's systemd)"
    assert command.is_file(), f"{command} is missing"
    copy = tmp / "vmshare.service"
    copy.write_text(re.sub(r"^ExecStart=\S+ ", f"ExecStart={command} ", unit, flags=re.M))
    r = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True,
                       timeout=120)
    out = r.stdout + r.stderr
    return f"exit {r.returncode}\n{out}" if r.returncode or out else ""
