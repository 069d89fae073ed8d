"""LibvirtHypervisor on libvirt's test:///default driver (no libvirtd needed).

test:///default is private to each connection: every test gets a fresh
host with the built-in running domain "test" (id 1).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from vmshare.errors import (
    AccessDenied,
    DeadlineExceeded,
    DomainNotFound,
    DomainNotRunning,
    HypervisorError,
    MonitorError,
    ProcessGone,
)
from vmshare.hypervisor import connect
from vmshare.hypervisor.libvirt import LibvirtHypervisor, map_libvirt_error
from vmshare.model import VmRef

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"

GUARDED_XML = """<domain type='test'>
  <name>guarded</name>
  <uuid>0e5c1b5e-1f1b-4a1a-8e7c-0123456789ab</uuid>
  <memory unit='MiB'>256</memory>
  <memoryBacking><nosharepages/></memoryBacking>
  <launchSecurity type='sev'>
    <cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits><policy>0x0003</policy>
  </launchSecurity>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""

PLAIN_XML = """<domain type='test'>
  <name>alpha</name>
  <memory unit='KiB'>131072</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"""


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[LibvirtHypervisor]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    h = LibvirtHypervisor("test:///default", deadline=5.0, run_dir=str(run_dir))
    try:
        yield h
    finally:
        h.close()


def raw_conn(h: LibvirtHypervisor) -> Any:
    return h._conn   # the same private test:///default host


def test_connect_factory_and_bad_uri() -> None:
    h = connect("test:///default", None, 5.0)
    assert isinstance(h, LibvirtHypervisor) and h.uri == "test:///default"
    h.close()
    with pytest.raises(HypervisorError, match="nosuchdriver:///x"):
        LibvirtHypervisor("nosuchdriver:///x", deadline=5.0)


def test_lookup_by_name_uuid_id(hv: LibvirtHypervisor) -> None:
    by_name = hv.lookup("test")
    assert by_name == VmRef(name="test", uuid=TEST_UUID, domain_id=1, running=True)
    assert hv.lookup(TEST_UUID) == by_name
    assert hv.lookup(TEST_UUID.upper().replace("-", "")) == by_name
    assert hv.lookup("1") == by_name


def test_lookup_unknown(hv: LibvirtHypervisor) -> None:
    for ident in ("nope", "42", "00000000-0000-0000-0000-00000000abcd"):
        with pytest.raises(DomainNotFound, match="test:///default"):
            hv.lookup(ident)


def test_name_wins_over_id(hv: LibvirtHypervisor) -> None:
    # A domain literally named "1" must be found by name, not as id 1 ("test").
    raw_conn(hv).defineXML(PLAIN_XML.replace("alpha", "1"))
    ref = hv.lookup("1")
    assert ref.name == "1" and not ref.running and ref.domain_id is None


def test_list_vms_sorted_with_state(hv: LibvirtHypervisor) -> None:
    raw_conn(hv).defineXML(PLAIN_XML)
    raw_conn(hv).defineXML(GUARDED_XML)
    refs = hv.list_vms()
    assert [r.name for r in refs] == ["alpha", "guarded", "test"]
    assert [r.running for r in refs] == [False, False, True]
    assert refs[2].domain_id == 1


def test_facts_of_stopped_domain_from_xml(hv: LibvirtHypervisor) -> None:
    raw_conn(hv).defineXML(GUARDED_XML)
    facts = hv.facts(hv.lookup("guarded"))
    assert facts.pid is None
    assert facts.nosharepages and facts.launch_security
    assert facts.memory_bytes == 256 << 20
    assert facts.ineligible_reason is not None and "nosharepages" in facts.ineligible_reason

    raw_conn(hv).defineXML(PLAIN_XML)
    plain = hv.facts(hv.lookup("alpha"))
    assert not plain.nosharepages and not plain.launch_security
    assert plain.memory_bytes == 128 << 20 and plain.ineligible_reason is None


def _start_fake_qemu(argv_tail: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             *argv_tail])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            if argv_tail[-1].encode() in f.read():
                return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("child never exec'd")


@pytest.fixture
def fake_qemu() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_facts_pid_verified_by_name_or_uuid(
        hv: LibvirtHypervisor, fake_qemu: list[subprocess.Popen[bytes]]) -> None:
    by_name = _start_fake_qemu(["-name", "guest=test,debug-threads=on"])
    fake_qemu.append(by_name)
    Path(hv.run_dir, "test.pid").write_text(f"{by_name.pid}\n")
    assert hv.facts(hv.lookup("test")).pid == by_name.pid

    by_uuid = _start_fake_qemu(["-uuid", TEST_UUID])
    fake_qemu.append(by_uuid)
    Path(hv.run_dir, "test.pid").write_text(f"{by_uuid.pid}")
    assert hv.facts(hv.lookup("test")).pid == by_uuid.pid


