"""Parsing of recorded QMP replies and domain XML (vmshare.hypervisor.common)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmshare.errors import HypervisorError, ProcessGone
from vmshare.hypervisor.common import (
    Mount,
    backend_types,
    build_ram_backends,
    cmdline_matches_vm,
    followup_queries,
    fstype_of,
    merge_set_call,
    parse_domain_xml,
    parse_mounts,
    verify_pid,
)

# Recorded from qemu-system-x86_64 7.2 (Debian 1:7.2+dfsg-7+deb12u18) with
#   -machine pc,memory-backend=mem0 -object memory-backend-memfd,id=mem0,size=64M
#   -object memory-backend-file,id=f1,size=16M,mem-path=/tmp/qt/hp,share=on
#   -object memory-backend-ram,id=r2,size=8M,merge=off
MEMDEV_REPLY: list[dict[str, Any]] = [
    {"share": True, "reserve": True, "prealloc": False, "host-nodes": [], "size": 16777216,
     "merge": True, "dump": True, "policy": "default", "id": "f1"},
    {"share": False, "reserve": True, "prealloc": False, "host-nodes": [], "size": 8388608,
     "merge": False, "dump": True, "policy": "default", "id": "r2"},
    {"share": True, "reserve": True, "prealloc": False, "host-nodes": [], "size": 67108864,
     "merge": True, "dump": True, "policy": "default", "id": "mem0"},
]
QOM_LIST_REPLY: list[dict[str, Any]] = [
    {"name": "type", "type": "string"},
    {"name": "f1", "type": "child<memory-backend-file>"},
    {"name": "r2", "type": "child<memory-backend-ram>"},
    {"name": "mem0", "type": "child<memory-backend-memfd>"},
    {"name": "iothread0", "type": "child<iothread>"},
]
# The default `-machine pc -m 128` RAM.
PC_RAM_MEMDEV = [{"share": False, "reserve": True, "prealloc": False, "host-nodes": [],
                  "size": 134217728, "merge": True, "dump": True, "policy": "default",
                  "id": "pc.ram"}]
PC_RAM_QOM = [{"name": "type", "type": "string"},
              {"name": "pc.ram", "type": "child<memory-backend-ram>"}]

MOUNTS = parse_mounts(
    "proc /proc proc rw 0 0\n"
    "tmpfs /tmp tmpfs rw 0 0\n"
    "hugetlbfs /dev/hugepages hugetlbfs rw,pagesize=2M 0 0\n"
    "hugetlbfs /tmp/qt/hp hugetlbfs rw,pagesize=1024M 0 0\n"
    "/dev/sda1 / ext4 rw 0 0\n")


def test_backend_types_keeps_only_memory_backends() -> None:
    assert backend_types(QOM_LIST_REPLY) == {
        "f1": "memory-backend-file", "r2": "memory-backend-ram",
        "mem0": "memory-backend-memfd"}


def test_followup_queries_ask_file_path_and_memfd_hugetlb() -> None:
    types = backend_types(QOM_LIST_REPLY)
    assert followup_queries(MEMDEV_REPLY, types) == {
        ("f1", "mem-path"): ("qom-get", {"path": "/objects/f1", "property": "mem-path"}),
        ("mem0", "hugetlb"): ("qom-get", {"path": "/objects/mem0", "property": "hugetlb"}),
    }
    assert followup_queries(PC_RAM_MEMDEV, backend_types(PC_RAM_QOM)) == {}


def test_build_default_pc_ram_is_eligible() -> None:
    [ram] = build_ram_backends(PC_RAM_MEMDEV, backend_types(PC_RAM_QOM), {}, [])
    assert (ram.id, ram.size, ram.merge, ram.qom_type) == (
        "pc.ram", 128 << 20, True, "memory-backend-ram")
    assert ram.qom_path == "/objects/pc.ram"
    assert ram.ineligible_reason is None


def test_build_joins_types_and_properties() -> None:
    props = {("f1", "mem-path"): "/tmp/qt/hp", ("mem0", "hugetlb"): False}
    backends = {b.id: b for b in build_ram_backends(
        MEMDEV_REPLY, backend_types(QOM_LIST_REPLY), props, MOUNTS)}
    assert sorted(backends) == ["f1", "mem0", "r2"]
    f1, r2, mem0 = backends["f1"], backends["r2"], backends["mem0"]
    assert (f1.qom_type, f1.mem_path, f1.hugetlb, f1.share) == (
        "memory-backend-file", "/tmp/qt/hp", True, True)
    assert f1.ineligible_reason is not None and "hugetlb" in f1.ineligible_reason
    assert (r2.merge, r2.size, r2.ineligible_reason) == (False, 8 << 20, None)
    assert mem0.qom_type == "memory-backend-memfd" and not mem0.hugetlb
    assert mem0.ineligible_reason is not None and "memfd" in mem0.ineligible_reason


def test_build_file_backend_on_tmpfs_is_file_not_hugetlb() -> None:
    props = {("f1", "mem-path"): "/tmp/other/f1.img", ("mem0", "hugetlb"): True}
    backends = {b.id: b for b in build_ram_backends(
        MEMDEV_REPLY, backend_types(QOM_LIST_REPLY), props, MOUNTS)}
    assert backends["f1"].hugetlb is False
    assert backends["f1"].ineligible_reason == \
        "shared file /tmp/other/f1.img (share=on) is never merged by KSM"
    assert backends["mem0"].hugetlb is True


def test_build_never_assumes_a_type_for_unlisted_backend() -> None:
    [b] = build_ram_backends(PC_RAM_MEMDEV, {}, {}, [])
    assert b.qom_type == "memory-backend-unknown"
    assert b.ineligible_reason is not None


def test_build_skips_memdev_without_id() -> None:
    no_id = [{k: v for k, v in PC_RAM_MEMDEV[0].items() if k != "id"}]
    assert build_ram_backends(no_id, backend_types(PC_RAM_QOM), {}, []) == []


@pytest.mark.parametrize("memdevs", [
    {"return": []},
    [1],
    [{"id": "x", "size": "big", "merge": True}],
    [{"id": "x", "size": 4096, "merge": "yes"}],
])
def test_build_rejects_malformed_memdev(memdevs: Any) -> None:
    with pytest.raises(HypervisorError):
        build_ram_backends(memdevs, {"x": "memory-backend-ram"}, {}, [])


def test_build_rejects_missing_mem_path() -> None:
    with pytest.raises(HypervisorError, match="mem-path"):
        build_ram_backends(MEMDEV_REPLY, backend_types(QOM_LIST_REPLY),
                           {("mem0", "hugetlb"): False}, MOUNTS)


def test_backend_types_rejects_non_list() -> None:
    with pytest.raises(HypervisorError):
        backend_types({"name": "x"})


def test_merge_set_call() -> None:
    assert merge_set_call("ram-node0", False) == (
        "qom-set", {"path": "/objects/ram-node0", "property": "merge", "value": False})
    with pytest.raises(HypervisorError):
        merge_set_call("../machine", True)


def test_mounts_longest_prefix_and_escapes() -> None:
    mounts = parse_mounts("a /mnt/huge\\040pages hugetlbfs rw 0 0\nb / ext4 rw 0 0\n")
    assert mounts[0] == Mount("/mnt/huge pages", "hugetlbfs")
    assert fstype_of("/mnt/huge pages/vm1", mounts) == "hugetlbfs"
    assert fstype_of("/mnt/huge pagesX/vm1", mounts) == "ext4"
    assert fstype_of("/dev/hugepages/x", MOUNTS) == "hugetlbfs"
    assert fstype_of("/tmp/qt/hpx", MOUNTS) == "tmpfs"


DOMAIN_XML = """<domain type='qemu'>
  <name>web1</name>
  <uuid>0E5C1B5E-1F1B-4A1A-8E7C-0123456789AB</uuid>
  <memory unit='MiB'>512</memory>
  <memoryBacking><nosharepages/></memoryBacking>
  <launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>
