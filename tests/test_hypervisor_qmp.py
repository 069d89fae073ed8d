"""QmpHypervisor against the scripted fake QMP server (tests/fakes/qmp_server.py)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.qmp_server import EOF, HANG, FakeQmpServer, QmpErr
from tests.test_hypervisor_common import MEMDEV_REPLY, QOM_LIST_REPLY
from vmshare.errors import (
    DeadlineExceeded,
    DomainNotFound,
    HypervisorError,
    MonitorError,
    ProcessGone,
)
from vmshare.hypervisor import connect
from vmshare.hypervisor.qmp import QmpHypervisor
from vmshare.model import VmRef

UUID = "11111111-2222-3333-4444-555555555555"
BASE: dict[str, Any] = {
    "query-name": {"name": "two"},
    "query-uuid": {"UUID": UUID},
    "query-memdev": MEMDEV_REPLY,
    "qom-list": QOM_LIST_REPLY,
    "qom-get": lambda a: "/tmp/qt/hp" if a["property"] == "mem-path" else False,
    "qom-set": {},
    "query-memory-size-summary": {"base-memory": 64 << 20, "plugged-memory": 0},
}
VM = VmRef(name="two", uuid=UUID, running=True)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short path: unix socket paths are limited to 107 bytes.
    path = tempfile.mkdtemp(prefix="vq", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve(sock_dir: str, **replies: Any) -> FakeQmpServer:
    script = dict(BASE)
    script.update({k.replace("_", "-"): v for k, v in replies.items()})
    return FakeQmpServer(os.path.join(sock_dir, "vm.qmp"), script)


def test_identify_list_lookup(sock_dir: str) -> None:
    with serve(sock_dir) as srv:
        hv = connect(None, srv.path, 5.0)
        assert isinstance(hv, QmpHypervisor)
        assert hv.list_vms() == [VM]
        assert hv.lookup("two") == VM
        assert hv.lookup(UUID.upper()) == VM
        assert hv.lookup(srv.path) == VM
        with pytest.raises(DomainNotFound, match="runs 'two'"):
            hv.lookup("three")
        assert srv.connections == 5   # one short session per sync call


def test_name_falls_back_to_socket_stem(sock_dir: str) -> None:
    zero = "00000000-0000-0000-0000-000000000000"
    with serve(sock_dir, query_name={}, query_uuid={"UUID": zero}) as srv:
        hv = QmpHypervisor(srv.path, 5.0)
        [ref] = hv.list_vms()
        assert ref.name == "vm" and ref.uuid == zero
        with pytest.raises(DomainNotFound):
            hv.lookup(zero)   # the all-zero "no uuid" never identifies a VM


def test_ram_backends(sock_dir: str, tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("hugetlbfs /tmp/qt/hp hugetlbfs rw 0 0\n")
    with serve(sock_dir) as srv:
        hv = QmpHypervisor(srv.path, 5.0, mounts_path=str(mounts))
        backends = {b.id: b for b in hv.ram_backends(VM)}
        assert sorted(backends) == ["f1", "mem0", "r2"]
        assert backends["f1"].hugetlb and backends["f1"].ineligible_reason
        assert backends["mem0"].qom_type == "memory-backend-memfd"
        assert backends["r2"].ineligible_reason is None
        assert ("qom-get", {"path": "/objects/mem0", "property": "hugetlb"}) in srv.received


def test_wrong_vm_is_refused(sock_dir: str) -> None:
    with serve(sock_dir) as srv:
        hv = QmpHypervisor(srv.path, 5.0)
        with pytest.raises(DomainNotFound):
            hv.set_merge(VmRef(name="other", uuid="x"), "r2", True)
        assert not any(cmd == "qom-set" for cmd, _ in srv.received)


def test_set_merge_and_monitor_error(sock_dir: str) -> None:
    def qom_set(args: dict[str, Any]) -> Any:
        if args["path"] != "/objects/r2":
            return QmpErr("DeviceNotFound", f"Device '{args['path']}' not found")
        return {}

    with serve(sock_dir, qom_set=qom_set) as srv:
        hv = QmpHypervisor(srv.path, 5.0)
        hv.set_merge(VM, "r2", True)
        assert srv.received[-1] == ("qom-set", {"path": "/objects/r2", "property": "merge",
                                                "value": True})
        with pytest.raises(MonitorError, match="DeviceNotFound: Device '/objects/nope'") as e:
            hv.set_merge(VM, "nope", False)
        assert e.value.command == "qom-set"
        assert e.value.arguments == {"path": "/objects/nope", "property": "merge",
                                     "value": False}
        assert isinstance(e.value.response, dict)
        assert e.value.response["error"]["class"] == "DeviceNotFound"


def test_unknown_command(sock_dir: str) -> None:
    with serve(sock_dir) as srv, pytest.raises(MonitorError, match="CommandNotFound"):
        QmpHypervisor(srv.path, 5.0).qmp(VM, "no-such-command")


def test_deadline_on_hung_command(sock_dir: str) -> None:
    with serve(sock_dir, query_memdev=HANG) as srv:
        hv = QmpHypervisor(srv.path, deadline=1.0)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"query-memdev at .*vm\.qmp"):
            hv.ram_backends(VM)
        assert time.monotonic() - start < 1.0 + 1.0


def test_deadline_without_greeting(sock_dir: str) -> None:
    srv = FakeQmpServer(os.path.join(sock_dir, "vm.qmp"), BASE, greet=False)
    with srv:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="greeting"):
            QmpHypervisor(srv.path, deadline=1.0).list_vms()
        assert time.monotonic() - start < 2.0


def test_eof_mid_session(sock_dir: str) -> None:
    with serve(sock_dir, qom_list=EOF) as srv:
        with pytest.raises(HypervisorError, match=r"QEMU monitor at .*vm.qmp closed") as e:
            QmpHypervisor(srv.path, 5.0).ram_backends(VM)
        assert not isinstance(e.value, DeadlineExceeded | MonitorError)


def test_no_socket(sock_dir: str) -> None:
    with pytest.raises(HypervisorError, match="no QEMU monitor at"):
        QmpHypervisor(os.path.join(sock_dir, "missing.qmp"), 5.0).list_vms()


@pytest.fixture
def fake_qemu_process(sock_dir: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The fake server as its own process (its argv names the socket, like QEMU's)."""
    path = os.path.join(sock_dir, "vm.qmp")
    script = {k: v for k, v in BASE.items() if not callable(v)}
    script["qom-list"] = [*QOM_LIST_REPLY, {"name": "sev0", "type": "child<sev-guest>"}]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.qmp_server",
                             "-qmp", f"unix:{path},server=on,wait=off",
                             json.dumps(script)], cwd=root)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline and proc.poll() is None, "fake did not start"
            time.sleep(0.02)
        yield proc, path
    finally:
        proc.kill()
        proc.wait()


