"""Policy surfaces on real libvirtd (qemu:///system): domain metadata round trip, and
trust groups between two real TCG guests, with the audit log.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.domains import domain_name
from vmshare.cli.main import main
from vmshare.guest import FillSpec
from vmshare.hypervisor.metadata import NAMESPACE, adopted_element

pytestmark = pytest.mark.integration

URI = "qemu:///system"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["-c", URI, *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv("VMSHARE_AUDIT_LOG", str(audit))
    monkeypatch.setenv("VMSHARE_CONFIG", str(tmp_path / "absent.toml"))
    return audit


@pytest.fixture
def persistent_domain(libvirt_conn: Any) -> Iterator[Any]:
    import libvirt
    name = domain_name("pol-def")
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64'>hvm</type></os></domain>")
    dom = libvirt_conn.defineXML(xml)
    try:
        yield dom
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()


def test_policy_set_show_round_trip_persistent(persistent_domain: Any, env: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import libvirt
    name = persistent_domain.name()
    code, out, err = run(capsys, "policy", "set", name, "--merge", "on", "--group", "tenant-x",
                         "--force")
    assert code == 0, err
    assert out.splitlines() == [
        f"{name}: policy merge=on group=tenant-x force (was -); written to the persistent "
        "definition",
        f"{name}: adopted: <nosharepages/> added to its persistent definition; QEMU starts "
        "with mem-merge=off from its next start"]
    # what libvirt itself stores, in our namespace, in the persistent definition
    got = persistent_domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE,
                                     libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert 'merge="on"' in got and 'group="tenant-x"' in got and 'force="yes"' in got
    xml = persistent_domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert f'xmlns:vmshare="{NAMESPACE}"' in xml
    # adopted: libvirt took the redefinition, the policy and the record side by side
    assert "<nosharepages/>" in xml and 'nosharepages="vmshare"' in got

    code, out, err = run(capsys, "policy", "show", name, "--json")
    assert code == 0, err
    (vm,) = json.loads(out)["vms"]
    assert vm["running"] is False
    assert vm["metadata"] == {"merge": "on", "group": "tenant-x", "force": True}
    assert vm["decision"] == {"merge": True, "group": "tenant-x", "forced": True,
                              "reason": "domain metadata says merge=on"}
    code, out, _ = run(capsys, "policy", "show", name)
    assert f"{name}  shut off  -          merge=on group=tenant-x force" in out

    code, out, err = run(capsys, "policy", "set", name, "--group", "", "--no-force",
                         "--merge", "inherit")
    assert code == 0, err
    assert out.splitlines()[1] == f"{name}: already adopted"
    code, out, _ = run(capsys, "policy", "show", name, "--json")
    (vm,) = json.loads(out)["vms"]
    assert vm["metadata"] == {"merge": "inherit", "group": None, "force": False}
    assert vm["decision"]["reason"] == "host default merge=off"
    recs = [json.loads(line) for line in env.read_text().splitlines()]
    assert [(r["action"], r["target"], r["actor"]) for r in recs] == \
        [("policy", name, "cli"), ("adopt", name, "cli"), ("policy", name, "cli")]
    assert recs[0]["before"] is None and recs[2]["before"]["group"] == "tenant-x"


@pytest.fixture
def two_guests(boot_guests: Any) -> tuple[str, str]:
    names = (domain_name("pol-a"), domain_name("pol-b"))
    # written adopted: QEMU starts with mem-merge=off, nothing mergeable, so two
    # trust groups can be told apart by their RAM backends alone
    boot_guests(names, FillSpec(identical_mib=16, unique_mib=8, seed=5), memory_mib=192,
                nosharepages=True, metadata_xml=adopted_element())
    return names


def test_trust_groups_refuse_then_force_with_audit(two_guests: tuple[str, str], env: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_guests
    try:
        # adopted guests start with nothing mergeable
        for vm in (a, b):
            code, out, err = run(capsys, "disable", vm, "--force")
            assert (code, out) == (0, f"{vm}/pc.ram: merge already off (verified)\n"), err
        for vm, group in ((a, "tenant-a"), (b, "tenant-b")):
            code, out, err = run(capsys, "policy", "set", vm, "--group", group)
            assert code == 0, err
            assert "written to the live definition (transient domain)" in out
            assert out.splitlines()[1] == f"{vm}: already adopted"
        code, out, err = run(capsys, "enable", a)
        assert code == 0, err
        assert "merge off -> on (verified)" in out

        code, out, err = run(capsys, "enable", b)
        assert code == 1 and out == ""
        assert err == (f"vmshare: error: refusing to make {b} (trust group 'tenant-b') "
                       f"mergeable: {a} of trust group 'tenant-a' is mergeable, and KSM would "
                       "let the two share pages; disable it first, or set force in the "
                       "policy\n")

        code, out, err = run(capsys, "policy", "show", b, "--json")
        (vm,) = json.loads(out)["vms"]
        assert vm["mergeable_now"] is False and vm["metadata"]["group"] == "tenant-b"

        code, out, err = run(capsys, "policy", "set", b, "--force")
        assert code == 0, err
        code, out, err = run(capsys, "enable", b)
        assert code == 0, err
        assert "merge off -> on (verified)" in out
        assert out.splitlines()[-1] == (f"forced: {a} of trust group 'tenant-a' is mergeable, "
                                        f"but the policy of {b} (trust group 'tenant-b') "
                                        "has force")
    finally:
        for vm in (a, b):
            main(["-c", URI, "disable", vm, "--force"])
        capsys.readouterr()

    recs = [json.loads(line) for line in env.read_text().splitlines()]
    summary = [(r["action"], r["vm"], r["before"], r["after"]) for r in recs]
    merges = [s for s in summary if s[0] == "merge"]
    assert [s[1] for s in summary if s[0] == "policy"] == [a, b, b]
    assert merges == [("merge", a, False, True), ("merge", b, False, True),
                      ("merge", a, True, False), ("merge", b, True, False)]
    assert all(r["actor"] == "cli" and r["user"] and r["pid"] for r in recs)
    forced = next(r for r in recs if r["action"] == "merge" and r["vm"] == b and r["after"])
    assert "forced" in forced["reason"] and forced["target"].startswith(f"{b}/")
    code, out, _ = run(capsys, "log", "--vm", b)
    assert code == 0 and len(out.splitlines()) == 4