</domain>"""


def test_domain_xml_facts() -> None:
    facts = parse_domain_xml(DOMAIN_XML)
    assert facts.name == "web1"
    assert facts.uuid == "0e5c1b5e-1f1b-4a1a-8e7c-0123456789ab"
    assert facts.memory_bytes == 512 << 20
    assert facts.nosharepages and facts.launch_security


def test_domain_xml_defaults_and_units() -> None:
    facts = parse_domain_xml("<domain><name>a</name><memory>1024</memory>"
                             "<memoryBacking><hugepages/></memoryBacking></domain>")
    assert facts.memory_bytes == 1024 * 1024
    assert not facts.nosharepages and not facts.launch_security
    assert parse_domain_xml("<domain><memory unit='GB'>2</memory></domain>"
                            ).memory_bytes == 2_000_000_000


@pytest.mark.parametrize("xml", [
    "<domain><name>x</name>",
    "<?xml version='1.0'?><!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain>&a;</domain>",
    "<network/>",
    "<domain><memory unit='parsecs'>1</memory></domain>",
    "<domain>" + " " * (5 << 20) + "</domain>",
])
def test_domain_xml_rejects_bad_input(xml: str) -> None:
    with pytest.raises(HypervisorError):
        parse_domain_xml(xml)


def test_cmdline_matching() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,,1,debug-threads=on",
            "-uuid", "0E5C1B5E-1F1B-4A1A-8E7C-0123456789AB",
            "-qmp", "unix:run/q.sock,server=on,wait=off"]
    assert cmdline_matches_vm(argv, "web,1", None)
    assert not cmdline_matches_vm(argv, "web", None)
    assert cmdline_matches_vm(argv, None, "0e5c1b5e-1f1b-4a1a-8e7c-0123456789ab")
    assert cmdline_matches_vm(argv, None, None, "/srv/run/q.sock", cwd="/srv")
    assert not cmdline_matches_vm(argv, None, None, "/srv/run/q.sock", cwd="/other")
    assert cmdline_matches_vm(["qemu", "-name", "plain"], "plain", None)


def wait_for_exec(pid: int, marker: bytes) -> None:
    """Wait until the child has exec'd (its cmdline shows ``marker``)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker in f.read():
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never exec'd")


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-name", "guest=vm-a,debug-threads=on"])
    try:
        wait_for_exec(proc.pid, b"guest=vm-a")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_verify_pid_real_process(decoy: subprocess.Popen[bytes]) -> None:
    assert verify_pid(decoy.pid, "vm-a", None) == decoy.pid
    with pytest.raises(ProcessGone, match="reused"):
        verify_pid(decoy.pid, "vm-b", None)
    with pytest.raises(ProcessGone):
        verify_pid(os.getpid(), "vm-a", None)


def test_verify_pid_gone(decoy: subprocess.Popen[bytes]) -> None:
    pid = decoy.pid
    decoy.kill()
    decoy.wait()
    with pytest.raises(ProcessGone):
        verify_pid(pid, "vm-a", None)


def test_verify_pid_reads_cmdline_through_procfs(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cmdline").write_bytes(b"qemu\0-name\0guest=vm-a\0")
    assert verify_pid(7, "vm-a", None, proc_root=str(proc)) == 7
    (proc / "7" / "cmdline").write_bytes(b"")   # zombie or kernel thread
    with pytest.raises(ProcessGone, match="empty cmdline"):
        verify_pid(7, "vm-a", None, proc_root=str(proc))
    with pytest.raises(ProcessGone):
        verify_pid(8, "vm-a", None, proc_root=str(proc))
