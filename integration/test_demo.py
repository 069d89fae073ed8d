"""`vmshare demo`, the README's first command, run as a user runs it: guests booted,
made mergeable, merged by kernel KSM, per-VM savings shown, guests destroyed and
every KSM knob restored."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from integration.ksm_fixtures import require_root_ksm

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def test_demo_shows_per_vm_savings_and_leaves_nothing_behind() -> None:
    sysfs = require_root_ksm()
    before = sysfs.snapshot().values
    r = subprocess.run([sys.executable, "-m", "vmshare", "demo", "--guests", "2",
                        "--memory", "192", "--identical", "64", "--unique", "16", "--zero", "8",
                        "--timeout", "180"], cwd=REPO, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    rows = re.findall(r"^(vmshare-demo-[12])\s+\d+\s.*$", out, re.M)
    assert sorted(rows) == ["vmshare-demo-1", "vmshare-demo-2"], out
    saved = re.search(r"VMs saved ([\d.]+) MiB of the host's ([\d.]+) MiB", out)
    assert saved, out
    # two guests sharing 64 MiB: each saves about half of it (plus kernel pages)
    assert float(saved.group(1)) >= 0.95 * 64, out
    assert "Guests destroyed; KSM knobs restored" in out
    assert sysfs.snapshot().values == before
    left = subprocess.run(["virsh", "-q", "list", "--all", "--name"], capture_output=True,
                          text=True, timeout=60).stdout.split()
    assert not [n for n in left if n.startswith("vmshare-demo-")], left
