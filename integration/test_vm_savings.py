"""Issue 2 end to end: real libvirtd, real TCG guests, real kernel KSM.

Two guests hold a known identical region; enabling them merges pages, the
per-VM fair shares add up to the host's pages_sharing, `shares_with` matches
the identical region, and `disable` really unmerges one guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.domains import destroy_by_uuid, domain_name
from integration.ksm_fixtures import converge, kernel_ksm
from vmshare.cli.main import main
from vmshare.guest import FillSpec, GuestImage, domain_xml, qemu_argv, wait_ready
from vmshare.hypervisor.metadata import adopted_element
from vmshare.ksm.sysfs import KsmSysfs

__all__ = ["kernel_ksm"]
pytestmark = pytest.mark.integration

MIB = 2**20
MEMORY_MIB = 384
SPEC = FillSpec(identical_mib=224, unique_mib=32, zero_mib=0, seed=11)
NAMES = (domain_name("ksm-a"), domain_name("ksm-b"))
REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def status(capsys: pytest.CaptureFixture[str], *names: str,
           options: tuple[str, ...] = ()) -> dict[str, Any]:
    code, out, err = run_cli(capsys, *options, "status", "--json", *names)
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


@pytest.fixture(scope="module")
def two_guests(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[str, str]]:
    """Two running libvirt guests with the same identical region; destroyed by the
    UUID createXML gave (module scope: transient_domains is per test)."""
    image: GuestImage = request.getfixturevalue("guest_image")
    conn = request.getfixturevalue("libvirt_conn")
    logdir = tmp_path_factory.mktemp("consoles")
    uuids = []
    try:
        for name in NAMES:
            # adopted (<nosharepages/>: QEMU mem-merge=off), so that disable
            # can make the whole QEMU unmergeable
            dom = conn.createXML(domain_xml(name, image, SPEC, memory_mib=MEMORY_MIB,
                                            console_log=logdir / f"{name}.log",
                                            nosharepages=True,
                                            metadata_xml=adopted_element()), 0)
            uuids.append(dom.UUIDString())
        for name in NAMES:
            wait_ready(logdir / f"{name}.log", timeout=180)
        yield NAMES
    finally:
        for uuid in uuids:
            destroy_by_uuid(uuid)


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {vm["name"]: vm for vm in doc["vms"]}


def test_enable_merge_attribution_and_disable(two_guests: tuple[str, str],
                                              kernel_ksm: KsmSysfs,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_guests
    for name in (a, b):
        code, out, err = run_cli(capsys, "enable", name)
        assert code == 0, err
        assert "verified" in out
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and a in out and "pc.ram" in out
    converge(kernel_ksm, timeout=240)
    doc = status(capsys, a, b)
    vms = by_name(doc)
    sharing = doc["host"]["pages_sharing"]
    saved = vms[a]["saved_bytes"] + vms[b]["saved_bytes"]
    assert sharing > SPEC.identical_mib * 256 * 0.9
    # Per-VM fair shares add up to the host's figure (nothing else merges here).
    assert saved == pytest.approx(sharing * 4096, rel=0.01)
    # What they share with each other is the identical region, within 10%.
    identical = SPEC.identical_mib * MIB
    assert vms[a]["shares_with"][b] == pytest.approx(identical, rel=0.10)
    assert vms[b]["shares_with"][a] == pytest.approx(identical, rel=0.10)
    for name in (a, b):
        assert vms[name]["ram_bytes"] == MEMORY_MIB * MIB
        assert vms[name]["backends"][0]["mg"] is True
        assert vms[name]["ksm_pages"] >= SPEC.identical_mib * 256 * 0.95
    code, out, _ = run_cli(capsys, "status", "--matrix", a, b)
    assert code == 0 and "SHARES WITH" in out

    # disable b: its mg flag goes, its KSM pages go to 0, a's saving falls.
    code, out, err = run_cli(capsys, "disable", b)
    assert code == 0, err
    assert "merge on -> off (verified)" in out
    # recorded in this test's own audit log (conftest's VMSHARE_AUDIT_LOG), not the host's
    audit = Path(os.environ["VMSHARE_AUDIT_LOG"])
    assert not audit.is_relative_to("/var/log")
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["vm"], r["before"], r["after"]) for r in records][-1] == (b, True, False)
    assert {r["vm"] for r in records} <= {a, b}
    after = by_name(status(capsys, a, b))
    assert after[b]["backends"][0]["mg"] is False
    assert after[b]["backends"][0]["merge"] is False
    assert after[b]["ksm_pages"] == 0
    assert after[b]["saved_bytes"] == 0
    assert after[a]["shares_with"] == {}
    assert after[a]["saved_bytes"] < vms[a]["saved_bytes"] - identical * 0.4


def test_plain_qemu_over_qmp(guest_image: GuestImage, kernel_ksm: KsmSysfs,
                             qemu_launcher: Callable[[list[str]], Any], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    spec = FillSpec(identical_mib=96, unique_mib=16, seed=5)
    socks, logs = [], []
    for i in range(2):
        sock, log = tmp_path / f"q{i}.qmp", tmp_path / f"q{i}.log"
        argv = qemu_argv(guest_image, spec, memory_mib=256, qmp_socket=sock,
                         console_log=log, name=domain_name(f"qmp-{i}"))
        if i == 0:   # mem-merge=off: nothing mergeable until vmshare enables the RAM
            argv[argv.index("-machine") + 1] += ",mem-merge=off"   # (q1: QEMU's default)
        qemu_launcher(argv)
        socks.append(sock)
        logs.append(log)
    for log in logs:
        wait_ready(log, timeout=180)
    code, out, err = run_cli(capsys, "--qmp", str(socks[0]), "disable", domain_name("qmp-0"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "--qmp", str(socks[0]), "enable", domain_name("qmp-0"))
    assert code == 0, err
    assert "merge off -> on (verified)" in out
    converge(kernel_ksm, timeout=240)
    docs = [status(capsys, options=("--qmp", str(s))) for s in socks]
    for doc in docs:
        (vm,) = doc["vms"]
        assert vm["ksm_pages"] >= spec.identical_mib * 256 * 0.95
        assert vm["saved_bytes"] >= spec.identical_mib * MIB * 0.45


# ------------------------------------------------------------------ bad input
def vmshare(*args: str, env: dict[str, str] | None = None,
            preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmshare", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})},
                          preexec_fn=preexec, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmshare: error: ")
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]


def test_bad_input_is_one_line_and_changes_nothing(kernel_ksm: KsmSysfs, tmp_path: Path,
                                                   libvirt_conn: Any) -> None:
    before = kernel_ksm.knobs()
    assert_one_line_error(vmshare("enable", "no-such-domain-xyz"), "no-such-domain-xyz")
    assert_one_line_error(vmshare("ksm", "set", "pages_to_scan=-5"), "pages_to_scan")
    assert_one_line_error(vmshare("ksm", "set", "max_page_sharing=1"), "max_page_sharing")
    assert_one_line_error(vmshare("ksm", "set", "pages_to_scan=10", "run=7"), "run")
    assert_one_line_error(vmshare("ksm", "set", "bogus_knob=1"), "bogus_knob")
    empty = tmp_path / "no-ksm"
    empty.mkdir()
    assert_one_line_error(vmshare("ksm", "show", env={"VMSHARE_SYSFS_ROOT": str(empty)}),
                          "KSM is not available")

    def drop_root() -> None:
        os.setgid(65534)
        os.setuid(65534)

    assert_one_line_error(vmshare("ksm", "set", "pages_to_scan=123", preexec=drop_root),
                          "permission denied")
    # A domain that exists but is not running.
    name = domain_name("stopped")
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")
    dom = libvirt_conn.defineXML(xml)
    try:
        assert_one_line_error(vmshare("enable", name), "not running")
    finally:
        dom.undefine()
    assert kernel_ksm.knobs() == before
