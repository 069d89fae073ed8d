"""A VM counts as unmergeable only when no mapping of its QEMU process is: the
one path and the daemon against a QEMU whose VRAM (a 16 MiB mapping that is
no RAM backend's) stays mergeable, as under QEMU's default mem-merge=on.

Uses the daemon tests' scripted host (tests/test_reconcile.py).
"""

from __future__ import annotations

import logging

import pytest

from tests.test_reconcile import Host, host, warnings_of
from vmshare.config import Config, HostPolicy, VmPolicy
from vmshare.control.merge import Controller, NotFullyUnmergeable, disable, enable
from vmshare.errors import TrustGroupConflict
from vmshare.ksm.procfs import ProcFs
from vmshare.observe.host import Observer
from vmshare.records.audit import AuditLog

__all__ = ["host"]

VRAM_BASE = 0x7E0000000000
VRAM = 16 * 2**20


def with_vram(host: Host, name: str) -> None:
    """Give the VM's QEMU a mergeable VRAM mapping that stays whatever qom-set does."""
    vm = host.hv.vms[name]
    smaps = host.proc.root / str(vm.pid) / "smaps"
    text = (f"{VRAM_BASE:x}-{VRAM_BASE + VRAM:x} rw-p 00000000 00:00 0 \n"
            f"Size: {VRAM // 1024} kB\nRss: 4 kB\nVmFlags: rd wr mr mw me ac mg\n")
    smaps.write_text(smaps.read_text() + text)
    kernel_side = vm.on_set_merge
    assert kernel_side is not None

    def also_vram(backend_id: str, merge: bool) -> None:
        kernel_side(backend_id, merge)
        smaps.write_text(smaps.read_text() + text)

    vm.on_set_merge = also_vram


def ram_state(host: Host, name: str) -> tuple[bool, bool]:
    """(QEMU's merge property, the mg flag of the RAM mapping), the VRAM left out."""
    vm = host.hv.vms[name]
    smaps = (host.proc.root / str(vm.pid) / "smaps").read_text()
    return vm.backends[0].merge, " mg" in smaps.split(f"{VRAM_BASE:x}-")[0]


def controller(host: Host) -> Controller:
    procfs = ProcFs(host.proc.root)
    return Controller(host.hv, procfs, Observer(host.hv, host.sysfs, procfs))


def test_disable_leaving_vram_mergeable_is_not_a_success(host: Host) -> None:
    host.add_vm("web-1", 101, merge=True)
    with_vram(host, "web-1")
    with pytest.raises(NotFullyUnmergeable) as info:
        disable(controller(host), "web-1", audit=AuditLog(host.audit_path, "cli"))
    assert str(info.value) == (
        "web-1: not fully unmergeable: 16,384 KiB in 1 mapping(s) of QEMU process 101 "
        "outside its RAM backends stay mergeable (QEMU's mem-merge=on: VRAM, ROMs); bring "
        "the domain to <nosharepages/> with 'vmshare policy adopt web-1' (a plain QEMU: "
        "-machine mem-merge=off) and restart the guest (mem-merge is a QEMU start option)")
    # the backend was changed (and audited); the result says what is left
    assert ram_state(host, "web-1") == (False, False)
    assert [r["target"] for r in host.audit()] == ["web-1/pc.ram"]
    assert info.value.result.other_mergeable_bytes == VRAM
    assert [c.backend for c in info.value.result.changed] == ["pc.ram"]
    # only one backend asked for: the others are not this call's business
    host.add_vm("web-2", 102, merge=True)
    with_vram(host, "web-2")
    result = disable(controller(host), "web-2", audit=None, backend="pc.ram")
    assert result.other_mergeable_bytes == VRAM


def test_vm_mergeable_only_through_vram_blocks_another_trust_group(host: Host) -> None:
    host.add_vm("a1", 101, merge=False, group="tenant-a")
    host.add_vm("b1", 102, merge=False, group="tenant-b")
    with_vram(host, "a1")
    config = Config(path=None, host=HostPolicy(vms={"a1": VmPolicy(group="tenant-a"),
                                                    "b1": VmPolicy(group="tenant-b")}))
    with pytest.raises(TrustGroupConflict) as info:
        enable(controller(host), config, "b1", audit=None)
    assert str(info.value) == (
        "refusing to make b1 (trust group 'tenant-b') mergeable: a1 of trust group "
        "'tenant-a' is mergeable (16,384 KiB of its QEMU outside its RAM backends: VRAM, "
        "ROMs under QEMU's mem-merge=on), and KSM would let the two share pages; bring a1 "
        "to <nosharepages/> ('vmshare policy adopt a1') and restart it, or set force in "
        "the policy")
    assert host.hv.calls == []


def test_daemon_reports_partial_once_per_process_and_keeps_the_group_mergeable(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.add_vm("a1", 101, merge=True, group="tenant-a", policy="off")
    host.add_vm("b1", 102, merge=False, group="tenant-b", policy="on")
    with_vram(host, "a1")
    rc = host.reconciler()
    with caplog.at_level(logging.INFO):
        first = {o.vm: o for o in rc.reconcile_all("daemon-start")}
    assert first["a1"].status == "partial" and "not fully unmergeable" in first["a1"].detail
    assert [c.backend for c in first["a1"].changes] == ["pc.ram"]
    assert ram_state(host, "a1") == (False, False)
    # a1's VRAM is still mergeable: b1's group must not merge
    assert first["b1"].status == "refused" and "'vmshare policy adopt a1'" in first["b1"].detail
    assert host.merge_of("b1") == (False, False)
    partial = [r for r in warnings_of(caplog) if "not fully unmergeable" in r.getMessage()]
    assert len(partial) == 1
    audit = host.audit()
    caplog.clear()
    host.clock[0] += 60
    second = {o.vm: o.status for o in rc.reconcile_all("periodic")}
    assert second == {"a1": "partial", "b1": "refused"}
    assert not [r for r in warnings_of(caplog) if "not fully unmergeable" in r.getMessage()]
    assert host.audit() == audit
    # a new QEMU process (restarted with mem-merge=off: no VRAM mapping) is warned anew
    # only if it is exposed again; here it is not, and b1 may merge at last
    host.add_vm("a1", 201, merge=False, group="tenant-a", policy="off")
    host.clock[0] += 60
    third = {o.vm: o.status for o in rc.reconcile_all("periodic")}
    assert third == {"a1": "unchanged", "b1": "changed"}
    assert host.merge_of("b1") == (True, True)
