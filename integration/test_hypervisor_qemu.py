"""QmpHypervisor against a real, paused QEMU (TCG, no guest needed).

Checks what the unit tests can only script: QEMU 7.2's real replies, the
peer pid, and that ``qom-set merge`` really toggles MADV_MERGEABLE (the
``mg`` VmFlag) on the RAM mapping in /proc/<pid>/smaps.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fakes.qmp_server import HANG, FakeQmpServer
from vmshare.errors import DeadlineExceeded
from vmshare.hypervisor.qmp import QmpHypervisor

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")
MiB = 1 << 20


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vqemu", dir="/tmp")   # short: sun_path limit
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


StartQemu = Callable[..., tuple[subprocess.Popen[bytes], str]]


@pytest.fixture
def start_qemu(workdir: str) -> Iterator[StartQemu]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *extra: str, memory: str = "128") -> tuple[subprocess.Popen[bytes], str]:
        assert QEMU is not None
        sock = os.path.join(workdir, f"{name}.qmp")
        proc = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
             "-name", f"guest={name}", "-m", memory,
             "-qmp", f"unix:{sock},server=on,wait=off", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"QEMU exited {proc.returncode}: {err}")
            assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
            time.sleep(0.05)
        return proc, sock

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


def mapping_flags(pid: int, size: int) -> list[set[str]]:
    """VmFlags of each private anonymous mapping of exactly ``size`` bytes."""
    found: list[set[str]] = []
    header: re.Match[str] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(.*)$", line)
            if m:
                header = m
            elif line.startswith("VmFlags:") and header is not None:
                start, end = int(header[1], 16), int(header[2], 16)
                anon_private = header[4] == "0" and header[5] == "" and header[3][3] == "p"
                if anon_private and end - start == size:
                    found.append(set(line.split()[1:]))
    return found


def test_default_ram_backend_merge_toggle(start_qemu: StartQemu) -> None:
    proc, sock = start_qemu("ig1", "-machine", "pc")
    hv = QmpHypervisor(sock, deadline=10.0)
    [vm] = hv.list_vms()
    assert vm.name == "ig1"
    assert hv.facts(vm).pid == proc.pid

    [ram] = hv.ram_backends(vm)
    assert (ram.qom_type, ram.size, ram.merge) == ("memory-backend-ram", 128 * MiB, True)
    assert ram.ineligible_reason is None
    [flags] = mapping_flags(proc.pid, ram.size)
    assert "mg" in flags

    hv.set_merge(vm, ram.id, False)
    assert [b.merge for b in hv.ram_backends(vm)] == [False]
    [flags] = mapping_flags(proc.pid, ram.size)
    assert "mg" not in flags

    hv.set_merge(vm, ram.id, True)
    assert [b.merge for b in hv.ram_backends(vm)] == [True]
    [flags] = mapping_flags(proc.pid, ram.size)
    assert "mg" in flags


def test_memfd_backend_is_not_eligible(start_qemu: StartQemu) -> None:
    proc, sock = start_qemu("ig2", "-machine", "pc,memory-backend=mem0",
                            "-object", "memory-backend-memfd,id=mem0,size=64M",
                            memory="64")
    hv = QmpHypervisor(sock, deadline=10.0)
    [vm] = hv.list_vms()
    [mem] = hv.ram_backends(vm)
    assert (mem.id, mem.qom_type, mem.size) == ("mem0", "memory-backend-memfd", 64 * MiB)
    assert mem.share and not mem.hugetlb
    assert mem.ineligible_reason is not None and "memfd" in mem.ineligible_reason
    assert hv.facts(vm).pid == proc.pid


def test_silent_monitor_hits_deadline(workdir: str) -> None:
    with FakeQmpServer(os.path.join(workdir, "hung.qmp"),
                       {"query-name": HANG}) as srv:
        hv = QmpHypervisor(srv.path, deadline=2.0)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            hv.list_vms()
        assert time.monotonic() - start < 2.0 + 1.0
