"""The real-guest tier: three Debian 12 guests (systemd, udev, journald, dbus,
cron, rsyslog; 512 MiB each, booted together under libvirt TCG from Debian's
own packages) and what vmshare says about them against the kernel.

- ``predict``, run before anything is merged, against what kernel KSM then
  merges (pages_sharing within 3%);
- ``status`` against an attribution this file computes from pagemap,
  kpageflags and kpagecount alone (each VM within 2%, and the VMs' sum
  against the host's pages_sharing).

The guests are booted once for the module; KSM knobs are saved and restored
around the whole module, with everything unmerged at both ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import (
    DaemonProc,
    all_merge,
    audit_lines,
    cli_json,
    wait_for,
    write_config,
)
from integration.debian_guests import (
    DebianGuests,
    booted_debian_guests,
    independent_saved_pages,
    ksm_pfns,
    mergeable_ranges,
    virsh,
)
from integration.ksm_fixtures import converge, ksm_session, require_root_ksm
from vmshare.ksm.sysfs import KsmSysfs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
GUESTS = 3
# The guest kernel and systemd alone give every guest tens of MiB in common.
MIN_SHARED_PAGES = 20_000


def vmshare(*args: str, env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "vmshare", *args, "--json"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"vmshare {' '.join(args)}: {r.stderr}"
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def forced(names: list[str]) -> dict[str, str]:
    """Config tables giving these guests ``force``: another session's guests of another
    trust group on a shared test machine must not block the engine comparisons."""
    return {n: "on" for n in names}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory, guests: DebianGuests) -> dict[str, str]:
    """The CLI with this module's own config and audit log."""
    tmp = tmp_path_factory.mktemp("debian-cli")
    config = write_config(tmp, forced(guests.names), force=True)
    return {**os.environ, "VMSHARE_CONFIG": str(config),
            "VMSHARE_AUDIT_LOG": str(tmp / "audit.jsonl")}


@pytest.fixture(scope="module")
def guests() -> Iterator[DebianGuests]:
    require_root_ksm()
    with booted_debian_guests(GUESTS) as booted:
        yield booted


@pytest.fixture(scope="module")
def merged(guests: DebianGuests, cli_env: dict[str, str]
           ) -> Iterator[tuple[KsmSysfs, dict[str, Any], dict[str, int]]]:
    """Predict with KSM stopped and unmerged, then let the kernel converge."""
    with ksm_session(require_root_ksm()) as sysfs:
        for name in guests.names:
            vmshare("enable", name, env=cli_env)
            assert mergeable_ranges(guests.pid(name)), f"{name}: nothing mergeable"
        assert sysfs.read_int("pages_sharing") == 0
        predicted = vmshare("predict", *guests.names, env=cli_env)
        kernel = converge(sysfs, timeout=300)
        yield sysfs, predicted, kernel


def test_predict_before_merging_matches_what_the_kernel_merges(
        merged: tuple[KsmSysfs, dict[str, Any], dict[str, int]]) -> None:
    _, predicted, kernel = merged
    ours = predicted["totals"]["pages_sharing"]
    print(f"predict {ours:,} vs kernel {kernel['pages_sharing']:,} pages_sharing")
    assert kernel["pages_sharing"] >= MIN_SHARED_PAGES, kernel
    assert ours == pytest.approx(kernel["pages_sharing"], rel=0.03), (
        f"predict said pages_sharing {ours:,} before merging; the kernel merged "
        f"{kernel['pages_sharing']:,}")


def test_status_matches_an_independent_attribution(
        guests: DebianGuests, cli_env: dict[str, str],
        merged: tuple[KsmSysfs, dict[str, Any], dict[str, int]]) -> None:
    sysfs = merged[0]
    sysfs.set("run", 0)      # freeze the merged state (writes still unshare; none merge)
    time.sleep(0.5)
    status = vmshare("status", *guests.names, env=cli_env)
    theirs = independent_saved_pages({n: guests.pid(n) for n in guests.names})
    host_sharing = sysfs.read_int("pages_sharing")
    ours = {vm["name"]: vm["saved_pages"] for vm in status["vms"]}
    assert set(ours) == set(guests.names)
    print(f"boot {guests.boot_seconds:.1f} s; host pages_sharing {host_sharing:,}; per VM "
          + ", ".join(f"{n[-1]}: {ours[n]:,.0f} vs {theirs[n]:,.0f}" for n in guests.names))
    for name in guests.names:
        assert theirs[name] >= MIN_SHARED_PAGES / GUESTS, (name, theirs)
        assert ours[name] == pytest.approx(theirs[name], rel=0.02), (
            f"{name}: status says {ours[name]:,.0f} pages saved, pagemap/kpagecount "
            f"say {theirs[name]:,.0f}")
    # only these guests merge on this host during the test: they hold all of it
    assert sum(theirs.values()) == pytest.approx(host_sharing, rel=0.02)


