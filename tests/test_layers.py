"""The import direction of ../shared/ARCHITECTURE.md, checked by walking every
module's imports (ast: nothing is imported or run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vmshare"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def own(module: str) -> set[str]:
    return {i for i in GRAPH[module] if i == "vmshare" or i.startswith("vmshare.")}


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_was_read() -> None:
    assert {"vmshare.cli.main", "vmshare.engine.core", "vmshare.sources.live",
            "vmshare.hypervisor.libvirt"} <= set(GRAPH)
    assert "vmshare.engine.state" in own("vmshare.engine.core")


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if under(m, "vmshare.engine")))
def test_engine_has_no_io_and_no_adapter_imports(module: str) -> None:
    bad = {i for i in own(module)
           if not under(i, "vmshare.engine", "vmshare.model", "vmshare.errors")}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", ["vmshare.model", "vmshare.errors"])
def test_model_and_errors_import_nothing_of_vmshare(module: str) -> None:
    assert not own(module), f"{module} imports {sorted(own(module))}"


def test_each_outside_world_has_one_adapter() -> None:
    libvirt_users = {m for m, imps in GRAPH.items()
                     if any(under(i, "libvirt", "libvirt_qemu", "libvirtaio") for i in imps)}
    assert libvirt_users == {"vmshare.hypervisor.libvirt", "vmshare.hypervisor.libvirt_events"}
    qmp_users = {m for m, imps in GRAPH.items() if any(under(i, "qemu") for i in imps)}
    assert qmp_users == {"vmshare.hypervisor.qmp"}


def test_only_the_edges_import_the_edges() -> None:
    edges = {m for m in GRAPH if under(m, "vmshare.cli", "vmshare.daemon.service",
                                       "vmshare.__main__")}
    for module in set(GRAPH) - edges:
        bad = {i for i in own(module) if i in edges and i != "vmshare.cli"}
        assert not bad, f"{module} imports the edge {sorted(bad)}"


ADAPTER_EXCEPTIONS: dict[str, set[str]] = {}
ABOVE_ADAPTERS = ("vmshare.observe", "vmshare.control", "vmshare.prediction", "vmshare.present",
                  "vmshare.policy", "vmshare.daemon", "vmshare.tuner", "vmshare.records",
                  "vmshare.cli")


@pytest.mark.parametrize("module", sorted(
    m for m in GRAPH if under(m, "vmshare.ksm", "vmshare.sources", "vmshare.hypervisor")))
def test_adapters_do_not_import_what_sits_above_them(module: str) -> None:
    allowed = ADAPTER_EXCEPTIONS.get(module, set())
    bad = {i for i in own(module) if under(i, *ABOVE_ADAPTERS) and i not in allowed}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", [
    "vmshare.observe.host", "vmshare.observe.attribution", "vmshare.present.text",
    "vmshare.present.html", "vmshare.present.metrics", "vmshare.records.history",
    "vmshare.prediction.predict", "vmshare.prediction.scanning"])
def test_what_measures_never_imports_what_acts(module: str) -> None:
    bad = {i for i in own(module) if under(i, "vmshare.control", "vmshare.daemon")}
    assert not bad, f"{module} imports {sorted(bad)}"
