"""The daemon's Reconciler against a scripted hypervisor and temporary /proc and sysfs trees.

Each VM is a FakeVm whose QEMU process lives in a FakeProc tree: its guest
RAM mapping (smaps, with the kernel's ``mg`` flag following every qom-set),
its pagemap (some pages are KSM pages shared with the other VMs) and the
host's meminfo. Nothing here touches the real kernel.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.hypervisor import FakeHypervisor, FakeVm
from tests.ksmtree import EXCLUSIVE, KPF_KSM, PRESENT, FakeProc, make_sysfs
from vmshare.config import Config, DaemonSettings, HostPolicy, MergeSetting, VmPolicy
from vmshare.daemon.reconcile import Reconciler
from vmshare.daemon.state import StateStore
from vmshare.daemon.triggers import Trigger
from vmshare.errors import DomainNotFound, ProcessGone
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import RamBackend, VmFacts, VmRef
from vmshare.records.audit import AuditLog

BASE = 0x7F0000000000
PAGES = 16
SHARED = 8          # KSM pages each VM maps (k=2 with its neighbour)


def smaps(merge: bool) -> str:
    end = BASE + PAGES * 4096
    flags = "rd wr mr mw me ac dc" + (" mg" if merge else "")
    return (f"{BASE:x}-{end:x} rw-p 00000000 00:00 0 \nSize: {PAGES * 4} kB\n"
            f"Rss: {PAGES * 4} kB\nAnonHugePages: 0 kB\nVmFlags: {flags}\n")


class ScriptedHypervisor(FakeHypervisor):
    """FakeHypervisor whose calls can be scripted to fail: ``fail[(vm, call)] =
    (n, exc)`` raises ``exc`` from the n-th call (1-based) and every later one."""

    def __init__(self, vms: list[FakeVm]) -> None:
        super().__init__(vms)
        self.fail: dict[tuple[str, str], tuple[int, Exception]] = {}
        self.counts: dict[tuple[str, str], int] = {}

    def _check(self, name: str, call: str) -> None:
        key = (name, call)
        self.counts[key] = self.counts.get(key, 0) + 1
        if key in self.fail and self.counts[key] >= self.fail[key][0]:
            raise self.fail[key][1]

    def facts(self, vm: VmRef) -> VmFacts:
        self._check(vm.name, "facts")
        return super().facts(vm)

    def ram_backends(self, vm: VmRef) -> list[RamBackend]:
        self._check(vm.name, "ram_backends")
        return super().ram_backends(vm)

    def set_merge(self, vm: VmRef, backend_id: str, merge: bool) -> None:
        self._check(vm.name, "set_merge")
        super().set_merge(vm, backend_id, merge)


@dataclass
class Host:
    tmp: Path
    proc: FakeProc
    hv: ScriptedHypervisor
    sysfs: KsmSysfs
    clock: list[float] = field(default_factory=lambda: [1000.0])
    policies: dict[str, VmPolicy] = field(default_factory=dict)
    enabled: bool = True

    @property
    def audit_path(self) -> Path:
        return self.tmp / "audit.jsonl"

    @property
    def state_path(self) -> Path:
        return self.tmp / "state.json"

    def config(self) -> Config:
        return Config(path=None, host=HostPolicy(enabled=self.enabled, default_merge="on",
                                                 vms=dict(self.policies)),
                      daemon=DaemonSettings(history_file=self.tmp / "history.jsonl",
                                            history_db=self.tmp / "history.sqlite"))

    def reconciler(self) -> Reconciler:
        """A fresh Reconciler, as a daemon (re)start makes one: state read from disk."""
        return Reconciler(self.hv, self.config(), state=StateStore(self.state_path),
                          audit_path=self.audit_path, procfs=ProcFs(self.proc.root),
                          sysfs=self.sysfs, clock=lambda: self.clock[0], retry_after=30.0)

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def merge_of(self, name: str) -> tuple[bool, bool]:
        """(QEMU's merge property, the kernel's mg flag) of the VM's pc.ram."""
        merge = self.hv.vms[name].backends[0].merge
        mg = " mg" in (self.proc.root / str(self.hv.vms[name].pid) / "smaps").read_text()
        return merge, mg

    def add_vm(self, name: str, pid: int, merge: bool, group: str | None = None,
               policy: MergeSetting = "inherit") -> FakeVm:
        shared = [PRESENT | (100 + i) for i in range(SHARED)]
        own = [PRESENT | EXCLUSIVE | (pid * 100 + i) for i in range(PAGES - SHARED)]
        self.proc.add_process(pid, BASE, shared + own, smaps(merge), "")
        root = self.proc.root

        def on_set(backend_id: str, merge: bool) -> None:
            # The kernel side of qom-set: the mg flag follows; unmerging gives the
            # VM private copies of its KSM pages.
            entries = shared if merge else [PRESENT | EXCLUSIVE | (pid * 100 + 50 + i)
                                            for i in range(SHARED)]
            self.proc.add_process(pid, BASE, entries + own, smaps(merge), "")
            assert (root / str(pid) / "smaps").exists()

        vm = FakeVm(VmRef(name, f"{pid:08d}-0000-0000-0000-000000000000", pid, True), pid,
                    [RamBackend("pc.ram", PAGES * 4096, merge=merge)], on_set_merge=on_set)
        self.hv.vms[name] = vm
        if group is not None or policy != "inherit":
            self.policies[name] = VmPolicy(merge=policy, group=group)
        return vm


