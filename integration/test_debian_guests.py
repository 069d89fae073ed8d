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
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.debian_guests import (
    DebianGuests,
    booted_debian_guests,
    independent_saved_pages,
    mergeable_ranges,
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


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The CLI with this module's own config and audit log."""
    tmp = tmp_path_factory.mktemp("debian-cli")
    config = tmp / "vmshare.toml"
    config.write_text('[host]\ndefault_merge = "on"\n')
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