# ---------------------------------------------------------------- the daemon's lifecycle
@pytest.fixture(scope="module")
def daemon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("debian-daemon")


def _pending(state_file: Path, name: str) -> bool:
    try:
        doc = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False
    entry = doc.get("vms", {}).get(name, {})
    return isinstance(entry, dict) and isinstance(entry.get("pending"), dict)


def _flip_behind_the_daemons_back(name: str) -> None:
    """Turn merging off on the RAM backend through libvirt, not through vmshare."""
    cmd = json.dumps({"execute": "qom-set", "arguments": {
        "path": "/objects/pc.ram", "property": "merge", "value": False}})
    r = virsh("qemu-monitor-command", name, cmd)
    assert r.returncode == 0, r.stderr


def test_daemon_keeps_policy_across_save_restore_and_reset(
        guests: DebianGuests, daemon_dir: Path) -> None:
    on1, off, on3 = guests.names
    cfg = write_config(daemon_dir, {**forced(guests.names), off: "off"}, force=True)
    d = DaemonProc(cfg, daemon_dir / "daemon.log", domains=tuple(guests.names))
    try:
        wait_for(lambda: all_merge(off, False) and all_merge(on1, True), 30,
                 lambda: f"policy not applied:\n{d.text()[-3000:]}")
        # save/restore: the guests are adopted, so the restored QEMU starts with
        # nothing mergeable; the daemon must make the policy-on guest's RAM
        # mergeable again (and keep the policy-off one off)
        save = daemon_dir / f"{on1}.save"
        assert virsh("save", on1, str(save), timeout=300).returncode == 0
        t0 = time.monotonic()
        r = virsh("restore", str(save), timeout=300)
        assert r.returncode == 0, r.stderr
        save.unlink()
        wait_for(lambda: all_merge(on1, True), 30,
                 lambda: f"policy on not re-applied after restore:\n{d.text()[-3000:]}")
        print(f"policy on re-applied {time.monotonic() - t0:.2f} s after restore")
        records = audit_lines(daemon_dir / "audit.jsonl")
        assert any(r["target"] == f"{on1}/pc.ram" and r["after"] is True
                   # named a restore, though QEMU restores through an incoming
                   # migration (and says MIGRATION completed first)
                   and "(restore)" in str(r.get("event"))
                   for r in records), \
            [(r["target"], r["after"], r.get("event")) for r in records]
        assert all_merge(off, False)
        # a guest RESET: the reset is tracked, the policy still holds
        assert virsh("reset", on3).returncode == 0
        wait_for(lambda: "reset" in _remerge_events(cfg, on3), 30,
                 lambda: f"no reset tracked for {on3}:\n{d.text()[-3000:]}")
        assert all_merge(on3, True)
    finally:
        d.kill(signal.SIGTERM)


def _remerge_events(cfg: Path, name: str) -> str:
    doc = cli_json("remerge", "--json", "--config", str(cfg), config=cfg)
    return " ".join(str((v.get("remerge") or {}).get("event")) for v in doc["vms"]
                    if v["name"] == name)


def test_daemon_killed_in_the_middle_of_an_action_repeats_nothing(
        guests: DebianGuests, daemon_dir: Path) -> None:
    """SIGKILL the daemon while an action is pending in its state file (acted or
    not yet audited), restart it: the VM ends as its policy says and every
    change is in the audit log exactly once."""
    target = guests.names[0]
    cfg = write_config(daemon_dir, {**forced(guests.names), guests.names[1]: "off"}, force=True)
    state = daemon_dir / "state.json"
    caught = 0
    for attempt in range(6):
        d = DaemonProc(cfg, daemon_dir / f"kill-{attempt}.log", domains=tuple(guests.names))
        try:
            d.wait_log("reconciled", timeout=60)
            _flip_behind_the_daemons_back(target)
            deadline = time.monotonic() + 20     # the daemon resyncs every 5 s
            while time.monotonic() < deadline and not _pending(state, target):
                time.sleep(0.001)
            if _pending(state, target):
                d.kill(signal.SIGKILL)
                caught += 1
                break
        finally:
            d.kill(signal.SIGKILL)
    assert caught, "the daemon's action was never caught pending in six tries"
    assert _pending(state, target)
    d2 = DaemonProc(cfg, daemon_dir / "restarted.log", domains=tuple(guests.names))
    try:
        wait_for(lambda: all_merge(target, True) and not _pending(state, target), 30,
                 lambda: f"not brought back to policy:\n{d2.text()[-3000:]}")
        time.sleep(2)
    finally:
        d2.kill(signal.SIGTERM)
    records = audit_lines(daemon_dir / "audit.jsonl")
    ids = [r["id"] for r in records if r.get("id")]
    assert len(ids) == len(set(ids)), f"an audit record was written twice: {records}"
    turned_on = [r for r in records if r["target"] == f"{target}/pc.ram" and r["after"] is True]
    assert turned_on, records


