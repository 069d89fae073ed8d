"""Live migration between two plain QEMU processes, watched by the daemon in plain-QEMU mode.

The destination is a new process with new pages and QEMU's default merge=on;
the daemon (``--qmp-glob DIR/*.qmp``) must bring it to policy and track how
far its memory merges again.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import (
    DaemonProc,
    all_merge,
    audit_lines,
    backends,
    cli_json,
    real_ksm_pages,
    wait_for,
    write_config,
)
from integration.ksm_fixtures import kernel_ksm
from vmshare.guest import FillSpec, GuestImage, qemu_argv, wait_ready
from vmshare.hypervisor.qmp import QmpHypervisor
from vmshare.ksm.sysfs import KsmSysfs

__all__ = ["kernel_ksm"]
pytestmark = pytest.mark.integration

NAME = "vmshare-it-mig"
MEMORY_MIB = 192


def qmp(sock: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One command on the QMP socket, through the adapter's async API."""
    async def run() -> Any:
        q = QmpHypervisor(str(sock), 10.0)
        try:
            return await q.execute(command, arguments)
        finally:
            await q.aclose()
    return asyncio.run(run())


class Guests:
    """Plain QEMU guests with their QMP sockets in one short directory."""

    def __init__(self, image: GuestImage, launch: Callable[[list[str]], Any],
                 sock_dir: Path, log_dir: Path) -> None:
        self.image = image
        self.launch = launch
        self.dir = sock_dir
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def sock(self, tag: str) -> Path:
        return self.dir / f"{tag}.qmp"

    def console(self, tag: str) -> Path:
        return self.log_dir / f"{tag}.log"

    def start(self, tag: str, spec: FillSpec, *, name: str = NAME,
              incoming: str | None = None) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = self.launch(qemu_argv(
            self.image, spec, memory_mib=MEMORY_MIB, qmp_socket=self.sock(tag),
            console_log=self.console(tag), name=name, incoming=incoming))
        self.procs[tag] = proc

        def up() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise AssertionError(f"QEMU {tag} exited: {err[-2000:]}")
            return self.sock(tag).exists()
        wait_for(up, 20, f"QEMU {tag} made no QMP socket")
        return proc

    def migrate(self, src: str, dst: str) -> float:
        """Migrate ``src`` to ``dst`` (started with incoming unix:DIR/mig.sock);
        returns the seconds it took. The source quits afterwards, as libvirt's does."""
        t0 = time.monotonic()
        qmp(self.sock(src), "migrate", {"uri": f"unix:{self.dir}/mig.sock"})

        def finished() -> dict[str, Any] | None:
            r: dict[str, Any] = qmp(self.sock(src), "query-migrate")
            if r.get("status") in ("failed", "cancelled"):
                raise AssertionError(f"migration failed: {r}")
            return r if r.get("status") == "completed" else None
        wait_for(finished, 30, "migration did not complete", poll=0.1)
        took = time.monotonic() - t0
        assert qmp(self.sock(dst), "query-status")["status"] == "running"
        qmp(self.sock(src), "quit")
        self.procs[src].wait(timeout=10)
        return took


@pytest.fixture
def guests(guest_image: GuestImage, qemu_launcher: Callable[[list[str]], Any],
           tmp_path: Path) -> Iterator[Guests]:
    # Unix socket paths are limited to 108 bytes: keep them out of pytest's tmp tree.
    sock_dir = Path(tempfile.mkdtemp(prefix="vmshare-mig-", dir="/tmp"))
    try:
        yield Guests(guest_image, qemu_launcher, sock_dir, tmp_path)
    finally:   # qemu_launcher kills every QEMU it started
        shutil.rmtree(sock_dir, ignore_errors=True)


def start_daemon(tmp: Path, guests: Guests, vms: dict[str, str]) -> tuple[Path, DaemonProc]:
    glob = f"{guests.dir}/*.qmp"
    cfg = write_config(tmp, vms)
    d = DaemonProc(cfg, tmp / "daemon.log", "--qmp-glob", glob)
    d.wait_log(f"running: {glob}")
    return cfg, d


def remerge_of(cfg: Path, sock: Path) -> dict[str, Any] | None:
    doc = cli_json("--qmp", str(sock), "remerge", "--json", "--config", str(cfg))
    vm = next(v for v in doc["vms"] if v["name"] == NAME)
    r: dict[str, Any] | None = vm["remerge"]
    return r