def test_facts_reused_pid_is_not_attributed(
        hv: LibvirtHypervisor, fake_qemu: list[subprocess.Popen[bytes]]) -> None:
    other = _start_fake_qemu(["-name", "guest=someone-else"])
    fake_qemu.append(other)
    Path(hv.run_dir, "test.pid").write_text(str(other.pid))
    with pytest.raises(ProcessGone, match="test"):
        hv.facts(hv.lookup("test"))


def test_facts_dead_pid_and_missing_pid_file(
        hv: LibvirtHypervisor, fake_qemu: list[subprocess.Popen[bytes]]) -> None:
    with pytest.raises(DomainNotRunning, match="pid file"):
        hv.facts(hv.lookup("test"))
    dead = _start_fake_qemu(["-name", "guest=test"])
    dead.kill()
    dead.wait()
    Path(hv.run_dir, "test.pid").write_text(str(dead.pid))
    with pytest.raises(ProcessGone):
        hv.facts(hv.lookup("test"))
    Path(hv.run_dir, "test.pid").write_text("garbage")
    with pytest.raises(HypervisorError, match="bad pid file"):
        hv.facts(hv.lookup("test"))


def test_facts_of_undefined_domain(hv: LibvirtHypervisor) -> None:
    raw_conn(hv).defineXML(PLAIN_XML)
    ref = hv.lookup("alpha")
    raw_conn(hv).lookupByName("alpha").undefine()
    with pytest.raises(DomainNotFound):
        hv.facts(ref)


def test_qmp_unsupported_by_test_driver_is_mapped(hv: LibvirtHypervisor) -> None:
    ref = hv.lookup("test")
    with pytest.raises(HypervisorError, match="query-memdev on domain test") as info:
        hv.ram_backends(ref)
    assert "not supported" in str(info.value)
    assert isinstance(info.value.__cause__, libvirt.libvirtError)
    with pytest.raises(HypervisorError, match="qom-set on domain test"):
        hv.set_merge(ref, "pc.ram", False)


def test_qmp_on_stopped_domain(hv: LibvirtHypervisor) -> None:
    raw_conn(hv).defineXML(PLAIN_XML)
    # The test driver answers "not supported" before checking the state; the
    # real qemu driver says "domain is not running" (VIR_ERR_OPERATION_INVALID).
    err = libvirt.libvirtError("x")
    err.err = (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU,
               "Requested operation is not valid: domain is not running",
               libvirt.VIR_ERR_ERROR, "", None, None, 0, 0)
    mapped = map_libvirt_error(err, "QMP query-memdev on domain alpha")
    assert isinstance(mapped, DomainNotRunning)


@pytest.mark.parametrize(("code", "message", "cls"), [
    ("VIR_ERR_NO_DOMAIN", "Domain not found", DomainNotFound),
    ("VIR_ERR_ACCESS_DENIED", "access denied", AccessDenied),
    ("VIR_ERR_AUTH_FAILED", "authentication failed", AccessDenied),
    ("VIR_ERR_SYSTEM_ERROR", "Failed to connect socket: Permission denied", AccessDenied),
    ("VIR_ERR_OPERATION_TIMEOUT", "timed out", DeadlineExceeded),
    ("VIR_ERR_OPERATION_INVALID", "domain is already running", HypervisorError),
])
def test_error_mapping(code: str, message: str, cls: type[Exception]) -> None:
    err = libvirt.libvirtError(message)
    err.err = (getattr(libvirt, code), 0, message, 2, "", None, None, 0, 0)
    mapped = map_libvirt_error(err, "doing X")
    assert type(mapped) is cls
    assert str(mapped).startswith("doing X")


class _FakeDom:
    def name(self) -> str:
        return "vm1"


def _monitor_replies(monkeypatch: pytest.MonkeyPatch, hv: LibvirtHypervisor,
                     replies: dict[str, Any]) -> list[dict[str, Any]]:
    """Route qemuMonitorCommand to recorded QEMU replies (the test driver has none)."""
    sent: list[dict[str, Any]] = []

    def monitor(dom: Any, text: str, flags: int) -> str:
        msg = json.loads(text)
        sent.append(msg)
        reply = replies[msg["execute"]]
        if callable(reply):
            reply = reply(msg.get("arguments"))
        if isinstance(reply, threading.Event):
            reply.wait(30)
        return reply if isinstance(reply, str) else json.dumps(reply)

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", monitor)
    monkeypatch.setattr(hv, "_domain", lambda vm: _FakeDom())
    return sent