def test_tuner_benchmark_produces_its_table(guests: DebianGuests) -> None:
    """benchmarks/tuner_vs_advisor.py --short on these guests: both runs scored."""
    r = subprocess.run([sys.executable, "benchmarks/tuner_vs_advisor.py", "--short",
                        "--domains", ",".join(guests.names[:2])], cwd=REPO,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line for line in r.stdout.splitlines()
            if line.split()[:1] in (["vmshare"], ["advisor-matched"])}
    assert set(rows) == {"vmshare", "advisor-matched"}, r.stdout
    assert "advisor_target_scan_time=" in rows["advisor-matched"]
    assert "machine: " in r.stdout and " cores, " in r.stdout and "Linux " in r.stdout
    print(r.stdout)


def _cross_group_frames(guests: DebianGuests, groups: dict[str, str]) -> set[int]:
    """KSM frames mapped by guests of two different trust groups (pagemap and
    kpageflags over every mapping of each QEMU, independent of vmshare)."""
    frames = {name: ksm_pfns(guests.pid(name)) for name in guests.names}
    crossed: set[int] = set()
    for a in guests.names:
        for b in guests.names:
            if groups[a] < groups[b]:
                crossed |= frames[a] & frames[b]
    return crossed


def test_trust_groups_share_no_frame_across_a_group_change_and_a_restart(
        guests: DebianGuests, tmp_path: Path) -> None:
    """Guests 1 and 2 in trust group red, guest 3 in blue, under the daemon (no
    force): after the kernel converges no KSM frame is mapped by both groups;
    guest 3 moved to red at run time then merges with them; after a daemon
    restart with guest 3 back in blue, the groups are apart again."""
    one, two, three = guests.names
    groups = {one: "red", two: "red", three: "blue"}

    def config(assignment: dict[str, str]) -> Path:
        path = write_config(tmp_path, {n: "on" for n in guests.names})
        text = path.read_text()
        for name, group in assignment.items():
            text = text.replace(f'[vm."{name}"]\nmerge = "on"\n',
                                f'[vm."{name}"]\nmerge = "on"\ngroup = "{group}"\n')
        path.write_text(text)
        return path

    with ksm_session(require_root_ksm()) as sysfs:
        d = DaemonProc(config(groups), tmp_path / "groups.log", domains=tuple(guests.names))
        try:
            d.wait_log("reconciled", timeout=60)
            # red merges, blue is kept unmergeable (the first group to ask wins)
            wait_for(lambda: all_merge(one, True) and all_merge(three, False), 30,
                     lambda: d.text()[-3000:])
            converge(sysfs, timeout=300)
            assert not _cross_group_frames(guests, groups)
            assert ksm_pfns(guests.pid(one)) & ksm_pfns(guests.pid(two)), \
                "red's guests shared nothing: the check would be vacuous"
        finally:
            d.kill(signal.SIGTERM)
        # guest 3 joins red at run time: its policy in the domain's own metadata
        env = {**os.environ, "VMSHARE_CONFIG": str(tmp_path / "vmshare.toml"),
               "VMSHARE_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
        r = subprocess.run([sys.executable, "-m", "vmshare", "policy", "set", three,
                            "--group", "red", "--apply"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert all_merge(three, True)
        converge(sysfs, timeout=300)
        assert ksm_pfns(guests.pid(three)) & ksm_pfns(guests.pid(one))
        # back to blue, then the daemon restarted: it must part the groups again
        r = subprocess.run([sys.executable, "-m", "vmshare", "policy", "set", three,
                            "--group", "blue"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        d = DaemonProc(config(groups), tmp_path / "groups2.log", domains=tuple(guests.names))
        try:
            wait_for(lambda: all_merge(three, False), 60, lambda: d.text()[-3000:])
            converge(sysfs, timeout=300)
            assert not _cross_group_frames(guests, groups)
        finally:
            d.kill(signal.SIGTERM)
