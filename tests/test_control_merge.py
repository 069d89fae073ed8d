"""The one enable/disable path (vmshare.control.merge) on a scripted hypervisor
and a temporary /proc: trust groups, force, audit, memory check, verification.

Each VM's QEMU has one mapping per RAM backend (smaps rewritten by the fake's
kernel side after every qom-set, so the ``mg`` flag follows unless the test
makes QEMU or the kernel disagree), and one KSM page shared with its neighbours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.hypervisor import FakeHypervisor, FakeVm
from tests.ksmtree import EXCLUSIVE, KPF_KSM, PRESENT, FakeProc, make_sysfs
from vmshare.config import Config, HostPolicy, VmPolicy
from vmshare.control.merge import Controller, disable, enable, to_decision
from vmshare.errors import PolicyError, TrustGroupConflict, UnmergeRefused, VerificationError
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import RamBackend, VmRef
from vmshare.observe.host import Observer
from vmshare.policy.rules import Decision
from vmshare.records.audit import AuditLog

PAGES = 8
BASES = {"pc.ram": 0x7F0000000000, "memdimm0": 0x7E0000000000}
SIZES = {"pc.ram": PAGES * 4096, "memdimm0": 2 * PAGES * 4096}


def smaps(merged: dict[str, bool]) -> str:
    text = ""
    for backend, merge in merged.items():
        base, size = BASES[backend], SIZES[backend]
        flags = "rd wr mr mw me ac dc" + (" mg" if merge else "")
        text += (f"{base:x}-{base + size:x} rw-p 00000000 00:00 0 \nSize: {size // 1024} kB\n"
                 f"Rss: {size // 1024} kB\nVmFlags: {flags}\n")
    return text


@dataclass
class Host:
    tmp: Path
    hv: FakeHypervisor
    proc: FakeProc
    policies: dict[str, VmPolicy]

    def controller(self) -> Controller:
        procfs = ProcFs(self.proc.root)
        return Controller(self.hv, procfs, Observer(self.hv, KsmSysfs(self.tmp / "ksm"),
                                                    procfs))

    def config(self) -> Config:
        return Config(path=None, host=HostPolicy(default_merge="on", vms=self.policies))

    @property
    def audit_path(self) -> Path:
        return self.tmp / "audit.jsonl"

    def audit(self) -> AuditLog:
        return AuditLog(self.audit_path, actor="cli")

    def records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def mg(self, name: str) -> dict[str, bool]:
        """The kernel's view: backend -> mg flag, read back from the VM's smaps."""
        pid = self.hv.vms[name].pid
        text = (self.proc.root / str(pid) / "smaps").read_text()
        out: dict[str, bool] = {}
        for backend, base in BASES.items():
            header = f"{base:x}-"
            if header in text:
                block = text[text.index(header):].split("VmFlags:", 1)[1].splitlines()[0]
                out[backend] = "mg" in block.split()
        return out


def add_vm(hv: FakeHypervisor, proc: FakeProc, name: str, pid: int,
           merged: dict[str, bool]) -> None:
    state = dict(merged)
    entries = [PRESENT | 100] + [PRESENT | EXCLUSIVE | (pid * 10 + i) for i in range(PAGES - 1)]
    proc.add_process(pid, BASES["pc.ram"], entries, smaps(state), "")

    def kernel_side(backend_id: str, merge: bool) -> None:
        state[backend_id] = merge
        (proc.root / str(pid) / "smaps").write_text(smaps(state))

    ref = VmRef(name, f"{pid:08d}-0000-0000-0000-000000000000", pid, True)
    hv.vms[name] = FakeVm(ref, pid, [RamBackend(b, SIZES[b], merge=m) for b, m in
                                     merged.items()], on_set_merge=kernel_side)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    proc = FakeProc(tmp_path / "proc")
    proc.flags[100] = KPF_KSM
    proc.counts[100] = 3
    proc.flush()
    make_sysfs(tmp_path / "ksm")
    hv = FakeHypervisor([])
    add_vm(hv, proc, "a1", 10, {"pc.ram": True})
    add_vm(hv, proc, "a2", 20, {"pc.ram": False, "memdimm0": True})
    add_vm(hv, proc, "b1", 30, {"pc.ram": False})
    policies = {"a1": VmPolicy(group="tenant-a"), "a2": VmPolicy(group="tenant-a"),
                "b1": VmPolicy(group="tenant-b")}
    return Host(tmp_path, hv, proc, policies)


def test_enable_refused_by_trust_group_names_the_blocking_vm(host: Host) -> None:
    with pytest.raises(TrustGroupConflict) as info:
        enable(host.controller(), host.config(), "b1", audit=host.audit())
    assert str(info.value).startswith(
        "refusing to make b1 (trust group 'tenant-b') mergeable: a1 of trust group "
        "'tenant-a' is mergeable")
    assert host.hv.calls == [] and host.records() == []
    assert host.mg("b1") == {"pc.ram": False}


def test_enable_forced_past_a_trust_group_is_recorded(host: Host) -> None:
    host.policies["b1"] = VmPolicy(group="tenant-b", force=True)
    result = enable(host.controller(), host.config(), "b1", audit=host.audit())
    assert result.forced == ("a1 of trust group 'tenant-a' is mergeable, but the policy of "
                             "b1 (trust group 'tenant-b') has force",)
    assert [(c.backend, c.before, c.after) for c in result.changed] == [("pc.ram", False, True)]
    (rec,) = host.records()
    assert rec["target"] == "b1/pc.ram" and rec["reason"].startswith(
        "vmshare enable; forced: a1 of trust group 'tenant-a'")
    assert host.mg("b1") == {"pc.ram": True}


def test_audit_written_once_per_changed_backend(host: Host) -> None:
    ctl = host.controller()
    result = enable(ctl, host.config(), "a2", audit=host.audit())
    # memdimm0 was already mergeable: one backend changed, one record
    assert [c.backend for c in result.changed] == ["pc.ram"] and result.acted == ("pc.ram",)
    assert [r["target"] for r in host.records()] == ["a2/pc.ram"]
    again = enable(ctl, host.config(), "a2", audit=host.audit())
    assert again.changed == () and again.acted == ()
    result = disable(ctl, "a2", audit=host.audit())
    assert sorted(c.backend for c in result.changed) == ["memdimm0", "pc.ram"]
    recs = host.records()
    assert (recs[0]["target"], recs[0]["after"]) == ("a2/pc.ram", True)
    assert sorted((r["target"], r["after"]) for r in recs[1:]) == [
        ("a2/memdimm0", False), ("a2/pc.ram", False)]
    assert host.mg("a2") == {"pc.ram": False, "memdimm0": False}


def test_disable_refused_without_memavailable_unless_forced(host: Host) -> None:
    (host.proc.root / "meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 1000 kB\n")
    with pytest.raises(UnmergeRefused) as info:
        disable(host.controller(), "a1", audit=host.audit())
    assert "MemAvailable" in str(info.value) and "--force" in str(info.value)
    assert host.hv.calls == [] and host.records() == []
    result = disable(host.controller(), "a1", audit=host.audit(), force=True)
    assert result.forced and result.forced[0].startswith("the free-memory check")
    (rec,) = host.records()
    assert rec["after"] is False and "forced past the free-memory check" in rec["reason"]
    assert host.mg("a1") == {"pc.ram": False}


@pytest.mark.parametrize(("disagree", "what"), [
    ("property", "pc.ram: QEMU reports merge=true"),
    ("mg", "pc.ram: the kernel's mg flag is set"),
])
def test_qemu_disagreeing_after_qom_set_is_a_verification_error(
        host: Host, disagree: str, what: str) -> None:
    host.hv.vms["a1"].disagree = disagree
    with pytest.raises(VerificationError) as info:
        disable(host.controller(), "a1", audit=host.audit())
    assert str(info.value) == f"a1: merge state not as asked after the change: {what}"
    # QEMU accepted the command, so the attempt is on record even though it failed
    (rec,) = host.records()
    assert rec["target"] == "a1/pc.ram" and host.hv.calls == [("a1", "pc.ram", False)]
    assert host.mg("a1") == {"pc.ram": True}


def test_enable_of_a_disagreeing_qemu_fails_too(host: Host) -> None:
    host.hv.vms["a2"].disagree = "property"
    with pytest.raises(VerificationError, match=r"pc\.ram: QEMU reports merge=false"):
        enable(host.controller(), host.config(), "a2", audit=host.audit())


def test_nosharepages_is_refused_by_policy(host: Host) -> None:
    host.hv.vms["b1"].nosharepages = True
    with pytest.raises(PolicyError, match="nosharepages"):
        enable(host.controller(), host.config(), "b1", audit=host.audit())
    assert host.hv.calls == []


def test_to_decision_is_the_same_path_with_a_planned_decision(host: Host) -> None:
    ctl = host.controller()
    decision = Decision("b1", True, "tenant-b", "planned")
    with pytest.raises(TrustGroupConflict, match="a1 of trust group 'tenant-a'"):
        to_decision(ctl, "b1", decision, {"a1": "tenant-a", "b1": "tenant-b"},
                    audit=host.audit(), reason="policy: planned")
    # its own entry in the host-wide map never blocks it
    result = to_decision(ctl, "b1", decision, {"b1": "tenant-b"}, audit=host.audit(),
                         reason="policy: planned", event="started")
    assert result.acted == ("pc.ram",)
    (rec,) = host.records()
    assert (rec["event"], rec["reason"]) == ("started", "policy: planned")