@pytest.fixture
def host(tmp_path: Path) -> Host:
    proc = FakeProc(tmp_path / "proc")
    for pfn in range(100, 100 + SHARED):
        proc.flags[pfn] = KPF_KSM
        proc.counts[pfn] = 2
    proc.flush()
    sysfs = KsmSysfs(make_sysfs(tmp_path / "ksm"))
    return Host(tmp_path, proc, ScriptedHypervisor([]), sysfs)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- idempotence --------------------------------------------------------------------


def test_second_reconcile_changes_nothing_and_audits_nothing(host: Host) -> None:
    host.add_vm("web-1", 101, merge=True, policy="off")
    host.add_vm("web-2", 102, merge=False, policy="on")
    host.add_vm("web-3", 103, merge=True)          # host default on: already right
    rc = host.reconciler()
    first = {o.vm: o.status for o in rc.reconcile_all("daemon-start")}
    assert first == {"web-1": "changed", "web-2": "changed", "web-3": "unchanged"}
    assert host.merge_of("web-1") == (False, False)
    assert host.merge_of("web-2") == (True, True)
    records = host.audit()
    assert [(r["target"], r["before"], r["after"]) for r in records] == [
        ("web-1/pc.ram", True, False), ("web-2/pc.ram", False, True)]
    assert all(r["actor"] == "daemon" and r["event"] == "daemon-start" for r in records)
    calls, audit_bytes = list(host.hv.calls), host.audit_path.read_bytes()

    second = rc.reconcile_all("periodic")
    assert {o.status for o in second} == {"unchanged"}
    assert host.hv.calls == calls
    assert host.audit_path.read_bytes() == audit_bytes
    # ...and so does a restarted daemon's first reconcile, and an event for one VM.
    assert {o.status for o in host.reconciler().reconcile_all("daemon-start")} == \
        {"unchanged"}
    assert host.reconciler().handle(Trigger("web-1", "apply", "hook:started/begin")).status \
        == "unchanged"
    assert host.hv.calls == calls and host.audit_path.read_bytes() == audit_bytes
    assert "pending" not in json.dumps(json.loads(host.state_path.read_text()))


