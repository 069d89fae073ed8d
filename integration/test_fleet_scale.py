"""benchmarks/fleet_scale.py in small: a synthetic fleet backfilled with the real
promtool into a real Prometheus, read back by the real `vmshare fleet` commands,
every answer checked against the model (the script exits 1 on a wrong one) and
the table printed. The full scale is a benchmark run by hand (README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from integration.prometheus_fixture import prometheus_binary

REPO = Path(__file__).resolve().parent.parent


def test_fleet_scale_small_form_checks_its_answers_and_prints_its_table(
        tmp_path: Path) -> None:
    prometheus_binary()           # skips with the reason when the package is missing
    proc = subprocess.run(
        [sys.executable, "benchmarks/fleet_scale.py", "--hosts", "101", "--vms", "3",
         "--hours", "2.5", "--repeat", "1", "--settle", "0", "--dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "answers: checked against the model" in out
    for name in ("status", "top", "history one host", "history fleet"):
        assert any(line.split("best")[0].strip() == name for line in out.splitlines()), out
    assert "fleet: 101 hosts, 300 VMs" in out          # host 1 is down: its VMs are gone
    assert "backfill: " in out and "machine: " in out
    assert list(tmp_path.iterdir()) == []              # text and TSDB removed
