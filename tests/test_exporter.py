"""The exporter's snapshot: collected in the background within a CPU budget, served
without measuring, partial when a part fails, written as a node_exporter textfile."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ksmtree import make_sysfs
from vmshare.cli.metrics import write_textfile
from vmshare.config import Config
from vmshare.daemon.exporter import SnapshotSource
from vmshare.daemon.metrics_http import serve
from vmshare.errors import HypervisorError, UsageError
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.model import VmRef
from vmshare.observe.host import HostView
from vmshare.present.metrics import Refresher, Snapshot, SnapshotCollector, exposition


def snap(sharing: int = 8, **kw: object) -> Snapshot:
    host = HostView(counters={"pages_sharing": sharing, "full_scans": 1}, knobs={"run": 1},
                    vms=())
    return Snapshot(host=host, taken_at=kw.pop("taken_at", 1000.0), **kw)  # type: ignore[arg-type]


def test_age_comes_from_the_clock_and_errors_are_counted() -> None:
    text = exposition(snap(errors=("VMs: libvirt is down",)), clock=lambda: 1012.5)
    lines = text.splitlines()
    assert "vmshare_snapshot_age_seconds 12.5" in lines
    assert "vmshare_scrape_errors 1.0" in lines
    assert "vmshare_ksm_saved_bytes 32768.0" in lines


def test_no_snapshot_yet_is_an_error_not_an_empty_page() -> None:
    assert exposition(None).splitlines()[-1] == "vmshare_scrape_errors 1.0"


def test_refresh_waits_longer_when_a_collection_is_expensive() -> None:
    def burn() -> Snapshot:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        return snap()

    r = Refresher(burn, interval=1.0, cpu_budget=0.01)
    wait = r.refresh()
    latest = r.latest()
    assert latest is not None and latest.cpu_seconds >= 0.05
    assert wait >= latest.cpu_seconds / 0.01 >= 5.0      # 50 ms at 1% of a core: 5 s
    cheap = Refresher(snap, interval=1.0, cpu_budget=0.01)
    assert cheap.refresh() == 1.0


def test_a_failing_collection_keeps_the_last_snapshot_and_the_loop() -> None:
    calls = {"n": 0}

    def flaky() -> Snapshot:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return snap(sharing=calls["n"])

    r = Refresher(flaky, interval=0.01)
    r.start()
    try:
        deadline = time.monotonic() + 5
        while calls["n"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        r.stop()
    assert calls["n"] >= 4 and r.failures == 1
    latest = r.latest()
    assert latest is not None and latest.host is not None
    assert latest.host.counters["pages_sharing"] >= 3


def test_scrapes_do_not_collect() -> None:
    taken = {"n": 0}

    def take() -> Snapshot:
        taken["n"] += 1
        return snap()

    r = Refresher(take, interval=3600)
    r.start()
    server = serve("127.0.0.1:0", lambda: exposition(r.latest()))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        for _ in range(20):
            with urllib.request.urlopen(server.url, timeout=5) as reply:
                assert b"vmshare_ksm_pages_sharing 8.0" in reply.read()
    finally:
        server.shutdown()
        server.server_close()
        r.stop()
    assert taken["n"] == 1


class DownHypervisor:
    uri = "test:///down"

    def list_vms(self) -> list[VmRef]:
        raise HypervisorError("cannot connect to libvirtd")

    def __getattr__(self, name: str) -> object:
        raise HypervisorError("cannot connect to libvirtd")


def test_libvirt_down_still_serves_the_kernel_counters(tmp_path: Path) -> None:
    sysfs = KsmSysfs(make_sysfs(tmp_path / "ksm"))
    (tmp_path / "proc").mkdir()
    source = SnapshotSource(DownHypervisor(), sysfs, ProcFs(tmp_path / "proc"),  # type: ignore[arg-type]
                            Config(path=None))
    s = source()
    assert s.host is not None and s.host.vms == () and s.host.ksm_available
    assert any(e.startswith("VMs: cannot connect") for e in s.errors)
    text = exposition(s)
    assert "vmshare_ksm_pages_sharing" in text
    assert f"vmshare_scrape_errors {float(len(s.errors))}" in text.splitlines()


def test_textfile_is_written_whole_and_bad_targets_refused(tmp_path: Path) -> None:
    target = write_textfile(tmp_path, "vmshare_x 1\n")
    assert target == tmp_path / "vmshare.prom" and target.read_text() == "vmshare_x 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmshare.prom"]
    with pytest.raises(UsageError, match="not a directory"):
        write_textfile(tmp_path / "vmshare.prom", "x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "vmshare.prom").mkdir()
    with pytest.raises(UsageError, match="not a regular file"):
        write_textfile(tmp_path / "d", "x")


def test_collector_is_a_prometheus_client_collector() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap()))
    assert b"vmshare_ksm_full_scans_total 1.0" in generate_latest(registry)


def test_the_daemons_own_figures_are_counters_by_kind() -> None:
    from vmshare.present.metrics import DaemonFigures
    text = exposition(snap(daemon=DaemonFigures({"spool_entry": 3, "datagram": 1},
                                                {"periodic": 2})))
    lines = text.splitlines()
    assert 'vmshare_daemon_bad_inputs_total{kind="spool_entry"} 3.0' in lines
    assert 'vmshare_daemon_bad_inputs_total{kind="datagram"} 1.0' in lines
    assert 'vmshare_daemon_task_deaths_total{task="periodic"} 2.0' in lines
    assert "vmshare_daemon_bad_inputs" not in exposition(snap())


def test_a_snapshot_measured_where_it_was_taken_keeps_its_figures() -> None:
    r = Refresher(lambda: snap(duration=2.0, cpu_seconds=0.5), interval=1.0, cpu_budget=0.1,
                  take_measures=True)
    assert r.refresh() == 5.0           # 0.5 s of CPU at 10% of a core
    latest = r.latest()
    assert latest is not None and latest.duration == 2.0 and latest.cpu_seconds == 0.5
    # otherwise the Refresher measures around ``take`` (here: next to nothing)
    plain = Refresher(lambda: snap(duration=2.0, cpu_seconds=0.5), interval=1.0)
    plain.refresh()
    mine = plain.latest()
    assert mine is not None and mine.duration < 1.0 and mine.cpu_seconds < 0.5


def test_every_daemon_setting_is_a_config_key(tmp_path: Path) -> None:
    from dataclasses import fields

    from vmshare.config import DaemonSettings, load_config
    from vmshare.errors import PolicyError
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nmetrics_listen = "127.0.0.1:9731"\nmetrics_interval = 5\n')
    assert load_config(cfg).daemon.metrics_listen == "127.0.0.1:9731"
    assert {f.name for f in fields(DaemonSettings)} >= {"metrics_listen", "metrics_cpu_budget"}
    cfg.write_text("[daemon]\nmetrics_intervall = 5\n")
    with pytest.raises(PolicyError, match="did you mean metrics_interval"):
        load_config(cfg)
    cfg.write_text("[daemon]\nmetrics_cpu_budget = 0\n")
    with pytest.raises(PolicyError, match="metrics_cpu_budget must be"):
        load_config(cfg)


def test_a_vm_mergeable_only_outside_its_ram_backends_counts_as_mergeable() -> None:
    from vmshare.model import Vma, VmFacts
    from vmshare.observe.host import VmView
    ref = VmRef("web-1", "11111111-1111-1111-1111-111111111111", 1, True)
    rom = Vma(0x7F0000000000, 0x7F0000040000, "rw-p", 0, "")
    host = HostView(counters={"pages_sharing": 0}, knobs={}, vms=(
        VmView(facts=VmFacts(ref=ref, pid=100), other_mergeable=(rom,)),
        VmView(facts=VmFacts(ref=VmRef("web-2", "2" * 32, 2, True), pid=200))))
    lines = exposition(Snapshot(host=host, taken_at=1000.0), clock=lambda: 1000.0).splitlines()
    assert ('vmshare_vm_mergeable{domain="web-1",trust_group="",'
            'uuid="11111111-1111-1111-1111-111111111111"} 1.0') in lines
    assert any(line.startswith('vmshare_vm_mergeable{domain="web-2"') and line.endswith(" 0.0")
               for line in lines)

