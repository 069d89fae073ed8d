"""Install, check and remove the libvirt qemu hook as a ``qemu.d/`` drop-in.

libvirt (6.5 and later) runs ``/etc/libvirt/hooks/qemu`` and then every
executable in ``/etc/libvirt/hooks/qemu.d/`` in strcmp order, feeding each
one's stdout to the next as the domain XML on migrate/restore. Installing as
``qemu.d/vmshare`` therefore leaves an administrator's monolithic ``qemu``
script and other drop-ins alone, and our hook prints nothing, so it passes
their XML through untouched.

libvirtd decides whether a driver has hooks at all when it starts (and again
on SIGHUP, when it runs the daemon ``reload`` hook); afterwards it re-reads
``qemu.d`` on every call, but only if it found a qemu hook at that point. So
a hook installed while libvirtd runs is live only if some other qemu hook was
already there when it started; :func:`status` works this out and says when
libvirtd must be restarted (:func:`restart_libvirtd`) or reloaded
(:func:`reload_libvirtd`).

Nothing here prints; every function returns a result or raises a
:class:`vmshare.errors.VmshareError`.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmshare.errors import AccessDenied, VmshareError
from vmshare.hook.libvirtd import (
    LIBVIRTD_PIDFILE,
    PROC,
    LibvirtdState,
    RestartResult,
    libvirtd_state,
    reload_libvirtd,
    restart_libvirtd,
)
from vmshare.records.atomic import AtomicWriteError as StateError
from vmshare.records.atomic import write_atomic

__all__ = [
    "HOOKS_DIR",
    "HOOK_NAME",
    "LIBVIRTD_PIDFILE",
    "MARKER",
    "SHIPPED_HOOK",
    "HookInstallError",
    "HookStatus",
    "InstallResult",
    "LibvirtdState",
    "RestartResult",
    "UninstallResult",
    "install",
    "libvirtd_state",
    "reload_libvirtd",
    "restart_libvirtd",
    "status",
    "uninstall",
]

HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK_NAME = "vmshare"
MARKER = b"# vmshare-managed-hook: vmshare-qemu-hook"


def _shipped_hook() -> Path:
    """The hook script: from the checkout, or where a wheel installed it."""
    checkout = Path(__file__).resolve().parents[2] / "hooks" / "vmshare-qemu-hook"
    installed = Path(sys.prefix) / "share" / "vmshare" / "hooks" / "vmshare-qemu-hook"
    return checkout if checkout.is_file() or not installed.is_file() else installed


SHIPPED_HOOK = _shipped_hook()
MAX_HOOK_BYTES = 1 << 20
RESTART_MESSAGE = "libvirtd must be restarted to load the hook"
# /proc start times are derived from 10 ms clock ticks and /proc/uptime: allow slack
CLOCK_SLACK_S = 0.5

HookState = Literal["installed", "outdated", "missing", "foreign"]


class HookInstallError(VmshareError):
    """The hook cannot be installed or removed (bad source, foreign file, I/O error)."""


@dataclass(frozen=True)
class HookStatus:
    """What :func:`status` found.

    ``state``: installed (same bytes as the shipped hook), outdated (ours, but
    different bytes), missing, or foreign (a file of that name not made by
    vmshare). ``other_scripts`` are the other executables in ``qemu.d``;
    ``monolithic_hook`` says whether ``hooks/qemu`` is there and executable.
    ``restart_needed`` is true when libvirtd runs but cannot have loaded the
    hook; ``messages`` are one-line notes for the operator.
    """

    path: Path
    state: HookState
    written_at: float | None
    other_scripts: tuple[str, ...]
    monolithic_hook: bool
    libvirtd: LibvirtdState
    restart_needed: bool
    messages: tuple[str, ...]


@dataclass(frozen=True)
class InstallResult:
    path: Path
    action: Literal["installed", "updated", "unchanged"]
    status: HookStatus


@dataclass(frozen=True)
class UninstallResult:
    path: Path
    removed: bool


def _os_error(what: str, exc: OSError) -> VmshareError:
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{what}: {exc.strerror}")
    return HookInstallError(f"{what}: {exc.strerror or exc}")


def _read_bounded(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HookInstallError(f"{path} is not a regular file")
        chunks = []
        size = 0
        while size <= MAX_HOOK_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_HOOK_BYTES:
        raise HookInstallError(f"{path} is larger than {MAX_HOOK_BYTES} bytes")
    return b"".join(chunks)


def _is_ours(content: bytes) -> bool:
    return any(line.startswith(MARKER) for line in content.splitlines()[:5])


def _shipped(source: Path) -> bytes:
    try:
        content = _read_bounded(source)
    except FileNotFoundError as exc:
        raise HookInstallError(f"shipped hook not found at {source}") from exc
    except OSError as exc:
        raise _os_error(f"cannot read shipped hook {source}", exc) from exc
    if not content.startswith(b"#!/") or not _is_ours(content):
        raise HookInstallError(f"{source} is not the vmshare hook (no shebang or marker line)")
    return content


def _ensure_dir(path: Path) -> None:
    """Create path (and parents) 0755 whatever the umask; keep an existing one as it is."""
    if path.is_dir():
        return
    if not path.parent.is_dir():
        _ensure_dir(path.parent)
    try:
        path.mkdir(mode=0o755)
        os.chmod(path, 0o755)
    except FileExistsError as exc:
        if not path.is_dir():
            raise HookInstallError(f"{path} exists and is not a directory") from exc
    except OSError as exc:
        raise _os_error(f"cannot create {path}", exc) from exc


def install(hooks_dir: Path = HOOKS_DIR, source: Path = SHIPPED_HOOK) -> InstallResult:
    """Install the shipped hook as ``<hooks_dir>/qemu.d/vmshare`` (0755, root).

    The copy is written to a hidden temp file in ``hooks_dir`` (where libvirt
    runs only files named after drivers) and renamed into ``qemu.d``, so
    libvirt never runs a half-written hook. Other files are never touched.

    Raises HookInstallError if the source is not the vmshare hook, if a file
    not made by vmshare already has our name, or on I/O errors; AccessDenied
    without the privilege to write.
    """
    content = _shipped(source)
    qemu_d = hooks_dir / "qemu.d"
    target = qemu_d / HOOK_NAME
    _ensure_dir(qemu_d)
    action: Literal["installed", "updated", "unchanged"] = "installed"
    existing = _existing(target)
    if existing is not None:
        if not _is_ours(existing):
            raise HookInstallError(f"{target} was not installed by vmshare; refusing to replace it")
        st = os.stat(target)
        root_owned = os.geteuid() != 0 or (st.st_uid, st.st_gid) == (0, 0)
        if existing == content and stat.S_IMODE(st.st_mode) == 0o755 and root_owned:
            return InstallResult(target, "unchanged", status(hooks_dir, source))
        action = "updated"
    _write_atomically(hooks_dir, target, content)
    return InstallResult(target, action, status(hooks_dir, source))


def _existing(target: Path) -> bytes | None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _os_error(f"cannot inspect {target}", exc) from exc
    if not stat.S_ISREG(st.st_mode):
        raise HookInstallError(f"{target} is not a regular file; refusing to touch it")
    try:
        return _read_bounded(target)
    except OSError as exc:
        raise _os_error(f"cannot read {target}", exc) from exc


def _write_atomically(hooks_dir: Path, target: Path, content: bytes) -> None:
    # The temp file lives in hooks_dir, where libvirt runs only files named
    # after drivers, never in qemu.d, where it runs every executable.
    try:
        write_atomic(target, content, 0o755, tmp_dir=hooks_dir,
                     owner=(0, 0) if os.geteuid() == 0 else None)
    except StateError as exc:
        raise HookInstallError(str(exc)) from exc


def uninstall(hooks_dir: Path = HOOKS_DIR) -> UninstallResult:
    """Remove ``qemu.d/vmshare`` if, and only if, vmshare installed it.

    Raises HookInstallError if the file there is not ours (no marker line) or
    is not a regular file; AccessDenied without the privilege to remove it.
    """
    target = hooks_dir / "qemu.d" / HOOK_NAME
    existing = _existing(target)
    if existing is None:
        return UninstallResult(target, removed=False)
    if not _is_ours(existing):
        raise HookInstallError(f"{target} was not installed by vmshare; refusing to remove it")
    try:
        os.unlink(target)
    except FileNotFoundError:
        return UninstallResult(target, removed=False)
    except OSError as exc:
        raise _os_error(f"cannot remove {target}", exc) from exc
    return UninstallResult(target, removed=True)


def _executable(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def _change_time(path: Path) -> float | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    # ctime moves on create and rename and cannot be set back by cp -p or touch
    return max(st.st_mtime, st.st_ctime)


def status(hooks_dir: Path = HOOKS_DIR, source: Path = SHIPPED_HOOK, *,
           pidfile: Path = LIBVIRTD_PIDFILE, proc: Path = PROC, scan_proc: bool = True,
           comm: str = "libvirtd") -> HookStatus:
    """Report whether the hook is installed and whether libvirtd has loaded it.

    Raises HookInstallError if the shipped hook cannot be read (nothing to
    compare with) and AccessDenied if the installed one cannot be read.
    """
    shipped = _shipped(source)
    qemu_d = hooks_dir / "qemu.d"
    target = qemu_d / HOOK_NAME
    try:
        existing = _existing(target)
    except HookInstallError:
        existing = b""  # a directory or symlink of our name: certainly not ours
    state: HookState
    if existing is None:
        state = "missing"
    elif not _is_ours(existing):
        state = "foreign"
    else:
        state = "installed" if existing == shipped else "outdated"
    try:
        others = tuple(sorted(p.name for p in qemu_d.iterdir()
                              if p.name != HOOK_NAME and _executable(p)))
    except OSError:
        others = ()
    monolithic = _executable(hooks_dir / "qemu")
    daemon = libvirtd_state(pidfile, proc, scan_proc=scan_proc, comm=comm)
    written = _change_time(target) if existing is not None else None
    messages: list[str] = []
    restart = False
    if state == "missing":
        messages.append(f"{target} is not installed")
    elif state == "foreign":
        messages.append(f"{target} was not installed by vmshare")
    elif state == "outdated":
        messages.append(f"{target} differs from the shipped hook; run install again")
    if state in ("installed", "outdated") and not _executable(target):
        messages.append(f"{target} is not executable: libvirt skips it")
    if daemon.running and daemon.started_at is not None and written is not None \
            and state != "foreign":
        loaded_earlier = [hooks_dir / "qemu"] + [qemu_d / n for n in others]
        had_hooks = any((t := _change_time(p)) is not None and t < daemon.started_at
                        and _executable(p) for p in loaded_earlier)
        if written > daemon.started_at - CLOCK_SLACK_S and not had_hooks:
            restart = True
            messages.append(f"{RESTART_MESSAGE} (or sent SIGHUP): it started before the "
                            "hook was written")
    elif not daemon.running:
        messages.append("libvirtd is not running; it loads the hook when it starts")
    return HookStatus(target, state, written, others, monolithic, daemon, restart,
                      tuple(messages))