def test_migration_destination_gets_policy_off(guests: Guests, tmp_path: Path) -> None:
    src_sock, dst_sock = guests.sock("src"), guests.sock("dst")
    guests.start("src", FillSpec())
    _cfg, d = start_daemon(tmp_path, guests, {NAME: "off"})
    try:
        wait_for(lambda: all_merge(NAME, False, "--qmp", str(src_sock)), 20,
                 lambda: f"policy off not applied to the source:\n{d.text()[-3000:]}")
        wait_ready(guests.console("src"), 60, pid=guests.procs["src"].pid)
        dst = guests.start("dst", FillSpec(), incoming=f"unix:{guests.dir}/mig.sock")
        took = guests.migrate("src", "dst")
        t0 = time.monotonic()
        print(f"migration took {took:.2f} s")
        wait_for(lambda: all_merge(NAME, False, "--qmp", str(dst_sock)), 15,
                 lambda: f"destination not brought to policy: "
                 f"{backends(NAME, '--qmp', str(dst_sock))}\n{d.text()[-3000:]}")
        print(f"destination made unmergeable {time.monotonic() - t0:.2f} s after the "
              "migration completed")
        mine = [r for r in audit_lines(tmp_path / "audit.jsonl") if r["vm"] == NAME]
        # One record per real change: the source at daemon start, the destination
        # (QEMU's default merge=on) after it migrated in.
        assert [(r["target"], r["before"], r["after"]) for r in mine] == \
            [(f"{NAME}/pc.ram", True, False)] * 2, mine
        assert mine[0]["event"] == "daemon-start"
        # the destination is brought to policy either while it waits for the
        # migration (a poll saw it in ``inmigrate``) or once the migration completed
        assert "migrate-in" in mine[1]["event"] or \
            mine[1]["event"] == "qmp:socket-appeared/inmigrate", mine[1]
        assert mine[1]["actor"] == "daemon" and "merge=off" in mine[1]["reason"]
        # the migrate-in reset is recorded once the daemon sees the migration
        # completed, which may be a moment after it applied the policy (inmigrate)
        def remerge() -> dict[str, Any] | None:
            vms = json.loads((tmp_path / "state.json").read_text())["vms"]
            r: dict[str, Any] | None = vms.get(NAME, {}).get("remerge")
            return r
        wait_for(lambda: (remerge() or {}).get("event") == "migrate-in", 15,
                 lambda: f"no migrate-in record: {remerge()}\n{d.text()[-3000:]}")
        assert (remerge() or {}).get("pid") == dst.pid
        # It stays that way: the next periodic reconcile (every 5 s) changes nothing.
        mark = len(d.text())
        d.wait_log("(periodic)", 15, after=mark)
        assert len([r for r in audit_lines(tmp_path / "audit.jsonl") if r["vm"] == NAME]) == 2
        assert all_merge(NAME, False, "--qmp", str(dst_sock))
    finally:
        d.kill(signal.SIGTERM)
    assert d.proc.returncode == 0, d.text()[-2000:]


def test_migration_destination_merges_again(guests: Guests, tmp_path: Path,
                                            kernel_ksm: KsmSysfs) -> None:
    spec = FillSpec(identical_mib=64, seed=11)
    dst_sock = guests.sock("dst")
    guests.start("src", spec)
    guests.start("peer", spec, name=f"{NAME}-peer")       # stays put
    cfg, d = start_daemon(tmp_path, guests, {})
    try:
        for tag in ("src", "peer"):
            wait_ready(guests.console(tag), 60, pid=guests.procs[tag].pid)
        kernel_ksm.set("run", 1)

        def observed() -> int:
            try:
                st = json.loads((tmp_path / "state.json").read_text())
            except FileNotFoundError:
                return 0
            return int(st["vms"].get(NAME, {}).get("ksm_pages", 0))
        wait_for(lambda: observed() > 12000, 40,
                 lambda: f"source never merged: {observed()} KSM pages")
        before = observed()
        # ksmd at these settings merges a fresh 192 MiB guest within a second; pause
        # it (run=0 keeps what is merged) so the record is seen before re-merging.
        kernel_ksm.set("run", 0)
        dst = guests.start("dst", spec, incoming=f"unix:{guests.dir}/mig.sock")
        took = guests.migrate("src", "dst")
        print(f"migration took {took:.2f} s; the source had {before} KSM pages")
        # the daemon's observation may see the new pid first and start a
        # "qemu-restart" record; the migration's completion then names it
        first = wait_for(lambda: (r := remerge_of(cfg, dst_sock)) and
                         r["event"] == "migrate-in" and r, 15,
                         lambda: f"no migrate-in record ({remerge_of(cfg, dst_sock)}):\n"
                         f"{d.text()[-3000:]}")
        assert first["event"] == "migrate-in"
        assert first["previous_ksm_pages"] >= before * 0.9
        # New process, new pages: nothing of it is a KSM page yet (counted here from
        # kpageflags directly). vmshare's own figure is not asserted to be 0: the
        # pages a migration never wrote map the huge zero page, which the
        # attribution's zero-page shortcut counts as KSM pages (reported).
        assert real_ksm_pages(dst.pid) == 0
        t0 = time.monotonic()
        kernel_ksm.set("run", 1)
        done = wait_for(lambda: real_ksm_pages(dst.pid) >= before * 0.5
                        and (p := remerge_of(cfg, dst_sock))
                        and (p["fraction"] or 0) > (first["fraction"] or 0) and p, 40,
                        lambda: f"re-merge did not rise: {remerge_of(cfg, dst_sock)}")
        print(f"re-merge {first} -> {done} ({time.monotonic() - t0:.1f} s after ksmd resumed)")
        assert done["fraction"] > (first["fraction"] or 0)
        assert done["since_seconds"] >= first["since_seconds"]
        real = real_ksm_pages(dst.pid)
        print(f"destination: {real} KSM pages (kpageflags), previously {before}")
        assert real >= before * 0.5
        assert done["event"] == "migrate-in"
        assert all_merge(NAME, True, "--qmp", str(dst_sock))
        state = json.loads((tmp_path / "state.json").read_text())["vms"][NAME]
        assert state["pid"] == dst.pid
        # Policy on and QEMU's default on: nothing to change, nothing audited.
        assert audit_lines(tmp_path / "audit.jsonl") == []
    finally:
        d.kill(signal.SIGTERM)
    assert d.proc.returncode == 0, d.text()[-2000:]