def test_ram_backends_through_monitor(monkeypatch: pytest.MonkeyPatch,
                                      hv: LibvirtHypervisor, tmp_path: Path) -> None:
    from tests.test_hypervisor_common import MEMDEV_REPLY, QOM_LIST_REPLY
    mounts = tmp_path / "mounts"
    mounts.write_text("hugetlbfs /tmp/qt/hp hugetlbfs rw 0 0\n")
    hv.mounts_path = str(mounts)
    sent = _monitor_replies(monkeypatch, hv, {
        "query-memdev": {"return": MEMDEV_REPLY},
        "qom-list": {"return": QOM_LIST_REPLY},
        "qom-get": lambda a: {"return": "/tmp/qt/hp" if a["property"] == "mem-path"
                              else False},
    })
    backends = {b.id: b for b in hv.ram_backends(VmRef("vm1", ""))}
    assert backends["f1"].hugetlb and backends["f1"].mem_path == "/tmp/qt/hp"
    assert backends["r2"].ineligible_reason is None and not backends["r2"].merge
    assert [m["execute"] for m in sent] == ["query-memdev", "qom-list", "qom-get", "qom-get"]


def test_monitor_error_keeps_command_and_response(monkeypatch: pytest.MonkeyPatch,
                                                  hv: LibvirtHypervisor) -> None:
    error = {"error": {"class": "DeviceNotFound",
                       "desc": "Device '/objects/nope' not found"}}
    _monitor_replies(monkeypatch, hv, {"qom-set": error})
    with pytest.raises(MonitorError, match="DeviceNotFound") as info:
        hv.set_merge(VmRef("vm1", ""), "nope", False)
    assert info.value.command == "qom-set"
    assert info.value.arguments == {"path": "/objects/nope", "property": "merge",
                                    "value": False}
    assert info.value.response == error


def test_monitor_garbage_reply(monkeypatch: pytest.MonkeyPatch,
                               hv: LibvirtHypervisor) -> None:
    _monitor_replies(monkeypatch, hv, {"query-memdev": "not json{"})
    with pytest.raises(MonitorError, match="unparsable"):
        hv.qmp(VmRef("vm1", ""), "query-memdev")


def test_monitor_deadline(monkeypatch: pytest.MonkeyPatch, hv: LibvirtHypervisor) -> None:
    never = threading.Event()
    _monitor_replies(monkeypatch, hv, {"query-memdev": never})
    hv.deadline = 0.5
    start = time.monotonic()
    try:
        with pytest.raises(DeadlineExceeded, match="query-memdev on domain vm1"):
            hv.qmp(VmRef("vm1", ""), "query-memdev")
    finally:
        never.set()
    assert time.monotonic() - start < 1.5


def test_keepalive_unsupported_on_test_driver(hv: LibvirtHypervisor) -> None:
    assert hv.enable_keepalive() is False


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_libvirt_module_imports_libvirt() -> None:
    root = Path(__file__).resolve().parent.parent / "vmshare"
    offenders = sorted(
        os.path.relpath(path, root) for path in root.rglob("*.py")
        if path not in (root / "hypervisor" / "libvirt.py",
                        root / "hypervisor" / "libvirt_events.py")
        and any(m.split(".")[0] in ("libvirt", "libvirt_qemu")
                for m in imported_modules(path)))
    assert offenders == []


@pytest.mark.parametrize("command,arguments,api", [
    ("dump-guest-memory", {"paging": False, "protocol": "file:/tmp/x"},
     "virDomainCoreDumpWithFormat"),
    ("migrate", {"uri": "unix:/tmp/m"}, "virDomainMigrateToURI3"),
    ("blockdev-backup", {"device": "d", "target": "t", "sync": "full"},
     "virDomainBackupBegin"),
    ("human-monitor-command", {"command-line": "savevm snap1"},
     "virDomainSnapshotCreateXML"),
])
def test_qmp_refuses_jobs_libvirt_must_own(monkeypatch: pytest.MonkeyPatch,
                                           hv: LibvirtHypervisor, command: str,
                                           arguments: dict[str, Any], api: str) -> None:
    """libvirtd 9.0 segfaults on dump-guest-memory through qemuMonitorCommand: such
    commands never reach libvirt, and the error names the API to use instead."""
    sent: list[str] = []

    def monitor_command(dom: object, text: str, flags: int) -> str:
        sent.append(text)
        return '{"return": {}}'

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", monitor_command)
    with pytest.raises(MonitorError, match=api) as info:
        hv.qmp(VmRef("test", TEST_UUID), command, arguments)
    assert info.value.command == command and sent == []
    # Harmless commands (and HMP info commands) still go through.
    assert hv.qmp(VmRef("test", TEST_UUID), "query-status") == {}
    assert hv.qmp(VmRef("test", TEST_UUID), "human-monitor-command",
                  {"command-line": "info status"}) == {}
    assert len(sent) == 2
