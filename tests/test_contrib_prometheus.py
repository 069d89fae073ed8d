"""The shipped Prometheus rules, alerts and Grafana dashboard: checked and unit-tested
with the real promtool, and every metric they name is one the exporter exports or a
rule records (so a renamed metric cannot leave a dashboard silently empty)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "contrib" / "prometheus" / "vmshare-rules.yml"
RULE_TESTS = REPO / "contrib" / "prometheus" / "vmshare-rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "vmshare-dashboard.json"
GOLDEN_METRICS = REPO / "tests" / "golden" / "metrics.txt"
NAME = re.compile(r"\b((?:instance|fleet):[a-z0-9_:]+|vmshare_[a-z0-9_]+)")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; "
                    "integration/setup.sh installs it)")
    return path


def test_rules_pass_promtool_check() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rule_unit_tests_pass() -> None:
    r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("== 0\n        for: 5m", "== 2\n        for: 5m"))
    tests = tmp_path / "t.yml"
    tests.write_text(RULE_TESTS.read_text().replace("vmshare-rules.yml", "rules.yml"))
    r = subprocess.run([promtool(), "test", "rules", "t.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "VmshareExporterDown" in r.stdout + r.stderr


def exported_names() -> set[str]:
    names = set()
    for line in GOLDEN_METRICS.read_text().splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
    return names


def recorded_names() -> set[str]:
    return set(re.findall(r"^\s+- record: (\S+)", RULES.read_text(), re.M))


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in doc["templating"]["list"] if v.get("type") == "query"]
    return exprs


def test_dashboard_is_grafana_json_with_a_datasource_input() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["panels"] and doc["__inputs"][0]["pluginId"] == "prometheus"
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


@pytest.mark.parametrize("where", ["rules", "dashboard"])
def test_every_metric_named_is_exported_or_recorded(where: str) -> None:
    text = RULES.read_text() if where == "rules" else "\n".join(dashboard_exprs())
    used = set(NAME.findall(text)) - {"vmshare-rules"}
    known = exported_names() | recorded_names()
    assert used, "no metric found: the pattern is broken"
    assert not used - known, f"{where} name metrics nobody exports: {sorted(used - known)}"
