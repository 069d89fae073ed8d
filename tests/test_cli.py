"""CLI output against golden files, and enable/disable flows, on fakes.

Regenerate the golden files after an intended change with
VMSHARE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_cli.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fakes.hypervisor import FakeHypervisor, FakeVm
from tests.ksmtree import EXCLUSIVE, KPF_KSM, PRESENT, FakeProc, make_sysfs
from vmshare.cli import main as cli
from vmshare.model import RamBackend, VmRef

GOLDEN = Path(__file__).parent / "golden"
BASE = 0x7F0000000000
PAGES = 16


def smaps(merge: bool, size_pages: int = PAGES) -> str:
    end = BASE + size_pages * 4096
    flags = "rd wr mr mw me ac dc hg" + (" mg" if merge else "")
    return (f"{BASE:x}-{end:x} rw-p 00000000 00:00 0 \nSize: {size_pages * 4} kB\n"
            f"Rss: {size_pages * 4} kB\nAnonHugePages: 0 kB\nVmFlags: {flags}\n"
            "55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64\n"
            "Size: 1024 kB\nVmFlags: rd ex mr mw me\n")


KSM_STAT = ("ksm_rmap_items 16\nksm_zero_pages 0\nksm_merging_pages 8\n"
            "ksm_process_profit 32000\nksm_merge_any no\nksm_mergeable yes\n")


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeHypervisor, FakeProc]:
    """Two running VMs sharing 8 KSM pages (k=2), one stopped VM, one nosharepages VM."""
    fake = FakeProc(tmp_path / "proc")
    for pfn in range(100, 108):
        fake.flags[pfn] = KPF_KSM
        fake.counts[pfn] = 2
    fake.flush()
    own = [PRESENT | EXCLUSIVE | (1000 + i) for i in range(8)]
    fake.add_process(100, BASE, [PRESENT | p for p in range(100, 108)] + own, smaps(True),
                     KSM_STAT)
    own2 = [PRESENT | EXCLUSIVE | (2000 + i) for i in range(8)]
    fake.add_process(200, BASE, [PRESENT | p for p in range(100, 108)] + own2, smaps(True),
                     KSM_STAT)
    fake.add_process(300, BASE, [PRESENT | EXCLUSIVE | (3000 + i) for i in range(PAGES)],
                     smaps(False), "")
    ram = RamBackend("pc.ram", PAGES * 4096, merge=True)

    def flip(pid: int):  # the kernel side of qom-set: the mg flag follows
        def on_set(backend_id: str, merge: bool) -> None:
            (fake.root / str(pid) / "smaps").write_text(smaps(merge))
            if not merge:   # unmerging breaks KSM pages into private copies
                fake.add_process(pid, BASE, [PRESENT | EXCLUSIVE | (5000 + pid + i)
                                             for i in range(PAGES)], smaps(False), "")
        return on_set

    hv = FakeHypervisor([
        FakeVm(VmRef("web-1", "11111111-1111-1111-1111-111111111111", 1, True), 100, [ram],
               on_set_merge=flip(100)),
        FakeVm(VmRef("web-2", "22222222-2222-2222-2222-222222222222", 2, True), 200, [ram],
               on_set_merge=flip(200)),
        FakeVm(VmRef("db-secret", "33333333-3333-3333-3333-333333333333", 3, True), 300,
               [RamBackend("pc.ram", PAGES * 4096, merge=False)], nosharepages=True),
        FakeVm(VmRef("idle", "44444444-4444-4444-4444-444444444444", None, False), None),
    ])
    sysfs = make_sysfs(tmp_path / "ksm")
    (sysfs / "pages_shared").write_text("8\n")
    (sysfs / "pages_sharing").write_text("8\n")
    monkeypatch.setenv("VMSHARE_SYSFS_ROOT", str(sysfs))
    monkeypatch.setenv("VMSHARE_PROC_ROOT", str(fake.root))
    monkeypatch.setenv("VMSHARE_TUNER_LOCK", str(tmp_path / "tuner.lock"))
    # enable/disable audit and obey the config: never the host's own
    monkeypatch.setenv("VMSHARE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv("VMSHARE_CONFIG", str(tmp_path / "vmshare.toml"))
    monkeypatch.setattr("vmshare.hypervisor.connect", lambda *a, **k: hv)
    return hv, fake


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("VMSHARE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"output differs from {path}"


@pytest.mark.parametrize("args,name", [
    (["status"], "status.txt"),
    (["status", "--matrix"], "status-matrix.txt"),
    (["list"], "list.txt"),
    (["ksm", "show"], "ksm-show.txt"),
])
def test_golden_output(host: object, capsys: pytest.CaptureFixture[str], args: list[str],
                       name: str) -> None:
    code, out, err = run(capsys, *args)
    assert code == 0, err
    golden(name, out)


def test_ksm_show_names_the_tuner_holding_the_knobs(host: object,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from vmshare.tuner.loop import tuner_lock
    with tuner_lock():
        code, out, _ = run(capsys, "ksm", "show")
        assert code == 0 and out.splitlines()[-1] == (
            f"tuner: a vmshare tuner (pid {os.getpid()}) owns run, pages_to_scan, "
            "sleep_millisecs")
        code, out, _ = run(capsys, "ksm", "show", "--json")
        assert json.loads(out)["tuner_pid"] == os.getpid()
    code, out, _ = run(capsys, "ksm", "show", "--json")
    assert json.loads(out)["tuner_pid"] is None


def test_status_json_adds_up(host: object, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["host"]["pages_sharing"] == 8
    vms = {v["name"]: v for v in doc["vms"]}
    assert vms["web-1"]["saved_bytes"] + vms["web-2"]["saved_bytes"] == 8 * 4096
    assert vms["web-1"]["shares_with"] == {"web-2": 8 * 4096}
    assert vms["web-1"]["ksm_pages"] == 8 and vms["web-1"]["rmap_items"] == 16
    assert vms["db-secret"]["eligible"] is False
    assert vms["idle"]["running"] is False and vms["idle"]["pid"] is None
    for key in ("name", "uuid", "pid", "ram_bytes", "ksm_pages", "saved_bytes", "zero_pages",
                "rmap_items", "process_profit_bytes", "shares_with"):
        assert key in vms["web-1"]


def test_disable_then_enable_verified(host: tuple[FakeHypervisor, FakeProc],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    hv, _ = host
    code, out, err = run(capsys, "disable", "web-2")
    assert (code, err) == (0, "")
    assert out == "web-2/pc.ram: merge on -> off (verified)\n"
    code, out, _ = run(capsys, "enable", "web-2")
    assert out == "web-2/pc.ram: merge off -> on (verified)\n"
    code, out, _ = run(capsys, "enable", "web-2")
    assert out == "web-2/pc.ram: merge already on (verified)\n"
    assert hv.calls == [("web-2", "pc.ram", False), ("web-2", "pc.ram", True)]


def test_enable_reads_each_vm_once_before_acting(host: tuple[FakeHypervisor, FakeProc],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    hv, _ = host
    code, _, err = run(capsys, "disable", "web-2")
    assert code == 0, err
    hv.reads.clear()
    code, out, err = run(capsys, "enable", "web-2")
    assert (code, out) == (0, "web-2/pc.ram: merge off -> on (verified)\n"), err
    # The policy survey reads every VM once; the change reuses what it read of
    # web-2, whose backends are read once more only to verify the change.
    assert hv.reads == {("facts", "web-1"): 1, ("facts", "web-2"): 1,
                        ("facts", "db-secret"): 1, ("facts", "idle"): 1,
                        ("ram_backends", "web-1"): 1, ("ram_backends", "web-2"): 2,
                        ("ram_backends", "db-secret"): 1}


def test_status_reads_each_vm_once(host: tuple[FakeHypervisor, FakeProc],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    hv, _ = host
    code, _, err = run(capsys, "status")
    assert code == 0, err
    assert set(hv.reads.values()) == {1}
    assert ("facts", "idle") in hv.reads and ("ram_backends", "idle") not in hv.reads


def test_kernel_disagreeing_is_an_error(host: tuple[FakeHypervisor, FakeProc],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    hv, _ = host
    hv.vms["web-1"].on_set_merge = None      # QEMU says merge=off, the mg flag stays
    code, _, err = run(capsys, "disable", "web-1")
    assert code == 1
    assert err == ("vmshare: error: web-1: merge state not as asked after the change: "
                   "pc.ram: the kernel's mg flag is set\n")


def test_unmerge_refused_without_memory(host: tuple[FakeHypervisor, FakeProc],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    hv, fake = host
    (fake.root / "meminfo").write_text("MemTotal: 1000000 kB\nMemAvailable: 1000 kB\n")
    code, _, err = run(capsys, "disable", "web-1")
    assert code == 1 and "MemAvailable" in err and "--force" in err
    assert hv.calls == []
    code, _, err = run(capsys, "disable", "--force", "web-1")
    assert code == 0, err


@pytest.mark.parametrize("args,words", [
    (["enable", "nope"], "no domain named 'nope'"),
    (["enable", "db-secret"], "nosharepages"),
    (["enable", "idle"], "not running"),
    (["enable", "web-1", "--backend", "ram-node9"], "no memory backend 'ram-node9'"),
    (["ksm", "set", "run=9"], "out of range"),
    (["ksm", "set", "merge_across_nodes=0"], "--unmerge"),
    (["ksm", "set", "pages_to_scan"], "expected KNOB=VALUE"),
])
def test_user_mistakes_are_one_line(host: object, capsys: pytest.CaptureFixture[str],
                                    args: list[str], words: str) -> None:
    code, out, err = run(capsys, *args)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("vmshare: error: ") and words in err


def test_metrics_exposition(host: object, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "metrics")
    assert code == 0, err
    golden("metrics.txt", out)
    lines = out.splitlines()
    assert 'vmshare_vm_saved_bytes{vm="web-1",uuid="11111111-1111-1111-1111-111111111111"} ' \
           "16384" in lines
    assert "vmshare_ksm_pages_sharing 8" in lines
    assert "vmshare_ksm_full_scans_total 3" in lines
    assert "vmshare_ksm_tuner_running 0" in lines
    from vmshare.tuner.loop import tuner_lock
    with tuner_lock():
        code, held, _ = run(capsys, "metrics")
    assert code == 0 and "vmshare_ksm_tuner_running 1" in held.splitlines()
    # Every sample's family has HELP and TYPE lines, and names are valid.
    import re
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            assert name and name.group(0) in families, line


def test_metrics_label_escaping() -> None:
    from vmshare.present.metrics import _labels
    assert _labels([("vm", 'a"b\\c\nd')]) == '{vm="a\\"b\\\\c\\nd"}'


def test_metrics_listen_bad_address(host: object, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "metrics", "--listen", "nonsense")
    assert code == 2 and "HOST:PORT" in err


def test_history_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from vmshare.records.history import HistoryStore
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_file = "{tmp_path}/h.jsonl"\n')
    code, out, _ = run(capsys, "history", "--config", str(cfg))
    assert code == 0 and out.startswith("no history in")
    store = HistoryStore(tmp_path / "h.jsonl")
    for i in range(30):
        store.append({"time": 1_700_000_000.0 + 60 * i,
                      "host": {"pages_sharing": 256 * i},
                      "vms": {"web-1": {"saved_bytes": 2**20 * i // 2, "ksm_pages": i}}})
    code, out, _ = run(capsys, "history", "--config", str(cfg), "--rows", "5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("30 samples over 0.5 h")
    assert "now 29.0 MiB, min 0.0 KiB, max 29.0 MiB" in lines[1]
    assert "now 14.5 MiB" in lines[2] and "web-1" in lines[2]
    assert lines[-1].split()[-4:] == ["29.0", "MiB", "14.5", "MiB"]   # the last sample
    assert len([ln for ln in lines if ln.startswith("2023-")]) == 5
    code, _, err = run(capsys, "history", "nope", "--config", str(cfg))
    assert code == 2 and "no history for 'nope'" in err
    code, _, err = run(capsys, "history", "--since", "soon", "--config", str(cfg))
    assert code == 2 and "--since" in err
    code, out, _ = run(capsys, "history", "--json", "--config", str(cfg))
    assert len(json.loads(out)["samples"]) == 30


def test_history_rotates_and_skips_torn_lines(tmp_path: Path) -> None:
    from vmshare.records.history import HistoryStore
    store = HistoryStore(tmp_path / "h.jsonl", max_bytes=400)
    for i in range(20):
        store.append({"time": float(i + 1), "host": {}, "vms": {}})
    assert (tmp_path / "h.jsonl.1").exists()
    assert (tmp_path / "h.jsonl").stat().st_size <= 400
    with open(tmp_path / "h.jsonl", "ab") as f:
        f.write(b'{"time": 99, "ho')
    store.append({"time": 100.0, "host": {}, "vms": {}})
    times = [s["time"] for s in store.read()]
    assert times == sorted(times) and times[-1] == 100.0 and 99 not in times
    assert [s["time"] for s in store.read(since=19.5)] == [20.0, 100.0]


def test_html_report(host: tuple[FakeHypervisor, FakeProc], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    from html.parser import HTMLParser

    hv, _ = host
    hv.vms["web-1"].ref = VmRef('<script>alert(1)</script>', hv.vms["web-1"].ref.uuid, 1, True)
    hv.vms['<script>alert(1)</script>'] = hv.vms.pop("web-1")
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_file = "{tmp_path}/h.jsonl"\n')
    target = tmp_path / "report.html"
    code, out, err = run(capsys, "report", "--html", str(target), "--config", str(cfg))
    assert code == 0, err
    assert out == f"wrote {target} ({target.stat().st_size:,} bytes)\n"   # bytes, not chars
    page = target.read_text()
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("<svg") == 2            # bars and heat map; no history yet
    assert "No history yet" in page
    assert "16.0 KiB" in page                 # web-2's fair share, as status prints it

    class Strict(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: object) -> None:
            if tag not in ("meta", "br", "rect", "line", "polyline"):
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if tag in ("rect", "line", "polyline"):
                return
            assert self.stack.pop() == tag, tag

    parser = Strict()
    parser.feed(page)
    assert parser.stack == []
    code, _, err = run(capsys, "report", "--html", str(tmp_path / "no" / "dir" / "r.html"),
                       "--config", str(cfg))
    assert code == 2 and "cannot write" in err


def test_status_survives_a_vm_vanishing_mid_read(host: tuple[FakeHypervisor, FakeProc],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    _, fake = host
    shutil.rmtree(fake.root / "200")          # web-2's QEMU exited after the listing
    code, out, err = run(capsys, "status", "--json")
    assert code == 0, err
    vms = {v["name"]: v for v in json.loads(out)["vms"]}
    assert vms["web-2"]["pid"] is None and "process 200 is gone" in vms["web-2"]["warnings"][0]
    assert vms["web-1"]["ksm_pages"] == 8
    code, _, err = run(capsys, "status", "web-2")     # named explicitly: an error
    assert code == 1 and "process 200 is gone" in err
