"""The daemon end to end: real libvirtd, real TCG guests, real kernel KSM.

Order matters: the libvirtd restart test runs last in this module.

Test sessions run concurrently on one libvirtd. Domain names therefore carry
this run's random id (integration.domains), are torn down by UUID, and each
daemon manages only this run's domains
(VMSHARE_DAEMON_DOMAINS): with shared names, another session's fixture
destroyed and re-created "our" domain (a new QEMU, merge on again), and a
daemon managing every domain turned other sessions' guests back to its own
default. Both showed up as a second True->False audit record for one VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import (
    DaemonProc,
    all_merge,
    audit_lines,
    backends,
    cli_json,
    libvirt_pid,
    real_ksm_pages,
    wait_for,
    write_config,
)
from integration.domains import IT_DOMAIN_PREFIX, destroy_by_uuid
from integration.ksm_fixtures import kernel_ksm
from tests.hostguard import RUN_ID
from vmshare.guest import FillSpec, GuestImage, domain_xml, wait_ready
from vmshare.ksm.sysfs import KsmSysfs

__all__ = ["kernel_ksm"]
pytestmark = pytest.mark.integration

P = f"{IT_DOMAIN_PREFIX}dmn{RUN_ID}-"
MINE = (f"{P}*",)


@pytest.fixture
def consoles(tmp_path: Path) -> Path:
    """The guests' serial console logs."""
    path = tmp_path / "consoles"
    path.mkdir()
    return path


@pytest.fixture
def domains(libvirt_conn: Any, guest_image: GuestImage, consoles: Path) -> Iterator[Any]:
    """start(name, spec, **xml options); every domain destroyed at teardown, by
    the UUID createXML returned (the name may be reused by a restore)."""
    import libvirt
    uuids: list[str] = []

    def start(name: str, spec: FillSpec | None = None, **kw: Any) -> Any:
        # A fresh connection: libvirtd may have been restarted by the test.
        dom = libvirt.open("qemu:///system").createXML(domain_xml(
            name, guest_image, spec or FillSpec(), memory_mib=kw.pop("memory_mib", 192),
            console_log=consoles / f"{name}.log", **kw), 0)
        uuids.append(dom.UUIDString())
        return dom

    try:
        yield start
    finally:
        for uuid in uuids:
            destroy_by_uuid(uuid)


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Path:
    return tmp_path


def test_policy_on_start_and_sigkill_restart(domains: Any, daemon_dir: Path) -> None:
    cfg = write_config(daemon_dir, {f"{P}off": "off"})
    d = DaemonProc(cfg, daemon_dir / "daemon.log", domains=MINE)
    try:
        d.wait_log("running: qemu:///system")
        t0 = time.monotonic()
        domains(f"{P}on")
        domains(f"{P}off")
        domains(f"{P}nsp", nosharepages=True)
        wait_for(lambda: all_merge(f"{P}off", False), 20,
                 lambda: f"policy off not applied: {backends(P + 'off')}\n{d.text()[-3000:]}")
        took = time.monotonic() - t0
        print(f"policy off applied {took:.2f} s after the three domains were started")
        assert took < 15
        assert all_merge(f"{P}on", True)
        assert all(not m and not mg for m, mg in backends(f"{P}nsp").values())
        records = audit_lines(daemon_dir / "audit.jsonl")
        mine = [r for r in records if r["vm"] == f"{P}off"]
        # Exactly one record per real change: one change, made once, that sticks.
        assert [(r["target"], r["before"], r["after"]) for r in mine] == \
            [(f"{P}off/pc.ram", True, False)], f"{mine}\n{d.text()[-6000:]}"
        assert mine[0]["actor"] == "daemon"
        assert mine[0]["event"].startswith(("libvirt:started", "qmp:RESUME"))
        assert not [r for r in records if r["vm"] != f"{P}off"]
        assert "managing only domains matching" in d.text()
        wait_for(lambda: (daemon_dir / "state.json").exists(), 5, "no state file")
    finally:
        d.kill(signal.SIGKILL)
    # (d) killed with SIGKILL, restarted: reconciles, repeats nothing.
    before = (daemon_dir / "audit.jsonl").read_bytes()
    d2 = DaemonProc(cfg, daemon_dir / "daemon2.log", domains=MINE)
    try:
        d2.wait_log("reconciled")
        time.sleep(2)
        assert "daemon-start): 0 changed" in d2.text(), d2.text()[-2000:]
        assert (daemon_dir / "audit.jsonl").read_bytes() == before
        for line in before.decode().splitlines():
            json.loads(line)
        assert all_merge(f"{P}off", False) and all_merge(f"{P}on", True)
        assert json.loads((daemon_dir / "state.json").read_text())["version"] == 1
    finally:
        d2.kill(signal.SIGTERM)
    assert d2.proc.returncode == 0


