"""An unmergeable VM has no mergeable mapping at all, on real libvirt guests with
a VGA device and real kernel KSM.

Under QEMU's machine default mem-merge=on, turning the RAM backends' ``merge``
off leaves VRAM and the ROMs mergeable; a domain vmshare adopted
(``<nosharepages/>``: QEMU starts with mem-merge=off) has no mergeable
mapping until vmshare turns merging on for its RAM backend, and then exactly
that one. Every check of the kernel's view here reads /proc directly (maps,
smaps, pagemap, kpageflags), independently of vmshare's own accounting.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from integration.daemon_helpers import DaemonProc, wait_for
from integration.ksm_fixtures import converge, kernel_ksm
from vmshare.cli.main import main
from vmshare.guest import FillSpec, GuestImage, domain_xml, wait_ready
from vmshare.ksm.sysfs import KsmSysfs

__all__ = ["kernel_ksm"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

URI = "qemu:///system"
MEMORY_MIB = 256
SPEC = FillSpec(identical_mib=24, unique_mib=8)
KPF_KSM = 1 << 21
PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1
VGA = "<video><model type='vga'/></video>"


# ---------------------------------------------------------------- the kernel's view
def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def mergeable_mappings(pid: int) -> list[tuple[int, int]]:
    """(start, size) of every mapping of ``pid`` whose VmFlags carry ``mg``."""
    found, start, size = [], 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            start, size = int(head[1], 16), int(head[2], 16) - int(head[1], 16)
        elif line.startswith("VmFlags:") and "mg" in line.split()[1:]:
            found.append((start, size))
    return found


def ksm_pfns(pid: int) -> set[int]:
    """PFNs of KSM pages mapped anywhere in ``pid`` (pagemap + kpageflags over
    every mapping in /proc/<pid>/maps)."""
    pfns: list[np.ndarray[Any, np.dtype[np.uint64]]] = []
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo >= 1 << 47:      # [vsyscall]
                continue
            pagemap.seek(lo // 4096 * 8)
            entries = np.frombuffer(pagemap.read((hi - lo) // 4096 * 8), dtype=np.uint64)
            present = entries[(entries & np.uint64(PRESENT)) != 0]
            pfns.append(present & np.uint64(PFN_MASK))
    uniq = np.unique(np.concatenate(pfns)) if pfns else np.zeros(0, dtype=np.uint64)
    out: set[int] = set()
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        for pfn in uniq.tolist():
            if pfn and int.from_bytes(os.pread(fd, 8, pfn * 8), "little") & KPF_KSM:
                out.add(pfn)
    finally:
        os.close(fd)
    return out


# ---------------------------------------------------------------- guests and the CLI
def vmshare(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["-c", URI, *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own audit log and config (never the host's). Trust groups are
    host-wide and other sessions' guests may be mergeable in groups of their
    own, so the guests a test makes mergeable carry ``force``."""
    monkeypatch.setenv("VMSHARE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    config = tmp_path / "vmshare.toml"
    config.write_text('[host]\ndefault_merge = "off"\n')
    monkeypatch.setenv("VMSHARE_CONFIG", str(config))
    return config


Define = Callable[..., list[Any]]
define_prefix = [""]     # the current test's domain name prefix (for a daemon's scope)
consoles = [Path()]      # the current test's serial console directory (temporary)


@pytest.fixture
def persistent_guests(guest_image: GuestImage, libvirt_conn: Any,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Define]:
    """``define(count, nosharepages=False)``: persistent domains with a VGA device
    and unique names, defined but not started; all destroyed and undefined at
    teardown, by name on fresh connections (another session's test may have
    restarted libvirtd, killing the module's connection)."""
    suffix = secrets.token_hex(3)
    made: list[str] = []
    define_prefix[0] = f"vmshare-it-unm-{suffix}-"
    consoles[0] = tmp_path_factory.mktemp("consoles")

    def define(count: int, *, nosharepages: bool = False, tag: str = "g") -> list[Any]:
        doms = []
        for i in range(count):
            name = f"{define_prefix[0]}{tag}{i}"
            log = consoles[0] / f"{name}.log"
            xml = domain_xml(name, guest_image, SPEC, memory_mib=MEMORY_MIB, console_log=log,
                             nosharepages=nosharepages)
            dom = libvirt_conn.defineXML(xml.replace("<devices>", f"<devices>{VGA}", 1))
            made.append(name)
            doms.append(dom)
        return doms

    try:
        yield define
    finally:
        for name in made:
            for action in ("destroy", "undefine"):
                subprocess.run(["virsh", "-q", "-c", URI, action, name],
                               capture_output=True, timeout=60, check=False)


def start(doms: list[Any]) -> None:
    for dom in doms:
        dom.create()
    for dom in doms:
        wait_ready(consoles[0] / f"{dom.name()}.log", timeout=240)


def adopt(capsys: pytest.CaptureFixture[str], doms: list[Any]) -> None:
    code, out, err = vmshare(capsys, "policy", "adopt", *[d.name() for d in doms])
    assert code == 0, err
    assert out.splitlines() == [
        f"{d.name()}: adopted: <nosharepages/> added to its persistent definition; QEMU "
        "starts with mem-merge=off from its next start" for d in doms]


# ---------------------------------------------------------------- tests
def test_disabled_without_adoption_keeps_vram_and_roms_mergeable_and_is_reported(
        persistent_guests: Define, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dom,) = persistent_guests(1)
    start([dom])
    name, pid = dom.name(), qemu_pid(dom.name())
    code, out, err = vmshare(capsys, "disable", name)
    assert code == 1, (out, err)
    assert out == f"{name}/pc.ram: merge on -> off (verified)\n"
    assert err.startswith(f"vmshare: error: {name}: not fully unmergeable: ")
    assert f"'vmshare policy adopt {name}' (a plain QEMU: -machine mem-merge=off) and " \
        "restart the guest" in err
    # the kernel's own view: RAM off, the rest (16 MiB of VRAM among it) still mergeable
    mg = mergeable_mappings(pid)
    assert mg and all(size != MEMORY_MIB * 2**20 for _, size in mg)
    assert any(size == 16 * 2**20 for _, size in mg), mg
    assert f"{sum(s for _, s in mg) // 1024:,} KiB in {len(mg)} mapping(s)" in err
    code, out, err = vmshare(capsys, "list", "--json")
    (entry,) = [v for v in json.loads(out)["vms"] if v["name"] == name]
    assert entry["unmergeable"] is False
    assert entry["other_mergeable_bytes"] == sum(s for _, s in mg)
    code, out, err = vmshare(capsys, "status", "--json", name)
    (vm,) = json.loads(out)["vms"]
    assert any(w.startswith("not fully unmergeable") for w in vm["warnings"])


def test_adopted_domain_disabled_has_no_mergeable_mapping_enabled_only_its_ram(
        persistent_guests: Define, env: Path, capsys: pytest.CaptureFixture[str],
        libvirt_conn: Any) -> None:
    import libvirt

    dom, theirs = persistent_guests(1)[0], persistent_guests(1, nosharepages=True, tag="op")[0]
    env.write_text(env.read_text() + f'[vm."{dom.name()}"]\nforce = true\n')
    adopt(capsys, [dom])
    code, out, _ = vmshare(capsys, "policy", "adopt", theirs.name())
    assert out == f"{theirs.name()}: its <nosharepages/> is the operator's (recorded): never " \
                  "merged\n"
    persistent = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<nosharepages/>" in persistent and 'nosharepages="vmshare"' in persistent
    start([dom])
    name, pid = dom.name(), qemu_pid(dom.name())
    assert mergeable_mappings(pid) == []          # mem-merge=off: nothing at all
    code, out, err = vmshare(capsys, "enable", name)
    assert (code, out.splitlines()[0]) == (0, f"{name}/pc.ram: merge off -> on (verified)"), err
    mg = mergeable_mappings(pid)
    assert [size for _, size in mg] == [MEMORY_MIB * 2**20]   # exactly the RAM backend
    code, out, err = vmshare(capsys, "disable", name)
    assert (code, out) == (0, f"{name}/pc.ram: merge on -> off (verified)\n"), err
    assert mergeable_mappings(pid) == []
    code, out, _ = vmshare(capsys, "list", "--json")
    (entry,) = [v for v in json.loads(out)["vms"] if v["name"] == name]
    assert (entry["unmergeable"], entry["other_mergeable_bytes"]) == (True, 0)
    # the operator's own <nosharepages/> still means never merge
    code, _, err = vmshare(capsys, "enable", theirs.name())
    assert code == 1 and "nosharepages/> is set by the operator" in err
    audit = [json.loads(line) for line in Path(os.environ["VMSHARE_AUDIT_LOG"]).read_text()
             .splitlines()]
    assert [(r["action"], r["target"], r["after"]) for r in audit] == [
        ("adopt", name, "nosharepages=vmshare"),
        ("adopt", theirs.name(), "nosharepages=operator"),
        ("merge", f"{name}/pc.ram", True), ("merge", f"{name}/pc.ram", False)]


def test_two_trust_groups_share_no_ksm_page(
        persistent_guests: Define, env: Path, capsys: pytest.CaptureFixture[str],
        kernel_ksm: KsmSysfs) -> None:
    group_a = persistent_guests(2, tag="a")
    group_b = persistent_guests(2, tag="b")
    # a group-B guest vmshare never adopted: its RAM backend off, VRAM and ROMs not
    (leaky,) = persistent_guests(1, tag="leak")
    tables = "".join(f'[vm."{d.name()}"]\nmerge = "{merge}"\ngroup = "{g}"\nforce = {force}\n'
                     for g, doms, merge, force in (
                         ("tenant-a", group_a, "on", "true"),
                         ("tenant-b", group_b, "on", "false"),
                         ("tenant-b", [leaky], "off", "false"))
                     for d in doms)
    env.write_text(env.read_text() + tables)
    adopt(capsys, group_a + group_b)
    start(group_a + group_b + [leaky])
    code, _, err = vmshare(capsys, "disable", leaky.name())
    assert code == 1 and "not fully unmergeable" in err, err
    for dom in group_a:
        code, _, err = vmshare(capsys, "enable", dom.name())
        assert code == 0, err
    for dom in group_b:
        # refused: group A is mergeable (the blocker named may be another
        # session's guest, sorted first)
        code, _, err = vmshare(capsys, "enable", dom.name())
        assert code == 1 and f"refusing to make {dom.name()} (trust group 'tenant-b') " \
            "mergeable: " in err, err
    t0 = time.monotonic()
    converge(kernel_ksm, timeout=180)
    pages_a = [ksm_pfns(qemu_pid(d.name())) for d in group_a]
    pages_b = [ksm_pfns(qemu_pid(d.name())) for d in group_b]
    in_a = pages_a[0] | pages_a[1]
    # the identical content merged within group A ...
    assert len(pages_a[0] & pages_a[1]) >= SPEC.identical_mib * 256 // 2, \
        f"group A shares {len(pages_a[0] & pages_a[1])} pages after {time.monotonic() - t0:.0f}s"
    # ... no page of an adopted group-B guest is a KSM page, let alone one group A maps ...
    for dom, pfns in zip(group_b, pages_b, strict=True):
        assert mergeable_mappings(qemu_pid(dom.name())) == []
        assert pfns == set(), f"{dom.name()} maps {len(pfns)} KSM pages"
    # ... while the guest left at mem-merge=on shares pages with group A (the
    # leak vmshare reported above): what the check would catch without adoption
    # (its ROM pages join the stable tree a scan or two after group A's: wait
    # a few more full scans for them, under the deadline of those scans)
    leaked: set[int] = set()
    for _ in range(6):
        leaked = ksm_pfns(qemu_pid(leaky.name())) & (in_a | ksm_pfns(qemu_pid(
            group_a[0].name())))
        if leaked:
            break
        kernel_ksm.wait_full_scans(1, timeout=60)
    assert leaked, "the unadopted guest shares no KSM page with group A"
    print(f"\ngroup A shares {len(pages_a[0] & pages_a[1])} KSM pages; adopted group B maps "
          f"{sum(map(len, pages_b))}; the unadopted group-B guest shares {len(leaked)} with "
          f"group A in {len(mergeable_mappings(qemu_pid(leaky.name())))} mergeable mappings")


def test_under_the_daemon_policy_off_and_other_groups_have_no_mergeable_mapping(
        persistent_guests: Define, env: Path, capsys: pytest.CaptureFixture[str],
        kernel_ksm: KsmSysfs, tmp_path: Path) -> None:
    group_a = persistent_guests(2, tag="a")
    (group_b,) = persistent_guests(1, tag="b")
    (off,) = persistent_guests(1, tag="off")
    (leaky,) = persistent_guests(1, tag="leak")   # never adopted
    tables = "".join(f'[vm."{d.name()}"]\nmerge = "{merge}"\ngroup = "{g}"\nforce = {force}\n'
                     for g, doms, merge, force in (
                         ("tenant-a", group_a, "on", "true"),
                         ("tenant-b", [group_b], "on", "false"),
                         ("tenant-b", [off, leaky], "off", "false"))
                     for d in doms)
    env.write_text(env.read_text() + tables + "[daemon]\n" + "".join(
        f'{key} = "{tmp_path}/{value}"\n' for key, value in (
            ("spool_dir", "spool"), ("socket", "run/wake.sock"), ("audit_log", "audit.jsonl"),
            ("state_file", "state.json"), ("history_file", "history.jsonl"),
            ("history_db", "history.sqlite"))))
    adopt(capsys, [*group_a, group_b, off])
    daemon = DaemonProc(env, tmp_path / "daemon.log", domains=(f"{define_prefix[0]}*",))
    try:
        daemon.wait_log("running: qemu:///system")
        start([*group_a, group_b, off, leaky])
        ram = MEMORY_MIB * 2**20
        wait_for(lambda: all([size for _, size in mergeable_mappings(qemu_pid(d.name()))]
                             == [ram] for d in group_a), 60,
                 lambda: f"group A not made mergeable:\n{daemon.text()[-3000:]}")
        daemon.wait_log(f"{leaky.name()}: not fully unmergeable", 60)
        daemon.wait_log(f"not made mergeable: refusing to make {group_b.name()}", 60)
        converge(kernel_ksm, timeout=180)
        pages_a = ksm_pfns(qemu_pid(group_a[0].name())) | ksm_pfns(qemu_pid(group_a[1].name()))
        assert pages_a, "group A merged nothing"
        for dom in (group_b, off):
            assert mergeable_mappings(qemu_pid(dom.name())) == [], dom.name()
            assert ksm_pfns(qemu_pid(dom.name())) == set(), dom.name()
        # the unadopted guest: RAM made unmergeable by the daemon, VRAM and ROMs not
        leaky_mg = mergeable_mappings(qemu_pid(leaky.name()))
        assert leaky_mg and all(size != ram for _, size in leaky_mg)
    finally:
        daemon.kill()
