"""A second libvirt "host" on this machine, for live migration between two libvirtds.

libvirt refuses to migrate a domain to the host it runs on (it compares host
UUIDs), so the tests start a second libvirtd and virtlogd with their own host
UUID inside a private mount namespace (``unshare -m``): a tmpfs over /run
(so its sockets, pid files and vmshare's default hook spool are its own) and
temporary directories bound over /etc/libvirt, /var/lib/libvirt,
/var/log/libvirt and /var/cache/libvirt (and /etc/vmshare when the host has
one). Its client socket sits in a temporary directory outside the namespace
(``unix_sock_dir``), so the main libvirtd and the tests reach it as
``qemu+unix:///system?socket=...``. Its qemu.d holds only vmshare's hook,
installed before it starts (libvirtd looks hooks up once, at start).

Everything runs as processes this module started and stops by pid; the
namespace's mounts go away with its last process, the directories with the
fixture. Nothing of the host's libvirt configuration, hooks or domains is
touched or copied (only the top-level ``*.conf`` files, so QEMU runs as it
does on the main host).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmshare.hook.install import install

REPO = Path(__file__).resolve().parent.parent
# bound over these inside the namespace (the key is the directory under the root)
BINDS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
         "cache": "/var/cache/libvirt"}
START_TIMEOUT_S = 60.0


@dataclass
class SecondHost:
    root: Path
    uri: str
    host_uuid: str
    libvirtd: subprocess.Popen[bytes]

    def inside(self, path: str) -> Path:
        """``path`` as the namespace sees it (through its libvirtd's /proc root)."""
        return Path(f"/proc/{self.libvirtd.pid}/root{path}")

    def pid(self, name: str) -> int:
        """The QEMU pid of running domain ``name`` on this host."""
        return int(self.inside(f"/run/libvirt/qemu/{name}.pid").read_text().strip())

    def nsenter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace, where qemu:///system is this host."""
        return ["nsenter", "-t", str(self.libvirtd.pid), "-m", "--", *argv]

    def virsh(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def vmshare(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """The CLI run on this host (inside the namespace)."""
        return subprocess.run(self.nsenter([sys.executable, "-m", "vmshare", *args]),
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120, check=False)


def _prepare(root: Path, host_uuid: str) -> str:
    """The directories, configuration and hook; returns the namespace's start script."""
    for key in (*BINDS, "sock", "etc-vmshare"):
        (root / key).mkdir(mode=0o700)
    for conf in Path("/etc/libvirt").glob("*.conf"):
        shutil.copy2(conf, root / "etc" / conf.name)
    with open(root / "etc" / "libvirtd.conf", "a") as fh:
        fh.write(f'\nhost_uuid = "{host_uuid}"\nunix_sock_dir = "{root}/sock"\n')
    for sub in ("lib/qemu", "log/qemu", "cache/qemu"):
        (root / sub).mkdir(parents=True)
    install(hooks_dir=root / "etc" / "hooks")
    lines = ["set -e", "mount -t tmpfs -o mode=0755 tmpfs /run"]
    lines += [f"mount --bind {root / key} {target}" for key, target in BINDS.items()]
    if Path("/etc/vmshare").is_dir():     # the host's hook.conf must not steer this hook
        lines.append(f"mount --bind {root / 'etc-vmshare'} /etc/vmshare")
    # inside, qemu:///system is this host: its sockets where clients look for them
    lines += ["mkdir -p /run/libvirt"]
    lines += [f"ln -s {root}/sock/{s} /run/libvirt/{s}"
              for s in ("libvirt-sock", "libvirt-sock-ro")]
    lines += ["virtlogd -d", "exec libvirtd"]
    return "\n".join(lines) + "\n"


def _wait_up(host: SecondHost, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if host.libvirtd.poll() is not None:
            raise RuntimeError(f"second libvirtd exited {host.libvirtd.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        if (host.root / "sock" / "libvirt-sock").exists() \
                and host.virsh("uri", timeout=10).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"second libvirtd not answering after {START_TIMEOUT_S:.0f} s: "
                       f"{log.read_text(errors='replace')[-2000:]}")


def _namespace_pids(leader: int) -> list[int]:
    """Every process in ``leader``'s mount namespace other than ``leader``."""
    try:
        ns = os.readlink(f"/proc/{leader}/ns/mnt")
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != leader:
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == ns:
                    pids.append(int(entry.name))
    return pids


def _stop(host: SecondHost) -> None:
    """Destroy its domains, stop virtlogd and libvirtd, and anything else left inside."""
    listed = host.virsh("list", "--name", timeout=30)
    for name in listed.stdout.split():
        host.virsh("destroy", name, timeout=60)
    others = _namespace_pids(host.libvirtd.pid)
    with contextlib.suppress(ProcessLookupError):
        host.libvirtd.send_signal(signal.SIGTERM)
    try:
        host.libvirtd.wait(timeout=15)
    except subprocess.TimeoutExpired:
        host.libvirtd.kill()
        host.libvirtd.wait()
    for pid in others:                    # virtlogd, and a QEMU that outlived destroy
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in others) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def second_libvirtd() -> Iterator[SecondHost]:
    """A second libvirtd (and virtlogd) with its own host UUID, vmshare's hook
    in its qemu.d, reachable from this namespace at ``.uri``."""
    host_uuid = str(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="vmshare-host2-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o700)
        script = root / "start.sh"
        script.write_text(_prepare(root, host_uuid))
        log = root / "libvirtd.out"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "--",
                                     "sh", str(script)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        host = SecondHost(root, f"qemu+unix:///system?socket={root}/sock/libvirt-sock",
                          host_uuid, proc)
        try:
            _wait_up(host, log)
            yield host
        finally:
            _stop(host)


def migrate_live(name: str, src: str, dst: str, sock: Path) -> tuple[float, float]:
    """``virsh migrate --live`` (managed by the client, QEMU's stream over a unix
    socket: both daemons are on this machine; ``--unsafe``: the disks are on one
    file system, which libvirt cannot tell is shared); returns its seconds and
    the wall-clock time it returned."""
    sock.unlink(missing_ok=True)
    t0 = time.monotonic()
    r = subprocess.run(["virsh", "-q", "-c", src, "migrate", "--live", "--unsafe", name, dst,
                        f"unix://{sock}"], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, f"migrate {name} {src} -> {dst}: {r.stderr}"
    return time.monotonic() - t0, time.time()
