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
import socket
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
REGRESSION = Path(__file__).resolve().parent.parent / "tests" / "data" / "bad_inputs"


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


def _poison_items(kind: int, i: int, spool_dir: Path) -> None:
    """Spool entry number ``i`` of poison ``kind``: every shape the fuzzer and the
    issue found, plus files that are not regular files or not ours."""
    name = spool_dir / f"{i:019d}-1-{i:016x}.json"
    kept = sorted((REGRESSION / "spool").iterdir())   # datagram cases can be valid entries
    extra = ["binary", "empty", "huge", "symlink", "fifo", "dir", "foreign"]
    choice = (kept + extra)[kind % (len(kept) + len(extra))]
    if isinstance(choice, Path):
        name.write_bytes(choice.read_bytes())
    elif choice == "binary":
        name.write_bytes(os.urandom(64))
    elif choice == "empty":
        name.write_bytes(b"")
    elif choice == "huge":
        name.write_bytes(b" " * (2 << 20))
    elif choice == "symlink":
        name.symlink_to("/etc/shadow")
    elif choice == "fifo":
        os.mkfifo(name)
    elif choice == "dir":
        name.mkdir()
    else:
        name.write_text(json.dumps({"v": 1, "domain": "forged", "uuid": None,
                                    "operation": "stopped", "sub_operation": "end",
                                    "extra": "-", "time": 1.0, "seq": i}))
        os.chown(name, 4242, 4242)


def _poison_datagrams(sock_path: Path, count: int) -> int:
    kept = [p.read_bytes() for d in ("spool", "datagram")
            for p in sorted((REGRESSION / d).iterdir()) if p.stat().st_size < 60_000]
    kept += [b"", b"\xff" * 100, b"[]", b'{"v": 1}', b"x" * 70_000]
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    sent = 0
    try:
        for i in range(count):
            deadline = time.monotonic() + 10
            while True:
                try:
                    sender.sendto(kept[i % len(kept)], str(sock_path))
                    sent += 1
                    break
                except BlockingIOError:   # the daemon's queue is full: it is draining
                    assert time.monotonic() < deadline, "the daemon stopped reading"
                    time.sleep(0.001)
    finally:
        sender.close()
    return sent


def test_a_long_run_of_poison_never_stops_the_daemon(domains: Any, daemon_dir: Path) -> None:
    """Issue 12: thousands of malformed spool entries, datagrams and audit lines in a
    row, then a VM started: the daemon still applies its policy, then survives a
    corrupt state file at restart (kept as a copy)."""
    cfg = write_config(daemon_dir, {f"{P}psn": "off"})
    d = DaemonProc(cfg, daemon_dir / "daemon.log", domains=MINE)
    spool_dir, sock_path = daemon_dir / "spool", daemon_dir / "run" / "wake.sock"
    entries, datagrams, audit_poison = 10_000, 10_000, 1000
    try:
        d.wait_log("running: qemu:///system")
        with open(daemon_dir / "audit.jsonl", "ab") as f:   # the daemon reads it for ids
            for i in range(audit_poison):
                f.write([b"[" * 100_000, b'{"time": NaN}', b'{"pid": ' + b"9" * 5000 + b"}",
                         b'{"time": 1, "before": 1, "after": 2, "actor": 5}'][i % 4] + b"\n")
        for i in range(entries):
            _poison_items(i, i, spool_dir)
        sent = _poison_datagrams(sock_path, datagrams)
        assert sent == datagrams
        started = time.monotonic()
        wait_for(lambda: not [p for p in spool_dir.iterdir() if p.name.endswith(".json")],
                 60, lambda: f"poison left in the spool\n{d.text()[-3000:]}")
        assert d.proc.poll() is None, d.text()[-3000:]
        # then a real event, through the spool and libvirt, for a policy-off VM
        # written and renamed into place as the hook does: a half-written entry
        # read by the draining daemon would be refused as poison
        entry, temp = (spool_dir / f"{time.time_ns()}-1-{'f' * 16}.json",
                       spool_dir / f".tmp-1-{'f' * 16}")
        temp.write_text(json.dumps(
            {"v": 1, "domain": f"{P}psn", "uuid": None, "operation": "started",
             "sub_operation": "begin", "extra": "-", "time": time.time(),
             "seq": time.monotonic_ns(), "boot_id": "", "pid": 1, "xml": "unparsed"}))
        temp.rename(entry)
        domains(f"{P}psn")
        wait_for(lambda: all_merge(f"{P}psn", False), 30,
                 lambda: f"policy not applied after the poison: {backends(P + 'psn')}\n"
                 f"{d.text()[-3000:]}")
        print(f"{entries} spool entries, {sent} datagrams and {audit_poison} audit lines of "
              f"poison in a row; policy applied {time.monotonic() - started:.1f} s after")
        d.wait_log(f"hook {P}psn started/begin", 20)
        mark = len(d.text())
        d.wait_log("(periodic)", 15, after=mark)        # still reconciling on its own
        text = d.text()
        refused = [line for line in text.splitlines() if " refused " in line]
        assert len(refused) <= 40, f"{len(refused)} warning lines for {entries + sent} items"
        # (--debug shows tracebacks of expected failures at DEBUG: count ERRORs instead)
        assert " ERROR " not in text and "internal error" not in text, text[-4000:]
        assert len(list((spool_dir / "bad").iterdir())) == 1000        # the cap
        mine = [json.loads(line) for line in (daemon_dir / "audit.jsonl").read_text()
                .splitlines() if line.startswith('{"action"')]
        assert [(r["vm"], r["after"]) for r in mine] == [(f"{P}psn", False)]
    finally:
        d.kill(signal.SIGTERM)
    assert d.proc.returncode == 0, d.text()[-2000:]
    state = daemon_dir / "state.json"
    state.write_bytes(b'{"version": 1, "vms": {"x": {"ksm_pages": ' + b"9" * 5000 + b"}}}")
    d2 = DaemonProc(cfg, daemon_dir / "daemon2.log", domains=MINE)
    try:
        d2.wait_log("reconciled", 30)
        assert "kept it as" in d2.text()
        assert len(list(daemon_dir.glob("state.json.corrupt-*"))) == 1
        assert all_merge(f"{P}psn", False)
    finally:
        d2.kill(signal.SIGTERM)
    assert d2.proc.returncode == 0


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
