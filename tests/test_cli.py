"""CLI output against golden files, and enable/disable flows, on fakes.

Regenerate the golden files after an intended change with
VMSHARE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_cli.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakes.hypervisor import FakeHypervisor, FakeVm
from tests.ksmtree import EXCLUSIVE, KPF_KSM, PRESENT, FakeProc, make_sysfs
from vmshare.cli import main as cli
from vmshare.model import RamBackend, VmFacts, VmRef

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

    def flip(pid: int) -> Callable[[str, bool], None]:
        """The kernel side of qom-set: the mg flag follows."""
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


_updated: list[str] = []   # golden files rewritten by this run (VMSHARE_UPDATE_GOLDEN)


def golden(name: str, text: str) -> None:
    """Compare ``text`` with the golden file ``name``. With VMSHARE_UPDATE_GOLDEN
    set, rewrite the file instead and fail all the same, so that an update run
    never passes; refused when CI is set (CI only ever checks)."""
    path = GOLDEN / name
    if os.environ.get("VMSHARE_UPDATE_GOLDEN"):
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail("VMSHARE_UPDATE_GOLDEN is set under CI: golden files are checked in "
                        "CI, never rewritten; unset it", pytrace=False)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            _updated.append(name)
            pytest.fail(f"updated {path} ({len(_updated)} golden files updated in this run); "
                        "rerun without VMSHARE_UPDATE_GOLDEN", pytrace=False)
        pytest.fail(f"{path} already matches; rerun without VMSHARE_UPDATE_GOLDEN",
                    pytrace=False)
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


def test_qemu_keeping_its_merge_property_is_an_error_not_a_success(
        host: tuple[FakeHypervisor, FakeProc], capsys: pytest.CaptureFixture[str]) -> None:
    hv, _ = host
    hv.vms["web-2"].disagree = "property"    # qom-set accepted, merge stays on
    code, out, err = run(capsys, "disable", "web-2")
    assert (code, out) == (1, "")
    assert err == ("vmshare: error: web-2: merge state not as asked after the change: "
                   "pc.ram: QEMU reports merge=true\n")
    assert hv.calls == [("web-2", "pc.ram", False)]


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


def add_ksmd(root: Path, pid: int = 77, ticks: int = 250) -> None:
    """A ksmd kernel thread in a fake /proc: comm, and stat with utime+stime."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "comm").write_text("ksmd\n")
    fields = ["S", "2"] + ["0"] * 9 + [str(ticks), "0"] + ["0"] * 6 + ["12345"] + ["0"] * 30
    (d / "stat").write_text(f"{pid} (ksmd) " + " ".join(fields) + "\n")


SNAPSHOT_LINE = re.compile(r"^(vmshare_snapshot_\w+) \S+$", re.M)


def test_metrics_exposition(host: tuple[FakeHypervisor, FakeProc],
                            capsys: pytest.CaptureFixture[str]) -> None:
    add_ksmd(host[1].root)
    code, out, err = run(capsys, "metrics")
    assert code == 0, err
    # the snapshot's age and cost are measured: the golden file holds their names
    golden("metrics.txt", SNAPSHOT_LINE.sub(r"\1 <measured>", out))
    lines = out.splitlines()
    web1 = 'domain="web-1",trust_group="default",uuid="11111111-1111-1111-1111-111111111111"'
    assert f"vmshare_vm_saved_bytes{{{web1}}} 16384.0" in lines
    assert f"vmshare_vm_mergeable{{{web1}}} 1.0" in lines
    assert "vmshare_ksm_pages_sharing 8.0" in lines
    assert "vmshare_ksm_saved_bytes 32768.0" in lines
    assert "vmshare_ksm_full_scans_total 3.0" in lines
    assert "vmshare_ksmd_cpu_seconds_total 2.5" in lines
    assert "vmshare_scrape_errors 0.0" in lines
    assert "vmshare_ksm_tuner_running 0.0" in lines
    promtool = shutil.which("promtool")
    if promtool is not None:     # setup installs it; the unit tests also run without it
        lint = subprocess.run([promtool, "check", "metrics"], input=out, capture_output=True,
                              text=True, timeout=60)
        assert lint.returncode == 0 and not lint.stdout + lint.stderr, lint.stdout + lint.stderr
    from vmshare.tuner.loop import tuner_lock
    with tuner_lock():
        code, held, _ = run(capsys, "metrics")
    assert code == 0 and "vmshare_ksm_tuner_running 1.0" in held.splitlines()
    # every sample's family has HELP and TYPE lines (counters' samples end in _total)
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
            assert name and {name.group(0), name.group(0).removesuffix("_total")} & families, line


def test_metrics_without_ksmd_serves_the_rest_and_counts_the_error(
        host: object, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "metrics")
    assert code == 0
    assert "vmshare_scrape_errors 1.0" in out.splitlines()
    assert "vmshare_ksm_pages_sharing 8.0" in out.splitlines()
    assert "vmshare_ksmd_cpu_seconds_total" not in out


def test_metrics_listen_bad_address(host: object, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "metrics", "--listen", "nonsense")
    assert code == 2 and "HOST:PORT" in err