def test_save_restore_reapplies_and_tracks_remerge(domains: Any, daemon_dir: Path,
                                                   libvirt_conn: Any, kernel_ksm: KsmSysfs,
                                                   consoles: Path) -> None:
    import libvirt
    spec = FillSpec(identical_mib=64, seed=7)
    cfg = write_config(daemon_dir, {f"{P}sr-off": "off"})
    d = DaemonProc(cfg, daemon_dir / "daemon.log", domains=MINE)
    saves: list[Path] = []
    try:
        d.wait_log("running: qemu:///system")
        domains(f"{P}sr-a", spec)
        dom_b = domains(f"{P}sr-b", spec)
        dom_c = domains(f"{P}sr-off")
        for n in ("sr-a", "sr-b"):
            wait_ready(consoles / f"{P}{n}.log", timeout=120)
        wait_for(lambda: all_merge(f"{P}sr-off", False), 20, "policy off not applied")
        kernel_ksm.set("run", 1)

        def b_pages() -> int:
            st = json.loads((daemon_dir / "state.json").read_text())
            return int(st["vms"].get(f"{P}sr-b", {}).get("ksm_pages", 0))
        wait_for(lambda: b_pages() > 8000, 90, lambda: f"B never merged: {b_pages()}")
        before_pages = b_pages()
        # ksmd at these settings re-merges a restored guest within a second: pause it
        # (run=0 keeps what is merged) so the record is seen before the re-merge.
        kernel_ksm.set("run", 0)
        for name, dom in ((f"{P}sr-b", dom_b), (f"{P}sr-off", dom_c)):
            path = daemon_dir / f"{name}.save"
            saves.append(path)
            t = time.monotonic()
            dom.save(str(path))
            print(f"save {name}: {time.monotonic() - t:.2f} s")
        for path in saves:
            t = time.monotonic()
            libvirt.open("qemu:///system").restore(str(path))
            print(f"restore {path.name}: {time.monotonic() - t:.2f} s")
        t0 = time.monotonic()
        wait_for(lambda: all_merge(f"{P}sr-off", False), 20,
                 lambda: f"policy not re-applied after restore:\n{d.text()[-3000:]}")
        print(f"policy off re-applied {time.monotonic() - t0:.2f} s after restore")

        def progress() -> dict[str, Any] | None:
            doc = cli_json("remerge", "--json", "--config", str(cfg))
            vm = next(v for v in doc["vms"] if v["name"] == f"{P}sr-b")
            r: dict[str, Any] | None = vm["remerge"]
            return r
        first = wait_for(progress, 20, lambda: f"no re-merge record:\n{d.text()[-3000:]}")
        assert first["event"] == "restore"
        assert first["previous_ksm_pages"] >= before_pages * 0.9
        b_pid = libvirt_pid(f"{P}sr-b")
        assert real_ksm_pages(b_pid) == 0          # a new process: nothing merged yet
        kernel_ksm.set("run", 1)
        done = wait_for(lambda: real_ksm_pages(b_pid) >= before_pages * 0.5
                        and (p := progress()) and (p["fraction"] or 0) > (first["fraction"] or 0)
                        and p, 90, lambda: f"re-merge did not rise: {progress()}")
        print(f"re-merge: {first} -> {done}; {real_ksm_pages(b_pid)} KSM pages")
        assert done["event"] == "restore"
        assert done["since_seconds"] >= first["since_seconds"]
    finally:
        d.kill(signal.SIGTERM)
        for path in saves:
            path.unlink(missing_ok=True)


def test_memory_hotplug_gets_policy(domains: Any, daemon_dir: Path, consoles: Path) -> None:
    import libvirt
    cfg = write_config(daemon_dir, {f"{P}hp": "off"})
    d = DaemonProc(cfg, daemon_dir / "daemon.log", domains=MINE)
    try:
        d.wait_log("running: qemu:///system")
        dom = domains(f"{P}hp", hotplug_slots=1)
        wait_for(lambda: all_merge(f"{P}hp", False), 20, "policy off not applied")
        wait_ready(consoles / f"{P}hp.log", timeout=120)
        dimm = ("<memory model='dimm'><target><size unit='MiB'>128</size>"
                "<node>0</node></target></memory>")
        t0 = time.monotonic()
        dom.attachDeviceFlags(dimm, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        wait_for(lambda: "memdimm0" in backends(f"{P}hp"), 10, "no memdimm0")
        wait_for(lambda: all_merge(f"{P}hp", False), 15,
                 lambda: f"hotplugged DIMM not brought to policy: {backends(P + 'hp')}\n"
                 f"{d.text()[-3000:]}")
        print(f"memdimm0 unmergeable {time.monotonic() - t0:.2f} s after attach")
        targets = [r["target"] for r in audit_lines(daemon_dir / "audit.jsonl")]
        assert f"{P}hp/memdimm0" in targets
    finally:
        d.kill(signal.SIGTERM)


def _libvirtd_pid() -> int | None:
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _libvirtd_up() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                          capture_output=True, timeout=20).returncode == 0


def test_zz_libvirtd_restart_reconnects(domains: Any, daemon_dir: Path) -> None:
    """Last in the module: libvirtd goes away for a moment."""
    if shutil.which("libvirtd") is None:
        pytest.skip("no libvirtd")
    cfg = write_config(daemon_dir, {f"{P}rc": "off"})
    d = DaemonProc(cfg, daemon_dir / "daemon.log", domains=MINE)
    try:
        d.wait_log("running: qemu:///system")
        pid = _libvirtd_pid()
        assert pid is not None, "libvirtd is not running"
        mark = len(d.text())
        os.kill(pid, signal.SIGTERM)
        d.wait_log("reconnecting", 20, after=mark)
        wait_for(lambda: _libvirtd_pid() is None, 20, "libvirtd did not stop")
        subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
        wait_for(_libvirtd_up, 30, "libvirtd did not come back")
        domains(f"{P}rc")
        d.wait_log("reconnected to qemu:///system", 30, after=mark)
        wait_for(lambda: all_merge(f"{P}rc", False), 20,
                 lambda: f"VM started around the restart not handled:\n{d.text()[-3000:]}")
        assert d.proc.poll() is None
    finally:
        d.kill(signal.SIGTERM)
        if _libvirtd_pid() is None:
            subprocess.run(["libvirtd", "-d"], timeout=30)
        wait_for(_libvirtd_up, 30, "libvirtd is not running after the test")
