"""`vmshare policy show|set`, `enable` with trust groups, `log`, `hook`: the CLI end to end
over libvirt's test driver.

The test driver keeps real domain metadata (virDomainSetMetadata/GetMetadata),
but has no QEMU: its QMP part (ram_backends, set_merge) is scripted here, and
each domain gets a fake /proc/<pid> (cmdline naming it, smaps with its RAM
mapping and the ``mg`` flag following the scripted merge state).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmshare.cli.main import main
from vmshare.hook import install as hookinstall
from vmshare.hypervisor.libvirt import LibvirtHypervisor
from vmshare.hypervisor.metadata import NAMESPACE
from vmshare.model import RamBackend, VmRef

RAM = 256 * 2**20
NAMES = ("alpha", "beta", "delta", "gamma")


def node_xml() -> str:
    doms = []
    for i, name in enumerate(NAMES, 1):
        meta = ""
        if name == "alpha":
            meta = (f'<metadata><vmshare:policy xmlns:vmshare="{NAMESPACE}" merge="on" '
                    'group="tenant-a" force="no"/></metadata>')
        if name == "delta":
            meta = (f'<metadata><vmshare:policy xmlns:vmshare="{NAMESPACE}" merge="on" '
                    'group="tenant-b"/></metadata>')
        backing = "<memoryBacking><nosharepages/></memoryBacking>" if name == "beta" else ""
        doms.append(f"""<domain type='test'><name>{name}</name>
  <uuid>11111111-2222-3333-4444-55555555550{i}</uuid>{meta}
  <memory unit='MiB'>256</memory>{backing}<os><type arch='x86_64'>hvm</type></os></domain>""")
    return "<node>" + "".join(doms) + "</node>"


CONFIG = """[host]
default_merge = "off"
[vm.gamma]
merge = "on"
group = "tenant-b"
force = true
"""


@dataclass
class FakeHost:
    root: Path
    uri: str
    merged: dict[str, bool]
    audit: Path
    config: Path

    def smaps(self, name: str) -> None:
        pid = 4000 + NAMES.index(name)
        flags = "rd wr mr mw me ac dc" + (" mg" if self.merged[name] else "")
        (self.root / "proc" / str(pid) / "smaps").write_text(
            "7f0000000000-7f0010000000 rw-p 00000000 00:00 0\n"
            f"Size: {RAM // 1024} kB\nRss: 0 kB\nVmFlags: {flags}\n")


class ScriptedQmp(LibvirtHypervisor):
    """Real libvirt test driver (domains, metadata); scripted QMP."""

    host: FakeHost

    def ram_backends(self, vm: VmRef) -> list[RamBackend]:
        return [RamBackend("pc.ram", RAM, self.host.merged[vm.name])]

    def set_merge(self, vm: VmRef, backend_id: str, merge: bool) -> None:
        assert backend_id == "pc.ram"
        self.host.merged[vm.name] = merge
        self.host.smaps(vm.name)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHost]:
    (tmp_path / "node.xml").write_text(node_xml())
    run = tmp_path / "run"
    run.mkdir()
    fake = FakeHost(tmp_path, f"test://{tmp_path}/node.xml",
                    {"alpha": True, "beta": False, "delta": False, "gamma": False},
                    tmp_path / "log" / "audit.jsonl", tmp_path / "vmshare.toml")
    fake.config.write_text(CONFIG)
    for i, name in enumerate(NAMES):
        pid = 4000 + i
        (run / f"{name}.pid").write_text(f"{pid}\n")
        d = tmp_path / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(f"qemu-system-x86_64\0-name\0guest={name},debug-threads=on\0"
                                    .encode())
        fake.smaps(name)

    def connect(uri: str | None, qmp: str | None, deadline: float) -> ScriptedQmp:
        hv = ScriptedQmp(uri or fake.uri, deadline, run_dir=str(run),
                         proc_root=str(tmp_path / "proc"))
        hv.host = fake
        return hv

    monkeypatch.setattr("vmshare.hypervisor.connect", connect)
    monkeypatch.setenv("VMSHARE_PROC_ROOT", str(tmp_path / "proc"))
    monkeypatch.setenv("VMSHARE_CONFIG", str(fake.config))
    monkeypatch.setenv("VMSHARE_AUDIT_LOG", str(fake.audit))
    yield fake


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


GOLDEN_SHOW = """\
config: {config}
host:   sharing enabled, default merge=off, default trust group 'default'

