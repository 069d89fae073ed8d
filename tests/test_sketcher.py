"""The daemon's sketcher (vmshare.daemon.sketcher) with fake VMs: which VM is
sketched when, the CPU budget's pauses, restarts and departures, and the
problems it must survive (no key, an unsafe directory, an unreadable VM)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from vmshare.config import SketchSettings
from vmshare.daemon.sketcher import Opened, Running, Sketcher
from vmshare.errors import AccessDenied, HypervisorError
from vmshare.model import PAGE_SIZE
from vmshare.present.pacing import PacedThread, budget_pause
from vmshare.records.sketchfile import SketchKey, read_sketch
from vmshare.sources.raw import RawImageSource

SECRET = b"s" * 32
KEY_ID = SketchKey.from_secret(SECRET).key_id
WORKER_CPU = 0.5          # CPU seconds each fake worker call reports


class Host:
    """Fake VMs (raw memory images) and a fake clock."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.vms: dict[str, Running] = {}
        self.now = 1000.0
        self.opened: list[str] = []
        self.refuse: set[str] = set()
        self.list_fails = False

    def add(self, name: str, pid: int, pages: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 8, size=(pages, PAGE_SIZE // 8), dtype=np.uint64)
        data[::4] = 0                       # a few zero pages
        (self.tmp / f"{name}.raw").write_bytes(data.tobytes())
        self.vms[name] = Running(name, (pid, pid * 10), 1_700_000_000 + pid)

    def running(self) -> tuple[list[Running], float]:
        if self.list_fails:
            raise HypervisorError("libvirt: connection lost")
        return sorted(self.vms.values(), key=lambda r: r.name), WORKER_CPU

    def opener(self, vm: Running) -> tuple[Opened, float]:
        self.opened.append(vm.name)
        if vm.name in self.refuse:
            raise AccessDenied(f"/proc/{vm.process[0]}/mem: permission denied")
        return Opened(RawImageSource(self.tmp / f"{vm.name}.raw", vm.name), "blue"), WORKER_CPU


def settings(tmp: Path, *, interval: float = 60.0, budget: float = 5.0) -> SketchSettings:
    return SketchSettings(key_file=tmp / "sketch.key", dir=tmp / "sketches",
                          interval=interval, cpu_budget=budget)


def write_key(tmp: Path) -> None:
    path = tmp / "sketch.key"
    path.write_bytes(SECRET)
    path.chmod(0o600)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    write_key(tmp_path)
    return Host(tmp_path)


def make(host: Host, **kw: float) -> Sketcher:
    return Sketcher(settings(host.tmp, **kw), host="h1", running=host.running,
                    opener=host.opener, clock=lambda: host.now, cpu_clock=lambda: 0.0)


def names_in_file(sk: Sketcher) -> list[str]:
    return [v.name for v in read_sketch(sk.path, key_id=KEY_ID).vms]


def test_one_vm_per_step_then_the_file_holds_them_all(host: Host) -> None:
    host.add("a", 101, seed=1)
    host.add("b", 102, seed=2)
    sk = make(host)
    pause = sk.step()
    # two worker calls of 0.5 s CPU at 5% of a core, and "b" is still due
    assert pause == pytest.approx(2 * WORKER_CPU / 0.05)
    assert names_in_file(sk) == ["a"]
    sk.step()
    got = read_sketch(sk.path, key_id=KEY_ID)
    assert [v.name for v in got.vms] == ["a", "b"]
    assert got.host == "h1"
    assert all(v.group == "blue" and v.pages == 64 for v in got.vms)
    assert [v.started for v in got.vms] == [host.vms["a"].started, host.vms["b"].started]
    assert got.vms[0].zero_pages == 16
    assert os.stat(sk.path).st_mode & 0o777 == 0o600
    assert os.stat(sk.path.parent).st_mode & 0o777 == 0o700
    assert host.opened == ["a", "b"]


def test_nothing_due_waits_for_the_oldest_sketch_or_the_recheck(host: Host) -> None:
    host.add("a", 101)
    sk = make(host, interval=60.0, budget=100.0)
    sk.step()
    host.now += 5
    assert sk.step() == pytest.approx(10.0)      # RECHECK: looks for restarts/departures
    sk2 = make(host, interval=4.0, budget=100.0)
    sk2.step()
    host.now += 1
    assert sk2.step() == pytest.approx(3.0)      # the sketch is due in 3 s
    assert host.opened == ["a", "a"]             # nothing was sketched again meanwhile


def test_budget_stretches_the_pause_when_a_step_costs_more(host: Host) -> None:
    host.add("a", 101)
    sk = make(host, interval=5.0, budget=1.0)
    assert sk.step() == pytest.approx(2 * WORKER_CPU / 0.01)   # 100 s, not 5 s


def test_refreshed_when_older_than_the_interval(host: Host) -> None:
    host.add("a", 101)
    sk = make(host, interval=30.0)
    sk.step()
    first = read_sketch(sk.path).created
    host.now += 29
    sk.step()
    assert host.opened == ["a"]
    host.now += 2
    sk.step()
    assert host.opened == ["a", "a"] and read_sketch(sk.path).created >= first


def test_a_restarted_vm_is_sketched_again_at_once(host: Host) -> None:
    host.add("a", 101)
    sk = make(host)
    sk.step()
    host.add("a", 101, seed=9)            # same pid, another process (start ticks)
    host.vms["a"] = Running("a", (101, 5555), 1_700_009_999)
    host.now += 1
    sk.step()
    assert host.opened == ["a", "a"]
    assert read_sketch(sk.path).vms[0].started == 1_700_009_999


def test_a_vm_gone_leaves_the_host_sketch(host: Host) -> None:
    host.add("a", 101)
    host.add("b", 102)
    sk = make(host)
    sk.step()
    sk.step()
    del host.vms["a"]
    sk.step()
    assert names_in_file(sk) == ["b"]
    del host.vms["b"]
    sk.step()
    assert names_in_file(sk) == []        # an empty host is a placement target too


def test_no_key_one_line_then_it_resumes(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    (host.tmp / "sketch.key").unlink()
    host.add("a", 101)
    sk = make(host, interval=60.0)
    with caplog.at_level(logging.INFO, "vmshare.daemon.sketcher"):
        assert sk.step() == 10.0
        sk.step()
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "sketch.key" in errors[0].getMessage()
        assert not sk.path.exists() and host.opened == []
        write_key(host.tmp)
        sk.step()
    assert names_in_file(sk) == ["a"]
    assert any("sketching resumes" in r.getMessage() for r in caplog.records)


def test_unsafe_dir_one_line_and_retried(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.add("a", 101)
    host.add("b", 102)
    d = host.tmp / "sketches"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    sk = make(host)
    with caplog.at_level(logging.ERROR, "vmshare.daemon.sketcher"):
        sk.step()
        sk.step()
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and "0755" in errors[0]
    assert sorted(sk.held) == ["a", "b"] and not sk.path.exists()
    d.chmod(0o700)
    sk.step()                             # nothing due: the held sketches are written
    assert names_in_file(sk) == ["a", "b"]


def test_an_unreadable_vm_is_left_out_and_not_retried_at_once(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.add("a", 101)
    host.add("b", 102)
    host.refuse.add("a")
    sk = make(host, interval=60.0)
    with caplog.at_level(logging.ERROR, "vmshare.daemon.sketcher"):
        for _ in range(4):
            sk.step()
    assert host.opened == ["a", "b"]
    assert names_in_file(sk) == ["b"]
    assert len(caplog.records) == 1 and "permission denied" in caplog.records[0].getMessage()
    host.refuse.clear()
    host.now += 61
    sk.step()
    assert names_in_file(sk) == ["a", "b"]


def test_listing_fails_logged_once_and_the_file_kept(host: Host,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    host.add("a", 101)
    sk = make(host)
    sk.step()
    host.list_fails = True
    with caplog.at_level(logging.ERROR, "vmshare.daemon.sketcher"):
        sk.step()
        sk.step()
    assert len(caplog.records) == 1 and "connection lost" in caplog.records[0].getMessage()
    assert names_in_file(sk) == ["a"]


def test_interval_zero_is_refused(host: Host) -> None:
    with pytest.raises(ValueError):
        make(host, interval=0.0)


def test_budget_pause() -> None:
    assert budget_pause(0.3, 0.1) == pytest.approx(3.0)
    assert budget_pause(0.3, 0.1, due_in=7.0) == 7.0
    assert budget_pause(-1.0, 0.5) == 0.0
    with pytest.raises(ValueError):
        budget_pause(1.0, 0.0)


def test_paced_thread_survives_a_failing_step() -> None:
    calls: list[int] = []
    done = threading.Event()

    def step() -> float:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        done.set()
        return 60.0

    pacer = PacedThread(step, name="test-pacer", on_error=0.01)
    pacer.start()
    assert done.wait(5)
    assert pacer.alive() and pacer.errors == 1
    pacer.stop()
    assert not pacer.alive()


def test_rate_and_cap_come_from_the_settings(host: Host) -> None:
    from dataclasses import replace

    from vmshare.records.sketchfile import rate_threshold
    host.add("a", 101, pages=4096, seed=7)    # random pages: ~4,000 distinct contents
    wide = Sketcher(replace(settings(host.tmp), rate=1.0, max_entries=1 << 20), host="h1",
                    running=host.running, opener=host.opener, clock=lambda: host.now,
                    cpu_clock=lambda: 0.0)
    wide.step()
    full = read_sketch(wide.path, key_id=KEY_ID)
    assert full.threshold == rate_threshold(1.0) == full.effective
    distinct = full.vms[0].values.size + full.vms[0].heavy_values.size
    assert distinct > 2048
    capped = Sketcher(replace(settings(host.tmp), rate=1 / 2, max_entries=1024), host="h1",
                      running=host.running, opener=host.opener, clock=lambda: host.now,
                      cpu_clock=lambda: 0.0)
    capped.step()
    sk = read_sketch(capped.path, key_id=KEY_ID)
    assert sk.threshold == rate_threshold(1 / 2)
    assert sk.vms[0].values.size <= 1024 and sk.effective < sk.threshold   # the cap cut it
