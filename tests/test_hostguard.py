"""The session-end host check (tests/hostguard.py) sees what a test leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hostguard
from tests.ksmtree import make_sysfs


def snap(tmp_path: Path) -> hostguard.HostState:
    return hostguard.capture((tmp_path / "lib", tmp_path / "run"), tmp_path / "ksm",
                             with_libvirt=False)


def test_every_kind_of_leftover_is_named(tmp_path: Path) -> None:
    make_sysfs(tmp_path / "ksm")
    (tmp_path / "lib" / "old").mkdir(parents=True)
    (tmp_path / "lib" / "old" / "state.json").write_text("{}")
    (tmp_path / "lib" / "gone").write_text("x")
    before = snap(tmp_path)
    assert hostguard.differences(before, snap(tmp_path)) == []

    (tmp_path / "ksm" / "sleep_millisecs").write_text("50\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tuner.lock").write_text(f"{os.getpid()}\n")
    (tmp_path / "lib" / "old" / "state.json").write_text('{"version": 1}')
    (tmp_path / "lib" / "gone").unlink()
    assert hostguard.differences(before, snap(tmp_path)) == [
        "KSM knob sleep_millisecs: '20' at start, '50' at end",
        f"{tmp_path}/lib/gone: removed",
        f"{tmp_path}/lib/old/state.json: modified (size 2 -> 14)",
        f"{tmp_path}/run: created (dir)",
        f"{tmp_path}/run/tuner.lock: created (file)",
    ]


def test_domains_new_gone_and_libvirtd_gone() -> None:
    before = hostguard.HostState(domains=frozenset({"prod-db", "vmshare-it-x"}))
    ours = f"vmshare-it-a-{hostguard.RUN_ID}"
    after = hostguard.HostState(domains=frozenset({"vmshare-it-x", ours}))
    lines = hostguard.differences(before, after)
    assert lines == [f"libvirt domain '{ours}' is new (left running or defined)",
                     "libvirt domain 'prod-db' is gone"]
    assert [hostguard.mine(line) for line in lines] == [True, False]
    assert hostguard.differences(before, hostguard.HostState()) == [
        "libvirtd (qemu:///system) answered at start, not at end"]
    # libvirtd down at start: nothing to compare against
    assert hostguard.differences(hostguard.HostState(), after) == []


def test_own_children_are_not_foreign_a_stranger_is(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "vmshare"])
    # the stranger's parent exits at once: it is reparented away from this process
    subprocess.run(["setsid", "-f", sys.executable, "-c",
                    "import time; time.sleep(30)", "pytest-stranger", str(tmp_path)],
                   check=True)
    try:
        found = hostguard.foreign_testers()
        assert child.pid not in found
        assert os.getpid() not in found
        assert any(str(tmp_path) in cmd for cmd in found.values()), found
    finally:
        child.kill()
        child.wait()
        for pid, cmd in hostguard.foreign_testers().items():
            if str(tmp_path) in cmd:
                os.kill(pid, 9)


ROOTS: list[Path] = []


@pytest.mark.parametrize("turn", [1, 2])
def test_each_test_has_its_own_paths(turn: int) -> None:
    root = Path(os.environ["VMSHARE_CONFIG"]).parent
    for name in ("VMSHARE_AUDIT_LOG", "VMSHARE_TUNER_LOCK", "VMSHARE_SPOOL_DIR",
                 "VMSHARE_SOCKET", "VMSHARE_HOOK_CONF"):
        assert root in Path(os.environ[name]).parents, name
    for name in hostguard.UNSET_VARS:
        assert name not in os.environ
    from vmshare.config import load_config
    from vmshare.records.audit import audit_path
    from vmshare.tuner.loop import tuner_lock_path
    cfg = load_config()
    for path in (cfg.daemon.spool_dir, cfg.daemon.socket, cfg.daemon.audit_log,
                 cfg.daemon.state_file, cfg.daemon.history_file, audit_path(),
                 tuner_lock_path()):
        assert root in path.parents, path
    assert root not in ROOTS        # not the previous test's tree
    ROOTS.append(root)