DOMAIN  STATE    MERGEABLE  METADATA                 CONFIG                         DECISION   GROUP     REASON
alpha   running  yes        merge=on group=tenant-a  -                              on         tenant-a  domain metadata says merge=on
beta    running  no         -                        -                              off        default   never merged: <memoryBacking><nosharepages/> is set
delta   running  no         merge=on group=tenant-b  -                              off        tenant-b  blocked: trust group 'tenant-a' is merging (alpha); domain metadata says merge=on
gamma   running  no         -                        merge=on group=tenant-b force  on forced  tenant-b  host config says merge=on
"""  # noqa: E501


def test_policy_show_golden(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-c", host.uri, "policy", "show")
    assert (code, err) == (0, "")
    assert out == GOLDEN_SHOW.format(config=host.config)


def test_policy_show_json_and_selection(host: FakeHost,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-c", host.uri, "policy", "show", "delta", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"] == str(host.config) and doc["host"]["enabled"] is True
    (vm,) = doc["vms"]
    assert vm["name"] == "delta" and vm["metadata"] == {"merge": "on", "group": "tenant-b",
                                                         "force": False}
    assert vm["wish"]["merge"] is True and vm["decision"]["merge"] is False
    assert "(alpha)" in vm["decision"]["reason"]     # the blocker outside the selection


def test_policy_show_host_switch_and_missing_config(host: FakeHost, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    off = tmp_path / "off.toml"
    off.write_text("[host]\nenabled = false\n")
    code, out, _ = run(capsys, "-c", host.uri, "policy", "show", "alpha", "--config", str(off))
    assert code == 0
    assert "sharing DISABLED (host-wide switch)" in out
    assert "host-wide switch is off ([host] enabled = false)" in out
    code, _, err = run(capsys, "-c", host.uri, "policy", "show", "--config",
                       str(tmp_path / "nope.toml"))
    assert code == 1 and err.strip() == f"vmshare: error: config file {tmp_path}/nope.toml " \
                                        "does not exist"
    bad = tmp_path / "bad.toml"
    bad.write_text("[host]\nenabeld = true\n")
    code, _, err = run(capsys, "-c", host.uri, "policy", "show", "--config", str(bad))
    assert code == 1 and err.count("\n") == 1 and "unknown key(s) in [host]: enabeld" in err


def test_enable_refused_by_trust_group_naming_the_blocker(
        host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-c", host.uri, "enable", "delta")
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("vmshare: error: refusing to make delta (trust group 'tenant-b') "
                          "mergeable: alpha of trust group 'tenant-a' is mergeable")
    assert host.merged["delta"] is False
    assert not host.audit.exists()


def test_enable_forced_succeeds_says_so_and_is_audited(
        host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-c", host.uri, "enable", "gamma")
    assert code == 0, err
    assert out.splitlines() == [
        "gamma/pc.ram: merge off -> on (verified)",
        "forced: alpha of trust group 'tenant-a' is mergeable, but the policy of gamma "
        "(trust group 'tenant-b') has force"]
    assert host.merged["gamma"] is True
    (rec,) = [json.loads(line) for line in host.audit.read_text().splitlines()]
    assert rec["action"] == "merge" and rec["target"] == "gamma/pc.ram" and rec["vm"] == "gamma"
    assert (rec["before"], rec["after"], rec["actor"]) == (False, True, "cli")
    assert rec["reason"].startswith("vmshare enable; forced: alpha")


def test_enable_refused_when_host_switch_is_off(host: FakeHost, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    off = tmp_path / "off.toml"
    off.write_text("[host]\nenabled = false\n")
    monkeypatch.setenv("VMSHARE_CONFIG", str(off))
    code, out, err = run(capsys, "-c", host.uri, "enable", "delta")
    assert code == 1 and out == ""
    assert err == ("vmshare: error: refusing to make delta mergeable: host-wide switch is "
                   "off ([host] enabled = false)\n")
    code, out, err = run(capsys, "-c", host.uri, "enable", "beta")
    assert code == 1 and "nosharepages" in err and err.count("\n") == 1
    assert host.merged == {"alpha": True, "beta": False, "delta": False, "gamma": False}


def test_policy_set_writes_metadata_and_audits(host: FakeHost,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-c", host.uri, "policy", "set", "alpha", "--merge", "off",
                         "--force")
    assert code == 0, err
    assert out.splitlines() == [
        "alpha: policy merge=off group=tenant-a force (was merge=on group=tenant-a); "
        "written to the live and persistent definition",
        "alpha: adopted: <nosharepages/> added to its persistent definition; restart the "
        "guest so that QEMU starts with mem-merge=off (until then its VRAM and ROMs stay "
        "mergeable)"]
    rec, adopted = [json.loads(line) for line in host.audit.read_text().splitlines()]
    assert (adopted["action"], adopted["target"], adopted["after"]) == (
        "adopt", "alpha", "nosharepages=vmshare")
    assert rec["action"] == "policy" and rec["target"] == "alpha"
    assert rec["before"] == {"merge": "on", "group": "tenant-a", "force": False}
    assert rec["after"] == {"merge": "off", "group": "tenant-a", "force": True}
    assert os.stat(host.audit).st_mode & 0o777 == 0o600


def test_policy_set_apply_follows_the_decision(host: FakeHost,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # delta joins alpha's group: the plan lets it merge, --apply does it now
    code, out, err = run(capsys, "-c", host.uri, "policy", "set", "delta", "--group",
                         "tenant-a", "--apply")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("delta: adopted: ")
    assert lines[2] == ("delta: decision merge=on (trust group 'tenant-a'): domain metadata "
                        "says merge=on")
    assert lines[3] == "delta/pc.ram: merge off -> on (verified)"
    assert host.merged["delta"] is True
    recs = [json.loads(line) for line in host.audit.read_text().splitlines()]
    assert [r["action"] for r in recs] == ["policy", "adopt", "merge"]
    assert recs[2]["reason"].startswith("vmshare policy set --apply")


def test_policy_set_apply_blocked_group_is_refused(host: FakeHost,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # delta asks to merge in tenant-b while alpha (tenant-a) merges: decision off, nothing done
    code, out, err = run(capsys, "-c", host.uri, "policy", "set", "delta", "--merge", "on",
                         "--apply")
    assert code == 0, err
    assert "decision merge=off (trust group 'tenant-b'): blocked: trust group 'tenant-a' " \
           "is merging (alpha)" in out
    assert "delta/pc.ram: merge already off (verified)" in out
    assert host.merged["delta"] is False


@pytest.mark.parametrize(("args", "needle"), [
    (("policy", "set", "alpha"), "nothing to set"),
    (("policy", "set", "alpha", "--group", "a b"), "bad trust group name 'a b'"),
    (("policy", "set", "nosuch", "--merge", "on"), "no domain named 'nosuch'"),
    (("log", "--tail", "-1"), "--tail must be 0 or more"),
])
def test_user_mistakes_are_one_line(host: FakeHost, capsys: pytest.CaptureFixture[str],
                                    args: tuple[str, ...], needle: str) -> None:
    code, out, err = run(capsys, "-c", host.uri, *args)
    assert code != 0 and out == ""
    assert err.startswith("vmshare: error: ") and err.count("\n") == 1 and needle in err


def test_log_filters_tail_json_and_torn_lines(host: FakeHost,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "log")
    assert (code, out) == (0, f"no audit records in {host.audit}\n")
    assert run(capsys, "-c", host.uri, "enable", "gamma")[0] == 0
    assert run(capsys, "-c", host.uri, "policy", "set", "alpha", "--group", "x")[0] == 0
    with open(host.audit, "ab") as f:
        f.write(b'{"time": 2.0, "act')
    code, out, err = run(capsys, "log")
    assert code == 0
    assert err.startswith(f"vmshare: warning: {host.audit}:4: not JSON (")
    lines = out.splitlines()
    assert len(lines) == 3   # the merge, the policy, the adoption that came with it
    assert "cli/" in lines[0] and "merge  gamma/pc.ram  off -> on  vmshare enable; forced" \
        in lines[0]
    assert "policy  alpha  merge=on group=tenant-a -> merge=on group=x  vmshare policy set" \
        in lines[1]
    code, out, _ = run(capsys, "log", "--vm", "gamma", "--json")
    doc = json.loads(out)
    assert [r["target"] for r in doc["records"]] == ["gamma/pc.ram"]
    code, out, _ = run(capsys, "log", "--tail", "2", "--json")
    assert [(r["action"], r["target"]) for r in json.loads(out)["records"]] == [
        ("policy", "alpha"), ("adopt", "alpha")]


def test_hook_commands_on_a_temp_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hooks = tmp_path / "hooks"
    code, out, err = run(capsys, "hook", "status", "--hooks-dir", str(hooks), "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "missing"
    code, out, err = run(capsys, "hook", "install", "--hooks-dir", str(hooks))
    assert code == 0, err
    target = hooks / "qemu.d" / hookinstall.HOOK_NAME
    assert out.splitlines()[0] == f"installed {target}"
    assert target.read_bytes() == hookinstall.SHIPPED_HOOK.read_bytes()
    st = hookinstall.status(hooks)
    if st.restart_needed:
        assert "libvirtd reads its hooks when it starts" in out
        assert "--restart-libvirtd" in out
    code, out, _ = run(capsys, "hook", "status", "--hooks-dir", str(hooks))
    assert f"hook:      {target}: installed" in out.splitlines()[0]
    assert run(capsys, "hook", "install", "--hooks-dir", str(hooks))[1].startswith("unchanged")
    target.write_text("#!/bin/sh\n# someone else's\n")
    code, out, err = run(capsys, "hook", "uninstall", "--hooks-dir", str(hooks))
    assert code == 1 and "was not installed by vmshare" in err and err.count("\n") == 1
    target.unlink()
    assert run(capsys, "hook", "install", "--hooks-dir", str(hooks))[0] == 0
    code, out, _ = run(capsys, "hook", "uninstall", "--hooks-dir", str(hooks))
    assert (code, out) == (0, f"removed {target}\n") and not target.exists()


def test_policy_set_needs_libvirt(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    class Plain:
        uri = "qmp"

        def lookup(self, ident: str) -> VmRef:
            return VmRef(ident, "")

        def close(self) -> None:
            pass

    def connect(*_a: Any) -> Plain:
        return Plain()

    monkeypatch.setattr("vmshare.hypervisor.connect", connect)
    monkeypatch.setenv("VMSHARE_CONFIG", str(tmp_path / "none.toml"))
    code, _, err = run(capsys, "--qmp", "/x.sock", "policy", "set", "vm", "--merge", "on")
    assert code == 2 and "libvirt domain metadata" in err and err.count("\n") == 1


def test_policy_adopt_names_what_it_did_and_audits_it(host: FakeHost,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-c", host.uri, "policy", "adopt", "alpha", "beta")
    assert code == 0, err
    assert out.splitlines() == [
        "alpha: adopted: <nosharepages/> added to its persistent definition; restart the "
        "guest so that QEMU starts with mem-merge=off (until then its VRAM and ROMs stay "
        "mergeable)",
        "beta: its <nosharepages/> is the operator's (recorded): never merged"]
    # (each command opens the test driver's node file afresh: nothing carries over)
    code, out, err = run(capsys, "-c", host.uri, "policy", "adopt", "--all", "--json")
    assert code == 0, err
    doc = {d["vm"]: (d["outcome"], d["changed"]) for d in json.loads(out)["domains"]}
    assert doc == {"alpha": ("adopted", True), "beta": ("operator", True),
                   "delta": ("adopted", True), "gamma": ("adopted", True)}
    recs = [json.loads(line) for line in host.audit.read_text().splitlines()]
    assert [(r["action"], r["target"], r["after"]) for r in recs[:2]] == [
        ("adopt", "alpha", "nosharepages=vmshare"), ("adopt", "beta", "nosharepages=operator")]
    assert len(recs) == 6
    code, _, err = run(capsys, "-c", host.uri, "enable", "beta")
    assert code == 1 and "nosharepages" in err
    code, out, _ = run(capsys, "-c", host.uri, "policy", "show", "--json", "alpha")
    assert json.loads(out)["vms"][0]["decision"]["merge"] is True


@pytest.mark.parametrize("args", [("policy", "adopt"), ("policy", "adopt", "alpha", "--all")])
def test_policy_adopt_needs_names_or_all(host: FakeHost, capsys: pytest.CaptureFixture[str],
                                         args: tuple[str, ...]) -> None:
    code, out, err = run(capsys, "-c", host.uri, *args)
    assert (code, out) == (2, "")
    assert err == "vmshare: error: name the domains to adopt, or give --all (not both)\n"
