"""Test-run hygiene shared by tests/ and integration/ (used by the top-level conftest.py).

* ``RUN_ID``: a random id per pytest process; every libvirt domain a test
  creates carries it (``integration/domains.py``), so one run never touches
  another run's guests and a left-over guest names the run that left it.
* ``environment_for``: every VMSHARE_* path variable vmshare (and the hook
  script) reads, pointed into one temporary directory, with a config file
  whose daemon paths are there too; subprocesses inherit it.
* ``HostState``: what a test could disturb on the host (KSM knobs, libvirt
  domains, vmshare's host directories, libvirt hooks), recorded at session
  start and compared at session end.
* ``foreign_testers``: other processes running tests or vmshare on this host
  (not this session's ancestors or descendants); a difference cannot be
  blamed on this run while they were there.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RUN_ID = secrets.token_hex(3)

KSM_ROOT = Path("/sys/kernel/mm/ksm")
#: host paths a test could leave changed; /var/cache/vmshare (the guest image
#: cache, meant to outlive a run) is deliberately not among them
WATCHED_TREES = (Path("/etc/vmshare"), Path("/var/log/vmshare"), Path("/var/lib/vmshare"),
                 Path("/run/vmshare"), Path("/etc/libvirt/hooks"))
LIBVIRT_URI = "qemu:///system"
#: variables from the caller's shell that would point vmshare at other trees
#: or restrict the daemon: a test sets its own when it needs one
UNSET_VARS = ("VMSHARE_SYSFS_ROOT", "VMSHARE_PROC_ROOT", "VMSHARE_DAEMON_DOMAINS",
              "VMSHARE_SPOOL_MAX")


def environment_for(root: Path) -> dict[str, str | None]:
    """Every vmshare path variable pointed under ``root`` (None: to be unset);
    writes the config file they name."""
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    config = root / "vmshare.toml"
    config.write_text(
        "# written by the test session: every daemon path in this temporary tree\n"
        "[daemon]\n"
        f'spool_dir = "{run}/spool"\nsocket = "{run}/wakeup.sock"\n'
        f'audit_log = "{root}/audit.jsonl"\nstate_file = "{root}/state.json"\n'
        f'history_file = "{root}/history.jsonl"\n'
        f'history_db = "{root}/history.sqlite"\n')
    return {
        "VMSHARE_CONFIG": str(config),
        "VMSHARE_AUDIT_LOG": str(root / "audit.jsonl"),
        "VMSHARE_TUNER_LOCK": str(run / "tuner.lock"),
        "VMSHARE_CONTROL_LOCK": str(run / "control.lock"),
        "VMSHARE_DEMO_DIR": str(root / "demo"),
        # read by the hook script (hooks/vmshare-qemu-hook)
        "VMSHARE_SPOOL_DIR": str(run / "spool"),
        "VMSHARE_SOCKET": str(run / "wakeup.sock"),
        "VMSHARE_HOOK_CONF": str(root / "hook.conf"),    # absent: the hook's defaults
        **{name: None for name in UNSET_VARS},
    }


def isolated_environment(root: Path) -> dict[str, str | None]:
    """Apply ``environment_for(root)`` to os.environ; return the previous
    values (None: unset) for ``restore_environment``."""
    return _apply(environment_for(root))


def restore_environment(previous: dict[str, str | None]) -> None:
    _apply(previous)


def _apply(values: dict[str, str | None]) -> dict[str, str | None]:
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return previous


# ------------------------------------------------------------------ host state
FileFacts = tuple[str, int, int]        # (kind, size, mtime_ns); dirs: ("dir", 0, 0)


@dataclass(frozen=True)
class HostState:
    knobs: dict[str, str] = field(default_factory=dict)
    domains: frozenset[str] | None = None          # None: libvirtd did not answer
    files: dict[str, FileFacts] = field(default_factory=dict)


def read_knobs(root: Path = KSM_ROOT) -> dict[str, str]:
    """Every KSM knob (the writable files) by name, as the kernel prints it."""
    knobs: dict[str, str] = {}
    if not root.is_dir():
        return knobs
    for path in sorted(root.iterdir()):
        try:
            if path.stat().st_mode & 0o200:
                knobs[path.name] = path.read_text().strip()
        except OSError:
            continue
    return knobs


def libvirt_domains() -> frozenset[str] | None:
    """Every domain name libvirt knows (running or defined), or None when
    virsh is missing or libvirtd does not answer within 20 s."""
    if shutil.which("virsh") is None:
        return None
    try:
        proc = subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "list", "--all", "--name"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return frozenset(line.strip() for line in proc.stdout.splitlines() if line.strip())


def tree_facts(trees: tuple[Path, ...] = WATCHED_TREES) -> dict[str, FileFacts]:
    facts: dict[str, FileFacts] = {}
    for top in trees:
        for path in _walk(top):
            try:
                st = path.lstat()
            except OSError:
                continue
            if path.is_symlink():
                facts[str(path)] = ("symlink", 0, 0)
            elif path.is_dir():
                # a directory's mtime moves when a test adds and removes a file in
                # it: the file itself is what matters
                facts[str(path)] = ("dir", 0, 0)
            else:
                facts[str(path)] = ("file", st.st_size, st.st_mtime_ns)
    return facts


def _walk(top: Path) -> Iterator[Path]:
    if not top.exists() and not top.is_symlink():
        return
    yield top
    if top.is_dir() and not top.is_symlink():
        try:
            children = sorted(top.iterdir())
        except OSError:
            return
        for child in children:
            yield from _walk(child)


def capture(trees: tuple[Path, ...] = WATCHED_TREES, ksm_root: Path = KSM_ROOT,
            with_libvirt: bool = True) -> HostState:
    return HostState(read_knobs(ksm_root), libvirt_domains() if with_libvirt else None,
                     tree_facts(trees))


def differences(before: HostState, after: HostState) -> list[str]:
    """One line per thing that is not as it was."""
    lines = [f"KSM knob {name}: {before.knobs.get(name, '(absent)')!r} at start, "
             f"{after.knobs.get(name, '(absent)')!r} at end"
             for name in sorted(before.knobs.keys() | after.knobs.keys())
             if before.knobs.get(name) != after.knobs.get(name)]
    if before.domains is not None:
        if after.domains is None:
            lines.append(f"libvirtd ({LIBVIRT_URI}) answered at start, not at end")
        else:
            lines += [f"libvirt domain {n!r} is new (left running or defined)"
                      for n in sorted(after.domains - before.domains)]
            lines += [f"libvirt domain {n!r} is gone" for n in sorted(before.domains
                                                                     - after.domains)]
    for path in sorted(before.files.keys() | after.files.keys()):
        was, now = before.files.get(path), after.files.get(path)
        if was == now:
            continue
        if was is None:
            lines.append(f"{path}: created ({now[0] if now else '?'})")
        elif now is None:
            lines.append(f"{path}: removed")
        elif was[0] != now[0]:
            lines.append(f"{path}: was a {was[0]}, now a {now[0]}")
        else:
            lines.append(f"{path}: modified (size {was[1]} -> {now[1]})")
    return lines


def mine(line: str) -> bool:
    """A difference that names this run's id can only be this run's doing."""
    return RUN_ID in line


# ------------------------------------------------------------------ other sessions
def _lineage(pid: int) -> set[int]:
    """``pid`` and its ancestors."""
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def foreign_testers() -> dict[int, str]:
    """pid -> command line of each process that runs pytest or vmshare and is
    neither this process's ancestor nor its descendant (QEMU and libvirt's
    daemons excluded: their command lines name test domains)."""
    me = os.getpid()
    ancestors = _lineage(me)
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ancestors:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(b" ".join(argv).decode(errors="replace").split())
        exe = os.path.basename(argv[0].decode(errors="replace"))
        if not text or exe.startswith(("qemu", "libvirtd", "virtlogd", "virsh")):
            continue
        if ("pytest" in text or "vmshare" in text) and me not in _lineage(int(entry.name)):
            found[int(entry.name)] = text[:160]
    return found
