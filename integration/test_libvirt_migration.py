"""A libvirt live migration of real Debian guests to a second libvirtd and back,
with vmshare policy intact on each destination.

Two Debian 12 guests (adopted: nothing mergeable until vmshare turns a RAM
backend on) carry their policy in their own domain metadata: ``on`` merge=on,
``off`` merge=off, both in trust group blue. The second host
(integration/second_host.py: its own libvirtd, virtlogd, host UUID and
namespace, vmshare's hook in its qemu.d) runs its own vmshare daemon with a
host config that says nothing about them (default merge off), so only the
metadata that travelled with the domain XML can turn ``on`` mergeable there.
After ``virsh migrate --live`` each way: ``on``'s RAM is mergeable again (QEMU
property and the kernel's ``mg`` flag), ``off`` has no mergeable mapping at
all, the trust group and policy read back from the destination, the
destination daemon audited the change as a migrate-in, and the source no
longer runs the guest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import DaemonProc, audit_lines, wait_for, write_config
from integration.debian_guests import (
    LIBVIRT_URI,
    DebianGuests,
    booted_debian_guests,
    mergeable_ranges,
    virsh,
)
from integration.second_host import SecondHost, migrate_live
from vmshare.hypervisor.metadata import NAMESPACE

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
MEMORY_MIB = 384
# the hook's defaults, which are the second host's own (a tmpfs over /run there)
HOOK_SPOOL = "/run/vmshare/spool"
HOOK_SOCKET = "/run/vmshare/wakeup.sock"


@pytest.fixture(scope="module")
def guests() -> Iterator[DebianGuests]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a second libvirtd in its own mount namespace)")
    with booted_debian_guests(2, memory_mib=MEMORY_MIB) as booted:
        yield booted


def _cli(env: dict[str, str], *args: str, host: SecondHost | None = None) -> str:
    argv = [sys.executable, "-m", "vmshare", *args]
    r = subprocess.run(host.nsenter(argv) if host else argv, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"vmshare {' '.join(args)}: {r.stderr}"
    return r.stdout


def _config(tmp: Path, *, own_hook: bool) -> Path:
    """A host config naming no VM (default merge off): only metadata turns one on."""
    path = write_config(tmp, {}, default_merge="off")
    if own_hook:
        text = re.sub(r'spool_dir = ".*"', f'spool_dir = "{HOOK_SPOOL}"', path.read_text())
        path.write_text(re.sub(r'socket = ".*"', f'socket = "{HOOK_SOCKET}"', text))
    return path


def _backends(env: dict[str, str], name: str, host: SecondHost | None) -> list[dict[str, Any]]:
    doc = json.loads(_cli(env, "list", "--json", host=host))
    return [b for d in doc["vms"] if d["name"] == name for b in d.get("backends", [])]


def _policy_held(on: str, off: str, pid_on: int, pid_off: int, env: dict[str, str],
                 host: SecondHost | None) -> None:
    """``on``'s RAM backends mergeable (QEMU and kernel), ``off`` nothing mergeable."""
    ram = mergeable_ranges(pid_on)
    assert ram and sum(hi - lo for lo, hi in ram) >= MEMORY_MIB << 20, ram
    assert mergeable_ranges(pid_off) == [], f"{off} has a mergeable mapping"
    for name, want in ((on, True), (off, False)):
        found = _backends(env, name, host)
        assert found, f"{name}: no backends listed"
        assert all(b["merge"] is want and b["mg"] is want for b in found), (name, found)


def _policy_travelled(env: dict[str, str], on: str, off: str, host: SecondHost | None) -> None:
    """The metadata where the guests now run, and the decisions vmshare makes there."""
    r = host.virsh("metadata", on, NAMESPACE) if host else virsh("metadata", on, NAMESPACE)
    assert r.returncode == 0 and 'merge="on"' in r.stdout and 'group="blue"' in r.stdout, r
    doc = json.loads(_cli(env, "policy", "show", "--json", on, off, host=host))
    decisions = {v["name"]: v["decision"] for v in doc["vms"]}
    assert decisions[on]["merge"] is True and decisions[on]["group"] == "blue", decisions
    assert decisions[off]["merge"] is False and decisions[off]["group"] == "blue", decisions


def _audited_migrate_in(audit: Path, on: str, off: str) -> float:
    """The destination daemon's record of turning ``on`` mergeable as a migrate-in
    (and none turning ``off`` on); returns the record's wall-clock time."""
    records = audit_lines(audit)
    print("audit: " + "; ".join(f"{r['target']} -> {r['after']} ({r.get('event')})"
                                for r in records))
    found = [r for r in records if r["target"] == f"{on}/pc.ram" and r["after"] is True
             and "migrate-in" in str(r.get("event"))]
    assert found, [(r["target"], r["after"], r.get("event")) for r in records]
    assert not [r for r in records if r["target"].startswith(f"{off}/") and r["after"]], records
    return float(found[0]["time"])