def test_history_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from vmshare.records.history_db import HistoryDb
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\n')
    code, out, _ = run(capsys, "history", "--config", str(cfg))
    assert code == 0 and out.startswith("no history in")
    store = HistoryDb.open_writer(tmp_path / "h.sqlite")
    for i in range(30):
        store.append({"time": 1_700_000_000.0 + 60 * i,
                      "host": {"pages_sharing": 256 * i},
                      "vms": {"web-1": {"saved_bytes": 2**20 * i // 2, "ksm_pages": i}}})
    code, out, _ = run(capsys, "history", "--config", str(cfg), "--rows", "5")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"30 samples over 0.5 h from {tmp_path}/h.sqlite (raw samples)"
    assert "now 29.0 MiB, min 0.0 KiB, max 29.0 MiB" in lines[1]
    assert "now 14.5 MiB" in lines[2] and "web-1" in lines[2]
    assert lines[-1].split()[-4:] == ["29.0", "MiB", "14.5", "MiB"]   # the last sample
    assert len([ln for ln in lines if ln.startswith("2023-")]) == 5
    code, _, err = run(capsys, "history", "nope", "--config", str(cfg))
    assert code == 2 and "no history for 'nope'" in err
    code, _, err = run(capsys, "history", "--since", "soon", "--config", str(cfg))
    assert code == 2 and "--since" in err
    code, out, _ = run(capsys, "history", "--json", "--config", str(cfg))
    doc = json.loads(out)
    assert len(doc["samples"]) == 30 and doc["resolution"] == "raw" and doc["lacks"] is None
    code, out, _ = run(capsys, "history", "--json", "--resolution", "5m", "--config", str(cfg))
    doc = json.loads(out)
    assert doc["resolution_seconds"] == 300 and sum(s["n"] for s in doc["samples"]) == 30


def test_html_report(host: tuple[FakeHypervisor, FakeProc], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    from html.parser import HTMLParser

    hv, _ = host
    hv.vms["web-1"].ref = VmRef('<script>alert(1)</script>', hv.vms["web-1"].ref.uuid, 1, True)
    hv.vms['<script>alert(1)</script>'] = hv.vms.pop("web-1")
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\n')
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


VRAM = ("7e0000000000-7e0001000000 rw-p 00000000 00:00 0 \nSize: 16384 kB\n"
        "Rss: 8 kB\nVmFlags: rd wr mr mw me ac mg\n")


def test_vram_left_mergeable_is_shown_and_disable_fails_naming_the_fix(
        host: tuple[FakeHypervisor, FakeProc], capsys: pytest.CaptureFixture[str]) -> None:
    hv, fake = host
    smaps_path = fake.root / "200" / "smaps"
    kernel_side = hv.vms["web-2"].on_set_merge
    assert kernel_side is not None

    def keep_vram(backend_id: str, merge: bool) -> None:   # mem-merge=on: VRAM stays mg
        kernel_side(backend_id, merge)
        smaps_path.write_text(smaps_path.read_text() + VRAM)

    hv.vms["web-2"].on_set_merge = keep_vram
    smaps_path.write_text(smaps_path.read_text() + VRAM)
    code, out, err = run(capsys, "disable", "web-2")
    assert code == 1
    assert out == "web-2/pc.ram: merge on -> off (verified)\n"
    assert err == ("vmshare: error: web-2: not fully unmergeable: 16,384 KiB in 1 mapping(s) "
                   "of QEMU process 200 outside its RAM backends stay mergeable (QEMU's "
                   "mem-merge=on: VRAM, ROMs); bring the domain to <nosharepages/> with "
                   "'vmshare policy adopt web-2' (a plain QEMU: -machine mem-merge=off) and "
                   "restart the guest (mem-merge is a QEMU start option)\n")
    code, out, _ = run(capsys, "list")
    (row,) = [line for line in out.splitlines() if "(other)" in line]
    assert row.split()[:7] == ["web-2", "running", "(other)", "non-RAM", "16.0", "MiB", "-"]
    code, out, _ = run(capsys, "list", "--json")
    web2 = next(v for v in json.loads(out)["vms"] if v["name"] == "web-2")
    assert (web2["unmergeable"], web2["other_mergeable_bytes"]) == (False, 16 * 2**20)
    web1 = next(v for v in json.loads(out)["vms"] if v["name"] == "web-1")
    assert (web1["unmergeable"], web1["other_mergeable_bytes"]) == (False, 0)
    code, out, _ = run(capsys, "status")
    assert "partial" in next(line for line in out.splitlines() if line.startswith("web-2"))
    assert "warning: web-2: not fully unmergeable: 16,384 KiB" in out
    code, out, _ = run(capsys, "status", "--json", "web-2")
    assert json.loads(out)["vms"][0]["other_mergeable_bytes"] == 16 * 2**20


def test_list_leaves_out_a_domain_that_vanishes_while_listing(
        host: tuple[FakeHypervisor, FakeProc], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vmshare.errors import DomainNotFound
    hv = host[0]
    real = hv.facts

    def facts(ref: VmRef) -> VmFacts:
        if ref.name == "web-2":
            raise DomainNotFound("no domain web-2")
        return real(ref)

    monkeypatch.setattr(hv, "facts", facts)
    code, out, err = run(capsys, "list", "--json")
    assert code == 0, err
    names = [v["name"] for v in json.loads(out)["vms"]]
    assert "web-2" not in names and {"web-1", "db-secret", "idle"} <= set(names)
