"""The daemon serves the exporter ([daemon] metrics_listen): one process per host.
Its figures are the exporter's, plus the daemon's own (refused input by kind)."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import DaemonProc, wait_for, write_config
from integration.domains import domain_name
from vmshare.guest import FillSpec

pytestmark = pytest.mark.integration


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text: str = reply.read().decode()
        return text


def value(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_daemon_serves_metrics_and_counts_bad_input(boot_guests: Any,
                                                         tmp_path: Path) -> None:
    name = domain_name("dmetrics")
    boot_guests([name], FillSpec(identical_mib=8, unique_mib=8), memory_mib=128)
    cfg = write_config(tmp_path, {name: "on"})
    cfg.write_text(cfg.read_text() + 'metrics_listen = "127.0.0.1:0"\n'
                   "metrics_interval = 1.0\nmetrics_cpu_budget = 50.0\n")
    d = DaemonProc(cfg, tmp_path / "daemon.log", domains=(name,))
    try:
        d.wait_log("serving Prometheus metrics on http://127.0.0.1:", timeout=60)
        found = re.search(r"serving Prometheus metrics on (\S+)", d.text())
        assert found, d.text()[-2000:]
        url = found.group(1)

        def with_guest() -> str | None:
            text = scrape(url)
            return text if f'domain="{name}"' in text else None

        text = wait_for(with_guest, 30, lambda: f"no series of {name}:\n{d.text()[-2000:]}")
        assert value(text, f'vmshare_vm_ram_bytes{{domain="{name}"') == 128 * 2**20
        assert value(text, "vmshare_scrape_errors ") == 0.0, text
        assert value(text, "vmshare_ksm_available ") == 1.0
        # a spool entry that is not JSON: set aside, counted, served
        spool = tmp_path / "spool"
        (spool / f"{'9' * 19}-1-{'f' * 16}.json").write_bytes(b"\x00 not json")
        os.chmod(spool / f"{'9' * 19}-1-{'f' * 16}.json", 0o600)
        wait_for(lambda: (value(scrape(url),
                                'vmshare_daemon_bad_inputs_total{kind="spool_entry"}') or 0) >= 1,
                 30, lambda: f"bad entry not counted:\n{scrape(url)[:3000]}\n{d.text()[-2000:]}")
    finally:
        d.kill(signal.SIGTERM)
    assert d.proc.returncode == 0, d.text()[-3000:]
    # libvirt closes its last connection after the event loop: never a traceback
    assert "Traceback" not in d.text(), d.text()[-3000:]