def _migrate_both(src: str, dst: str, names: list[str], sock: Path,
                  on_pid: Callable[[], int]) -> tuple[list[float], float]:
    """Migrate ``on`` then ``off``; wait for ``on``'s RAM to be mergeable on the
    destination. Returns the migrations' seconds and when ``on``'s returned."""
    on_seconds, on_done = migrate_live(names[0], src, dst, sock)
    wait_for(lambda: mergeable_ranges(on_pid()), 30, "policy on not applied after migrate-in")
    off_seconds, _ = migrate_live(names[1], src, dst, sock)
    return [on_seconds, off_seconds], on_done


def _sources_gone(sources: dict[str, int], still_there: Callable[[str], bool]) -> None:
    for name, pid in sources.items():
        assert not still_there(name), f"{name} still defined on the source"
        assert not Path(f"/proc/{pid}").exists(), f"source QEMU {pid} of {name} still runs"


def test_live_migration_to_a_second_host_and_back_keeps_policy(
        guests: DebianGuests, second_host: SecondHost, tmp_path: Path) -> None:
    host2 = second_host
    on, off = guests.names
    env = {**os.environ, "VMSHARE_CONFIG": str(_config(tmp_path, own_hook=False)),
           "VMSHARE_AUDIT_LOG": str(tmp_path / "cli-audit.jsonl")}
    for name, merge in ((on, "on"), (off, "off")):
        _cli(env, "policy", "set", name, "--merge", merge, "--group", "blue", "--apply")
    _policy_held(on, off, guests.pid(on), guests.pid(off), env, None)
    sources = {n: guests.pid(n) for n in guests.names}
    there = tmp_path / "host2"
    there.mkdir()
    env2 = {**os.environ, "VMSHARE_CONFIG": str(_config(there, own_hook=True)),
            "VMSHARE_AUDIT_LOG": str(there / "audit.jsonl")}
    d2 = DaemonProc(Path(env2["VMSHARE_CONFIG"]), there / "daemon.log",
                    domains=tuple(guests.names), wrap=tuple(host2.nsenter([])))
    try:
        d2.wait_log("reconciled", timeout=60)
        seconds, done = _migrate_both(LIBVIRT_URI, host2.uri, guests.names,
                                      tmp_path / "mig.sock", lambda: host2.pid(on))
        _policy_held(on, off, host2.pid(on), host2.pid(off), env2, host2)
        _policy_travelled(env2, on, off, host2)
        applied = _audited_migrate_in(there / "audit.jsonl", on, off) - done
        # the second host's own hook reported each incoming guest to its daemon
        # (whichever of it and libvirt's event came first acted)
        for name in guests.names:
            assert re.search(rf"hook {name} started/begin -> Trigger\(.*resets='migrate-in'",
                             d2.text()), d2.text()[-3000:]
    finally:
        d2.kill(signal.SIGTERM)
    _sources_gone(sources, lambda n: virsh("domstate", n).returncode == 0)
    print(f"there: migrated in {seconds[0]:.1f} and {seconds[1]:.1f} s; policy on applied "
          f"{applied:+.2f} s from the end of its migration")
    _migrate_back(guests, host2, env, tmp_path)


def _migrate_back(guests: DebianGuests, host2: SecondHost, env: dict[str, str],
                  tmp_path: Path) -> None:
    """Back to the main libvirtd, whose daemon (libvirt events, no hook) re-applies."""
    on, off = guests.names
    home = tmp_path / "home"
    home.mkdir()
    d1 = DaemonProc(_config(home, own_hook=False), home / "daemon.log",
                    domains=tuple(guests.names))
    try:
        d1.wait_log("reconciled", timeout=60)
        sources = {n: host2.pid(n) for n in guests.names}
        seconds, done = _migrate_both(host2.uri, LIBVIRT_URI, guests.names,
                                      tmp_path / "back.sock", lambda: guests.pid(on))
        _policy_held(on, off, guests.pid(on), guests.pid(off), env, None)
        _policy_travelled(env, on, off, None)
        applied = _audited_migrate_in(home / "audit.jsonl", on, off) - done
    finally:
        d1.kill(signal.SIGTERM)
    _sources_gone(sources, lambda n: host2.virsh("domstate", n).returncode == 0)
    print(f"back: migrated in {seconds[0]:.1f} and {seconds[1]:.1f} s; policy on applied "
          f"{applied:+.2f} s from the end of its migration")