def test_facts_pid_from_peer_credentials(
        fake_qemu_process: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, path = fake_qemu_process
    facts = QmpHypervisor(path, 5.0).facts(VM)
    assert facts.pid == proc.pid
    assert facts.memory_bytes == 64 << 20
    assert facts.launch_security
    assert facts.ref == VM


def test_facts_refuses_reused_pid(fake_qemu_process: tuple[subprocess.Popen[bytes], str],
                                  tmp_path: Path) -> None:
    proc, path = fake_qemu_process
    # A /proc where the peer's pid now runs something else.
    fake_proc = tmp_path / "proc" / str(proc.pid)
    fake_proc.mkdir(parents=True)
    (fake_proc / "cmdline").write_bytes(b"/usr/bin/bash\0-c\0sleep 1\0")
    with pytest.raises(ProcessGone, match=f"pid {proc.pid}"):
        QmpHypervisor(path, 5.0, proc_root=str(tmp_path / "proc")).facts(VM)


def test_async_execute_and_events(sock_dir: str) -> None:
    with serve(sock_dir) as srv:
        hv = QmpHypervisor(srv.path, 5.0)

        async def scenario() -> list[dict[str, Any]]:
            async with hv:
                assert (await hv.execute("query-name"))["name"] == "two"
                assert hv.peer_pid == os.getpid()   # the in-process fake
                seen: list[dict[str, Any]] = []
                stream = hv.events()
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, srv.send_event, "RESET", {"guest": True})
                seen.append(await asyncio.wait_for(anext(stream), 5))
                await loop.run_in_executor(None, srv.send_event, "STOP", None)
                seen.append(await asyncio.wait_for(anext(stream), 5))
                await loop.run_in_executor(None, srv.hang_up)
                with pytest.raises(HypervisorError, match="closed"):
                    await asyncio.wait_for(anext(stream), 5)
                return seen

        events = asyncio.run(scenario())
        assert [e["event"] for e in events] == ["RESET", "STOP"]
        assert events[0]["data"] == {"guest": True}


def test_sync_call_inside_event_loop_is_refused(sock_dir: str) -> None:
    with serve(sock_dir) as srv:
        async def inside() -> None:
            QmpHypervisor(srv.path, 5.0).list_vms()

        with pytest.raises(HypervisorError, match="async API"):
            asyncio.run(inside())


def test_only_qmp_module_imports_qemu_qmp() -> None:
    root = Path(__file__).resolve().parent.parent / "vmshare"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "qemu" or n.startswith("qemu.") for n in names) \
                    and path != root / "hypervisor" / "qmp.py":
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