def test_kernel_flag_disagreeing_is_acted_on(host: Host) -> None:
    """QEMU says merge=off but the mapping still has mg: not 'already right'."""
    host.add_vm("web-1", 101, merge=False, policy="off")
    (host.proc.root / "101" / "smaps").write_text(smaps(True))
    outcome = host.reconciler().reconcile_all("periodic")[0]
    assert outcome.status == "changed"
    assert host.merge_of("web-1") == (False, False)
    assert [(r["before"], r["after"]) for r in host.audit()] == [(False, False)]


# -- VMs vanishing mid-reconcile ----------------------------------------------------------


@pytest.mark.parametrize("call,exc", [
    ("ram_backends", DomainNotFound("no domain named 'web-2'")),
    ("set_merge", ProcessGone("QEMU process 102 exited")),
])
def test_vm_vanishing_mid_reconcile_is_skipped_with_one_warning(
        host: Host, caplog: pytest.LogCaptureFixture, call: str, exc: Exception) -> None:
    for i, name in enumerate(("web-1", "web-2", "web-3")):
        host.add_vm(name, 101 + i, merge=True, policy="off")
    # The survey reads web-2's backends once; it vanishes when the reconciler acts.
    host.hv.fail[("web-2", call)] = (2 if call == "ram_backends" else 1, exc)
    caplog.set_level(logging.DEBUG, "vmshare")
    outcomes = {o.vm: o.status for o in host.reconciler().reconcile_all("periodic")}
    assert outcomes == {"web-1": "changed", "web-2": "vanished", "web-3": "changed"}
    warned = warnings_of(caplog)
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert warned[0].name == "vmshare.daemon.vm.web-2"
    assert "vanished" in warned[0].getMessage() and str(exc) in warned[0].getMessage()
    assert host.merge_of("web-1") == (False, False) == host.merge_of("web-3")
    assert [r["vm"] for r in host.audit()] == ["web-1", "web-3"]
    state = json.loads(host.state_path.read_text())
    assert not any("pending" in e for e in state["vms"].values())


def test_trigger_for_a_vm_gone_before_lookup(host: Host,
                                             caplog: pytest.LogCaptureFixture) -> None:
    host.add_vm("web-1", 101, merge=True, policy="off")
    caplog.set_level(logging.INFO, "vmshare")
    out = host.reconciler().handle(Trigger("web-9", "apply", "libvirt:started/0"))
    assert out.status == "vanished"
    assert len(warnings_of(caplog)) == 1
    assert host.hv.calls == []


# -- unmerge refused: logged, retried later, never forced -----------------------------------


