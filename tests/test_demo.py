"""`vmshare demo`'s steps and its clean-up, with the guests, libvirt and KSM faked
(the real run is integration/demo.sh): the knobs are always restored and every
guest it started is destroyed (unless --keep), whichever step fails."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from vmshare.cli import demorun as demo
from vmshare.errors import HypervisorError, UsageError
from vmshare.guest import GuestImage
from vmshare.ksm.sysfs import KnobSnapshot
from vmshare.model import VmRef


@dataclass
class FakeSysfs:
    writes: list[tuple[str, int]] = field(default_factory=list)
    restored: list[KnobSnapshot] = field(default_factory=list)
    scans: int = 10
    snap: KnobSnapshot = field(
        default_factory=lambda: KnobSnapshot({"run": 0, "pages_to_scan": 100}))

    def available(self) -> bool:
        return True

    def snapshot(self) -> KnobSnapshot:
        return self.snap

    def restore(self, snap: KnobSnapshot) -> None:
        self.restored.append(snap)

    def set(self, name: str, value: int) -> None:
        self.writes.append((name, value))

    def read_int(self, name: str) -> int:
        assert name == "full_scans"
        return self.scans

    def wait_full_scans(self, n: int, timeout: float) -> int:
        self.scans += n
        return self.scans

    def counters(self) -> dict[str, int]:
        return {"pages_shared": 10, "pages_sharing": 20}


class FakeHypervisor:
    instances: ClassVar[list[FakeHypervisor]] = []
    fail_on: ClassVar[str | None] = None      # the guest whose start fails

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.running: list[VmRef] = []
        self.destroyed: list[str] = []
        self.closed = False
        FakeHypervisor.instances.append(self)

    def list_vms(self) -> list[VmRef]:
        return list(self.running)

    def create_transient(self, xml: str) -> VmRef:
        if xml == self.fail_on:
            raise HypervisorError(f"cannot start {xml}")
        ref = VmRef(xml, f"uuid-{xml}", running=True)
        self.running.append(ref)
        return ref

    def facts(self, ref: VmRef) -> Any:
        return SimpleNamespace(pid=1000 + len(ref.name))

    def destroy(self, ref: VmRef) -> None:
        self.destroyed.append(ref.name)

    def close(self) -> None:
        self.closed = True


class FakeController:
    def __init__(self, hv: Any, procfs: Any, observer: Any) -> None:
        pass

    def set_merge(self, name: str, merge: bool) -> list[Any]:
        assert merge
        return [SimpleNamespace(vm=name, backend="pc.ram")]


class FakeObserver:
    def __init__(self, hv: Any, sysfs: Any, procfs: Any) -> None:
        pass

    def host(self, names: list[str]) -> Any:
        return names


@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(FakeHypervisor, "instances", [])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / "demo")
    monkeypatch.setattr(demo, "LibvirtHypervisor", FakeHypervisor)
    monkeypatch.setattr(demo, "build_image", lambda: GuestImage(Path("/k"), Path("/i")))
    monkeypatch.setattr(demo, "domain_xml", lambda name, *a, **kw: name)
    monkeypatch.setattr(demo, "wait_ready", lambda *a, **kw: None)
    monkeypatch.setattr(demo, "Controller", FakeController)
    monkeypatch.setattr(demo, "Observer", FakeObserver)
    monkeypatch.setattr(demo, "report", SimpleNamespace(
        host_summary=lambda h: f"summary of {h}", status_table=lambda h: "table",
        matrix=lambda h: "matrix", mib=lambda b: f"{b // 2**20} MiB"))


def run(sysfs: FakeSysfs, **options: Any) -> tuple[list[str], Any]:
    lines: list[str] = []
    opts = demo.DemoOptions(guests=2, **options)
    try:
        result: Any = demo.run_demo(opts, out=lines.append, sysfs=sysfs,  # type: ignore[arg-type]
                                    procfs=object())  # type: ignore[arg-type]
    except Exception as exc:   # the test looks at what was cleaned up first
        result = exc
    return lines, result


def test_demo_boots_merges_waits_shows_and_cleans_up() -> None:
    sysfs = FakeSysfs()
    lines, result = run(sysfs)
    assert result == 0
    (real,) = FakeHypervisor.instances
    assert [r.name for r in real.running] == ["vmshare-demo-1", "vmshare-demo-2"]
    assert sysfs.writes == [*demo.DEMO_KNOBS.items(), ("run", 1)]     # run last
    text = "\n".join(lines)
    order = ["Building the guest image", "Booting 2 TCG guests", "vmshare-demo-2: ready",
             "vmshare-demo-1/pc.ram: mergeable", "Kernel KSM running", "full scan 3:",
             "summary of ['vmshare-demo-1', 'vmshare-demo-2']", "matrix",
             "each guest saves about 48.0 MiB", "Guests destroyed; KSM knobs restored (run=0)"]
    places = [text.index(s) for s in order]
    assert places == sorted(places)
    assert sysfs.restored == [sysfs.snap]
    assert real.destroyed == ["vmshare-demo-1", "vmshare-demo-2"] and real.closed


def test_a_failed_boot_destroys_the_guests_already_started(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeHypervisor, "fail_on", "vmshare-demo-2")
    sysfs = FakeSysfs()
    _, result = run(sysfs)
    assert isinstance(result, HypervisorError)
    (real,) = FakeHypervisor.instances
    assert real.destroyed == ["vmshare-demo-1"] and real.closed
    assert sysfs.restored == [sysfs.snap] and sysfs.writes == []    # KSM never started


def test_keep_leaves_the_guests_running_but_restores_the_knobs() -> None:
    sysfs = FakeSysfs()
    lines, result = run(sysfs, keep=True)
    (real,) = FakeHypervisor.instances
    assert result == 0 and real.destroyed == [] and sysfs.restored == [sysfs.snap]
    assert lines[-1] == ("Guests left running (--keep): vmshare-demo-1, vmshare-demo-2; "
                         "KSM knobs restored.")


def test_a_demo_guest_still_running_is_refused_before_booting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeHypervisor, "list_vms",
                        lambda self: [VmRef("vmshare-demo-1", "u", running=True)])
    sysfs = FakeSysfs()
    _, result = run(sysfs)
    assert isinstance(result, UsageError) and "virsh destroy vmshare-demo-1" in str(result)
    (real,) = FakeHypervisor.instances
    assert real.running == [] and real.destroyed == [] and real.closed
    assert sysfs.restored == [sysfs.snap]
