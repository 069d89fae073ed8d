"""The fleet on a real Prometheus: two vmshare exporters standing for two hosts
(each scoped to its own guests, distinct instance labels) scraped every second by
Debian's Prometheus with the shipped recording rules; what Prometheus holds
equals `vmshare status --json` on each "host", `vmshare fleet status` reads the
fleet back, and every expression of the shipped Grafana dashboard runs and
returns series. A real VictoriaMetrics (Debian's package) scrapes the same
exporters: `vmshare fleet status` and `fleet history` through its API give
what they give through Prometheus's."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import BootGuests
from integration.ksm_fixtures import converge, kernel_ksm  # noqa: F401 - fixture
from integration.prometheus_fixture import Prometheus, exporters, prometheus, victoria
from vmshare.guest import FillSpec
from vmshare.ksm.sysfs import KsmSysfs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "contrib" / "grafana" / "vmshare-dashboard.json"
SPEC = FillSpec(identical_mib=48, unique_mib=8, zero_mib=0, seed=21)
#: Prometheus, the hosts' guests, the CLI's environment, kernel KSM, VictoriaMetrics
Fleet = tuple[Prometheus, dict[str, list[str]], dict[str, str], KsmSysfs, Prometheus]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmshare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def fleet(boot_guests: BootGuests, kernel_ksm: KsmSysfs,  # noqa: F811 - fixture
          tmp_path: Path) -> Iterator[Fleet]:
    tag = secrets.token_hex(3)
    hosts = {"host-a": [f"vmshare-it-prom-{tag}-a{i}" for i in (1, 2)],
             "host-b": [f"vmshare-it-prom-{tag}-b{i}" for i in (1, 2)]}
    boot_guests([n for names in hosts.values() for n in names], SPEC, memory_mib=192)
    drifted = hosts["host-a"][0]
    config = tmp_path / "vmshare.toml"
    # every guest is mergeable (QEMU's default); policy says one of them must not be
    config.write_text('[host]\ndefault_merge = "on"\n'
                      f'[vm."{drifted}"]\nmerge = "off"\n')
    env = {**os.environ, "VMSHARE_CONFIG": str(config),
           "VMSHARE_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    converge(kernel_ksm, timeout=120)
    kernel_ksm.set("run", 0)          # hold the merged state still while comparing
    scopes = {h: [f"vmshare-it-prom-{tag}-{h[-1]}*"] for h in hosts}
    with exporters(scopes, config, env) as running, prometheus(running) as prom, \
            victoria(running) as vm:
        yield prom, hosts, env, kernel_ksm, vm


def latest_by_domain(prom: Prometheus, expr: str) -> dict[str, float]:
    return {s["metric"]["domain"]: float(s["value"][1]) for s in prom.query(expr)}


def test_prometheus_holds_what_status_says_and_fleet_reads_it(fleet: Fleet) -> None:
    prom, hosts, env, _, vm = fleet
    for instance, names in hosts.items():
        sel = f'job="vmshare",instance="{instance}"'
        prom.wait_for(f"vmshare_vm_saved_bytes{{{sel}}}", len(names))
        time.sleep(2.5)        # a scrape of a snapshot taken after ksmd stopped
        held = latest_by_domain(prom, f"vmshare_vm_saved_bytes{{{sel}}}")
        r = cli("status", "--json", *names, env=env)
        assert r.returncode == 0, r.stderr
        status = {vm["name"]: vm["saved_bytes"] for vm in json.loads(r.stdout)["vms"]}
        assert set(held) == set(names), held
        for name in names:
            assert status[name] > 40 * 2**20, status
            assert held[name] == pytest.approx(status[name], rel=0.01), (name, held, status)
        groups = {s["metric"]["trust_group"] for s in prom.query(
            f"vmshare_vm_ram_bytes{{{sel}}}")}
        assert groups == {"default"}
    # ... and `vmshare fleet` reads the fleet back through the API
    doc = fleet_read(prom, hosts, env)
    rows = {h["instance"]: h for h in doc["hosts"]}
    assert all(h["up"] is True and h["vms"] == 2 for h in rows.values()), rows
    assert rows["host-a"]["drifted"] == [hosts["host-a"][0]]
    assert rows["host-b"]["drifted"] == []
    assert doc["total_saved_bytes"] > 0
    text = cli("fleet", "status", "--prometheus", prom.url, env=env)
    assert text.returncode == 0 and "2 hosts, 4 VMs" in text.stdout, text.stdout
    # ... and through VictoriaMetrics's API, scraping the same exporters
    via_vm = fleet_read(vm, hosts, env)
    vm_rows = {h["instance"]: h for h in via_vm["hosts"]}
    for inst, row in rows.items():
        other = vm_rows[inst]
        for key in ("up", "vms", "drifted", "ksm"):
            assert other[key] == row[key], (key, other, row)
        assert other["saved_bytes"] == pytest.approx(row["saved_bytes"], rel=0.01), (other, row)
        assert other["age_seconds"] is not None and other["age_seconds"] < 60, other
    assert {(t["instance"], t["domain"]) for t in via_vm["top"]} == \
        {(t["instance"], t["domain"]) for t in doc["top"]} != set()


def fleet_read(server: Prometheus, hosts: dict[str, list[str]], env: dict[str, str]
               ) -> dict[str, Any]:
    """`vmshare fleet status --json` through ``server``'s API, once it holds
    every VM's policy series; checks that it names every host and that `fleet
    history` answers for each too."""
    server.wait_for('vmshare_vm_policy_merge{job="vmshare"}', 4)
    r = cli("fleet", "status", "--prometheus", server.url, "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    assert {h["instance"] for h in doc["hosts"]} == set(hosts), doc
    history = cli("fleet", "history", "--prometheus", server.url, "--since", "5m", "--json",
                  env=env)
    assert history.returncode == 0, history.stderr
    assert set(json.loads(history.stdout)["hosts"]) == set(hosts)
    return doc


def test_every_dashboard_expression_runs_and_returns_series(fleet: Fleet) -> None:
    prom, _, env, _, _ = fleet
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    # rates need two samples in their window, and recording rules their first evaluation
    prom.wait_for("instance:vmshare_ksmd_cpu:rate5m", 2, timeout=30)
    empty = []
    for expr in exprs:
        concrete = expr.replace('instance=~"$instance"', 'instance=~".*"')
        if not prom.query(concrete):
            empty.append(expr)
    assert not empty, f"dashboard expressions with no series: {empty}"
    # a URL that is not the API is one line, not a traceback
    r = cli("fleet", "status", "--prometheus", prom.url + "/nonexistent-prefix", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