def test_unmerge_refused_is_retried_later_never_forced(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.add_vm("web-1", 101, merge=True, policy="off")
    host.add_vm("web-2", 102, merge=True, policy="on")
    meminfo = host.proc.root / "meminfo"
    meminfo.write_text("MemTotal: 1000000 kB\nMemAvailable: 1000 kB\n")
    caplog.set_level(logging.INFO, "vmshare")
    rc = host.reconciler()
    out = {o.vm: o for o in rc.reconcile_all("periodic")}
    assert out["web-1"].status == "refused" and "MemAvailable" in out["web-1"].detail
    assert out["web-2"].status == "unchanged"
    assert host.hv.calls == [] and host.audit() == []
    assert host.merge_of("web-1") == (True, True)
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "retrying in 30 s" in warned[0].getMessage()
    # Not due before the retry time, and asking again (an event) still refuses.
    host.clock[0] += 10
    assert rc.due() == []
    assert rc.handle(Trigger("web-1", "apply", "qmp:RESUME")).status == "refused"
    assert host.hv.calls == []
    host.clock[0] += 31
    assert rc.due() == ["web-1"]
    assert rc.due() == []          # taken off the list
    assert rc.handle(Trigger("web-1", "apply", "retry")).status == "refused"
    # Memory is freed: the next retry unmerges, once.
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    host.clock[0] += 31
    assert rc.due() == ["web-1"]
    out2 = rc.handle(Trigger("web-1", "apply", "retry"))
    assert out2.status == "changed"
    assert host.hv.calls == [("web-1", "pc.ram", False)]
    assert host.merge_of("web-1") == (False, False)
    assert [(r["target"], r["event"]) for r in host.audit()] == [("web-1/pc.ram", "retry")]
    assert rc.due() == [] and "web-1" not in rc.retry


# -- trust groups ---------------------------------------------------------------------------


def test_trust_groups_only_the_holding_group_is_mergeable(host: Host) -> None:
    """alpha (group a) and beta-1 (group b) are both mergeable and both ask for it;
    beta-2 (group b) asks too. Group b has more VMs asking, so it holds: alpha is
    made unmergeable naming the blocker, and beta-2 is made mergeable (after
    alpha is unmergeable, so never two groups at once)."""
    host.add_vm("alpha", 101, merge=True, group="a", policy="on")
    host.add_vm("beta-1", 102, merge=True, group="b", policy="on")
    host.add_vm("beta-2", 103, merge=False, group="b", policy="on")
    order: list[tuple[str, bool]] = []
    for name in ("alpha", "beta-2"):
        vm = host.hv.vms[name]
        inner = vm.on_set_merge
        assert inner is not None                 # Host.add_vm gives every VM one

        def record(backend: str, merge: bool, inner: Callable[[str, bool], None] = inner,
                   name: str = name) -> None:
            order.append((name, merge))
            inner(backend, merge)
        vm.on_set_merge = record
    rc = host.reconciler()
    out = {o.vm: o for o in rc.reconcile_all("daemon-start")}
    assert out["alpha"].status == "changed"
    assert "blocked: trust group 'b' is merging (beta-1)" in out["alpha"].detail
    assert out["beta-1"].status == "unchanged"
    assert out["beta-2"].status == "changed"
    assert order == [("alpha", False), ("beta-2", True)]
    assert host.merge_of("alpha") == (False, False)
    assert host.merge_of("beta-2") == (True, True)
    alpha = [r for r in host.audit() if r["vm"] == "alpha"]
    assert len(alpha) == 1 and "beta-1" in alpha[0]["reason"]
    # Stable: nothing flips back on the next pass.
    assert {o.status for o in rc.reconcile_all("periodic")} == {"unchanged"}


def test_trust_group_conflict_on_an_event_is_refused_and_named(host: Host) -> None:
    """A VM of another group asks to merge while group a holds: it stays unmergeable."""
    host.add_vm("alpha", 101, merge=True, group="a", policy="on")
    host.add_vm("gamma", 102, merge=False, group="c", policy="on")
    rc = host.reconciler()
    out = rc.handle(Trigger("gamma", "apply", "libvirt:started/0"))
    assert out.status == "unchanged" and "alpha" in out.detail
    assert host.merge_of("gamma") == (False, False)
    assert host.hv.calls == [] and host.audit() == []


# -- the host-wide off switch -------------------------------------------------------------


def test_host_off_switch_makes_every_vm_unmergeable(host: Host) -> None:
    host.add_vm("web-1", 101, merge=True, policy="on")
    host.add_vm("web-2", 102, merge=True, group="x")
    host.add_vm("web-3", 103, merge=False)
    host.enabled = False
    out = {o.vm: o for o in host.reconciler().reconcile_all("daemon-start")}
    assert {n: o.status for n, o in out.items()} == \
        {"web-1": "changed", "web-2": "changed", "web-3": "unchanged"}
    assert all("host-wide switch is off" in o.detail for o in out.values())
    for name in out:
        assert host.merge_of(name) == (False, False)
    assert sorted(r["vm"] for r in host.audit()) == ["web-1", "web-2"]


# -- a crash between acting and auditing ------------------------------------------------------


def _crash_in_child(host: Host, when: str) -> dict[str, Any]:
    """Run one reconcile in a forked child that SIGKILLs itself ``when`` ("acted":
    after QEMU accepted the qom-set, before the audit record; "audited": after the
    record, before the pending entry is cleared). Returns the state file as the
    child left it. The QEMU side of the change (the fake's merge property) is
    then applied in the parent, as a real QEMU would have kept it."""
    vm = host.hv.vms["web-1"]
    inner = vm.on_set_merge
    assert inner is not None                     # Host.add_vm gives every VM one

    def acted(backend: str, merge: bool) -> None:
        inner(backend, merge)
        if when == "acted":
            os.kill(os.getpid(), signal.SIGKILL)
    vm.on_set_merge = acted
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child is killed
        try:
            if when == "audited":
                original = AuditLog.append

                def append_then_die(self: AuditLog, rec: Any) -> None:
                    original(self, rec)
                    os.kill(os.getpid(), signal.SIGKILL)
                AuditLog.append = append_then_die  # type: ignore[method-assign]
            host.reconciler().reconcile_all("libvirt:started/0")
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    vm.on_set_merge = inner
    vm.backends[0] = RamBackend("pc.ram", PAGES * 4096, merge=False)
    state: dict[str, Any] = json.loads(host.state_path.read_text())
    return state


@pytest.mark.parametrize("when", ["acted", "audited"])
def test_crash_between_pending_and_audit_is_audited_once_on_restart(host: Host,
                                                                    when: str) -> None:
    host.add_vm("web-1", 101, merge=True, policy="off")
    host.add_vm("web-2", 102, merge=True)
    state = _crash_in_child(host, when)
    pending = state["vms"]["web-1"]["pending"]
    assert pending["merge"] is False and pending["before"] == {"pc.ram": True}
    assert pending["event"] == "libvirt:started/0"
    assert len(host.audit()) == (1 if when == "audited" else 0)
    assert host.merge_of("web-1") == (False, False)

    rc = host.reconciler()                    # the restarted daemon
    written = rc.complete_pending()
    assert written == (1 if when == "acted" else 0)
    records = host.audit()
    assert len(records) == 1
    rec = records[0]
    assert (rec["target"], rec["before"], rec["after"], rec["event"]) == \
        ("web-1/pc.ram", True, False, "libvirt:started/0")
    assert rec["id"].startswith(pending["id"] + "/")
    assert "pending" not in json.loads(host.state_path.read_text())["vms"]["web-1"]
    # Restarted again, and reconciling: still exactly one record, no new action.
    assert host.reconciler().complete_pending() == 0
    assert {o.status for o in rc.reconcile_all("daemon-start")} == {"unchanged"}
    assert host.audit() == records
    assert host.hv.calls == []                # the parent never acted itself


# -- migrations seen by the plain-QEMU watcher ------------------------------------------------


def test_destination_first_seen_after_its_migration_is_a_migrate_in() -> None:
    """A same-host migration finishes well within one poll: the destination's
    socket may be first seen already running; query-migrate says it migrated in."""
    from vmshare.daemon.qmp_watch import Snapshot, transitions
    migrated = Snapshot("/d.qmp", "vm", "u", 11, "running", ("pc.ram",), migrated_in=True)
    t = transitions(None, migrated, "/d.qmp")[0]
    assert (t.resets, t.uuid) == ("migrate-in", "/d.qmp")
    fresh = Snapshot("/d.qmp", "vm", "u", 11, "running", ("pc.ram",))
    assert transitions(None, fresh, "/d.qmp")[0].resets is None


def test_late_second_report_of_a_new_process_starts_no_new_record(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "state.json")
    s.observe("vm", "u", 10, 500, now=100.0)
    assert s.reset_event("vm", "migrate-in", 11, now=200.0) is not None
    s.observe("vm", "u", 11, 400, now=300.0)
    # The socket re-seen an hour later: the same process, not a second migration.
    assert s.reset_event("vm", "migrate-in", 11, now=3800.0) is None
    assert s.vm("vm")["remerge"]["previous_ksm_pages"] == 500
    # A guest reset of that process is a new event, though.
    rec = s.reset_event("vm", "reset", 11, now=3800.0)
    assert rec is not None and rec.previous_ksm_pages == 400


def test_migrate_in_trigger_is_named_in_the_audit_and_tracked(host: Host) -> None:
    host.add_vm("web-1", 101, merge=True, policy="off")
    rc = host.reconciler()
    rc.state.observe("web-1", "u", 90, 1234, now=999.0)     # the source, before
    out = rc.handle(Trigger("web-1", "apply", "qmp:incoming-migration/running",
                            "migrate-in", None))
    assert out.status == "changed"
    [rec] = host.audit()
    assert rec["event"] == "qmp:incoming-migration/running (migrate-in)"
    remerge = json.loads(host.state_path.read_text())["vms"]["web-1"]["remerge"]
    assert (remerge["event"], remerge["pid"], remerge["previous_ksm_pages"]) == \
        ("migrate-in", 101, 1234)


def test_scope_foreign_vms_are_never_touched_but_count_for_trust_groups(host: Host) -> None:
    """A daemon told to manage only ``mine-*`` leaves other VMs alone (another
    manager's, or another test session's), while KSM being host-wide still makes
    a mergeable foreign VM of another trust group block its own VMs."""
    host.add_vm("mine-1", 101, merge=True, policy="off")
    host.add_vm("mine-2", 102, merge=False, group="a", policy="on")
    host.add_vm("theirs", 103, merge=True, group="b", policy="off")
    host.add_vm("theirs-b", 104, merge=True, group="b")
    rc = host.reconciler()
    rc.scope = lambda name: name.startswith("mine-")
    out = {o.vm: o for o in rc.reconcile_all("daemon-start")}
    assert set(out) == {"mine-1", "mine-2"}
    assert out["mine-1"].status == "changed"
    assert out["mine-2"].status == "unchanged" and "theirs-b" in out["mine-2"].detail
    assert host.merge_of("theirs") == (True, True)
    assert rc.handle(Trigger("theirs", "apply", "libvirt:started/0")).status == "ignored"
    assert host.hv.calls == [("mine-1", "pc.ram", False)]
    rc.observe()
    assert sorted(json.loads(host.state_path.read_text())["vms"]) == ["mine-1", "mine-2"]


# -- history ------------------------------------------------------------------------


def test_observe_records_history_at_its_interval(host: Host) -> None:
    from vmshare.records.history_db import HistoryDb
    host.add_vm("a", 11, merge=True)
    host.add_vm("b", 12, merge=True)
    rc = host.reconciler()
    rc.observe()
    host.clock[0] += 10          # within history_interval (60 s): no second sample
    rc.observe()
    host.clock[0] += 60
    rc.observe()
    samples = HistoryDb.open_reader(host.tmp / "history.sqlite").samples("raw", 0.0)
    assert [s["time"] for s in samples] == [1000.0, 1070.0]
    # Each VM maps 8 KSM pages shared with the other (k=2): half a page each.
    assert samples[-1]["vms"]["a"]["saved_bytes"] == SHARED * 4096 // 2
    assert samples[-1]["vms"]["a"]["ksm_pages"] == SHARED
    assert samples[-1]["host"]["pages_sharing"] == 30   # the fake sysfs tree's counter


def test_nothing_to_do_reads_each_vm_once(host: Host) -> None:
    """A periodic reconcile where every VM already matches its policy reads each
    VM's backends once (the survey's read serves the check), never twice."""
    host.add_vm("a", 11, merge=True)
    host.add_vm("b", 12, merge=True)
    host.reconciler().reconcile_all("periodic")
    host.hv.counts.clear()
    outcomes = host.reconciler().reconcile_all("periodic")
    assert {o.status for o in outcomes} == {"unchanged"}
    assert host.hv.counts[("a", "ram_backends")] == 1
    assert host.hv.counts[("b", "ram_backends")] == 1
