"""What the import contracts cannot say, and proof that the contracts run.

The layer rules themselves are import-linter contracts in pyproject.toml
(``[tool.importlinter]``), checked by ``lint-imports`` in integration/test.sh
and here. This module adds:

(a) the contract run: the real contracts hold, and the same run fails on a
    contract the code breaks (a copy of the contract set plus one violated
    contract), including one broken only by a relative import inside a function;
(b) no import circles between modules (grimp's graph, function-level imports
    included);
(c) only the edges print: vmshare/cli/ and the daemon's entry point;
(d) only vmshare/ksm/ names /proc and /sys: every other package asks its
    procfs/sysfs adapters.

Each scanner is run on a sample that must trip it, so none of them can pass
by seeing nothing.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grimp
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vmshare"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def source_files(under: Path = PACKAGE) -> list[Path]:
    return sorted(under.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_of(module: str) -> Path:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- (a) the contract run ---------------------------------------------------------

def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return list(config["contracts"])


def write_config(path: Path, root_package: str, contract_list: list[dict[str, Any]]) -> None:
    """An import-linter TOML config (JSON values are valid TOML for these types)."""
    lines = ["[tool.importlinter]", f"root_package = {json.dumps(root_package)}",
             "include_external_packages = true"]
    for contract in contract_list:
        lines += ["", "[[tool.importlinter.contracts]]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in contract.items()]
    path.write_text("\n".join(lines) + "\n")


def lint_imports(config: Path, cwd: Path = REPO,
                 env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", str(config)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_import_contracts_hold() -> None:
    ids = {str(c["id"]) for c in contracts()}
    assert {"layers", "engine-no-io", "one-hypervisor-adapter", "measure-never-acts"} <= ids
    done = lint_imports(REPO / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(ids)} kept, 0 broken" in done.stdout


def test_the_engine_may_reach_only_model_and_errors() -> None:
    """Between them, the layers contract (which bars every layer above the
    engine's, and its independent siblings) and engine-no-io (which bars what
    lies below) leave the engine exactly vmshare.model and vmshare.errors."""
    contract = {str(c["id"]): c for c in contracts()}
    layers = [[tail.strip().strip("()") for tail in layer.replace(":", "|").split("|")]
              for layer in contract["layers"]["layers"]]
    level = next(i for i, layer in enumerate(layers) if "engine" in layer)
    assert ":" not in contract["layers"]["layers"][level], "engine's siblings must be independent"
    below = {f"vmshare.{tail}" for layer in layers[level + 1:] for tail in layer}
    forbidden = set(contract["engine-no-io"]["forbidden_modules"])
    assert contract["engine-no-io"]["source_modules"] == ["vmshare.engine"]
    assert below - forbidden == {"vmshare.model", "vmshare.errors"}


def test_the_contract_run_fails_on_a_broken_contract(tmp_path: Path) -> None:
    """The same run, over a copy of the contract set plus one the code must
    break (``python -m vmshare`` exists to call the CLI), fails and names it."""
    violated = {"id": "deliberately-broken", "name": "deliberately broken: __main__ skips cli",
                "type": "forbidden", "source_modules": ["vmshare.__main__"],
                "forbidden_modules": ["vmshare.cli"]}
    config = tmp_path / "contracts.toml"
    write_config(config, "vmshare", [*contracts(), violated])
    done = lint_imports(config)
    assert done.returncode != 0
    assert "deliberately broken: __main__ skips cli BROKEN" in done.stdout
    assert f"{len(contracts())} kept, 1 broken" in done.stdout


def test_relative_imports_inside_functions_break_contracts(tmp_path: Path) -> None:
    """A package whose one upward import is relative and inside a function: the
    run sees it (grimp reads every import statement, not only module-level ones)."""
    probe = tmp_path / "layersprobe"
    (probe / "low").mkdir(parents=True)
    (probe / "high").mkdir()
    for init in (probe, probe / "low", probe / "high"):
        (init / "__init__.py").write_text("")
    (probe / "high" / "top.py").write_text("from ..low import base\n")
    (probe / "low" / "base.py").write_text(
        "def late() -> None:\n    from ..high import top  # upward\n")
    config = tmp_path / "probe.toml"
    write_config(config, "layersprobe", [{"id": "probe", "name": "probe layers",
                                          "type": "layers",
                                          "layers": ["layersprobe.high", "layersprobe.low"]}])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = lint_imports(config, cwd=tmp_path, env=env)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "layersprobe.low.base -> layersprobe.high.top" in done.stdout
    (probe / "low" / "base.py").write_text("def late() -> None:\n    pass\n")
    assert lint_imports(config, cwd=tmp_path, env=env).returncode == 0


# --- (b) no import circles ------------------------------------------------------

def extension_modules(package: str) -> set[str]:
    """Compiled modules of ``package`` (a C extension with its .pyi stub): grimp
    reads .py files only, so it takes ``from pkg import _ext`` for an import of
    ``pkg`` itself."""
    folder = REPO.joinpath(*package.split("."))
    return {stub.stem for stub in folder.glob("*.pyi") if not (folder / f"{stub.stem}.py").exists()}


def import_graph() -> dict[str, set[str]]:
    """Module -> the vmshare modules it imports (function-level imports included),
    with imports of an extension module pointed at that module, not its package."""
    graph = grimp.build_graph("vmshare", cache_dir=None)
    edges: dict[str, set[str]] = {m: set(graph.find_modules_directly_imported_by(m))
                                  for m in graph.modules}
    for importer, imported_set in edges.items():
        for imported in list(imported_set):
            names = _only_extensions_named(graph, importer, imported)
            if names:
                imported_set.discard(imported)
                imported_set.update(f"{imported}.{n}" for n in names)
    return edges


def _only_extensions_named(graph: grimp.ImportGraph, importer: str, package: str) -> set[str]:
    """The extension modules ``importer`` takes from ``package``, if that is all
    it imports of it (else the empty set: the package itself is imported)."""
    extensions = extension_modules(package)
    if not extensions:
        return set()
    statements = {node.lineno: node for node in ast.walk(ast.parse(source_of(importer).read_text()))
                  if isinstance(node, ast.Import | ast.ImportFrom)}
    names: set[str] = set()
    for detail in graph.get_import_details(importer=importer, imported=package):
        node = statements[int(detail["line_number"])]
        # grimp already points the .py submodules named here at themselves
        taken = {a.name for a in node.names} & extensions if isinstance(node, ast.ImportFrom) \
            else set()
        if not taken:
            return set()
        names |= taken
    return names


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    work: list[tuple[str, Iterator[str]]] = []   # the depth-first path, each with its successors

    def enter(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        work.append((node, iter(sorted(edges.get(node, ())))))

    for root in sorted(edges):
        if root in index:
            continue
        enter(root)
        while work:
            node, successors = work[-1]
            nxt = next(successors, None)
            if nxt is not None:
                if nxt not in index:
                    enter(nxt)
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_circles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"},
             "f": {"g"}, "g": {"f"}}
    assert sorted(cycles(edges)) == [["a", "b", "c"], ["f", "g"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_holds_every_module_and_function_level_import() -> None:
    edges = import_graph()
    assert {module_name(p) for p in source_files()} <= set(edges)
    # every import written inside a function body is in the graph
    checked = 0
    for path in source_files():
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.startswith("vmshare."):
                    targets = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
                    assert targets & edges[module_name(path)], \
                        f"{relative(path)}:{node.lineno} is missing from the graph"
                    checked += 1
    assert checked, "no function-level import found to check"


def test_no_import_circles() -> None:
    found = cycles(import_graph())
    assert not found, f"import circles (each a set of modules that import each other): {found}"


# --- (c) only the edges print ---------------------------------------------------

EDGES = ("vmshare/cli/", "vmshare/daemon/service.py")
# Modules that write to a terminal though they are no edge, each with its reason.
MAY_WRITE: dict[str, str] = {
    # The progress bar draws on the stream it is given (stderr only by default),
    # and only when that stream is a terminal; the CLI decides whether to show it.
    "vmshare/present/progress.py": "a progress bar on a given stream",
}
_STREAMS = {"stdout", "stderr", "__stdout__", "__stderr__", "stdin", "__stdin__"}


def terminal_io(source: str) -> list[str]:
    """Where ``source`` prints, reads the terminal or touches the process's
    standard streams: print(), input(), breakpoint(), sys.stdout/stderr/stdin
    (any use, so handing them on counts too), and os.write to fd 1 or 2."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("print", "input", "breakpoint"):
            found.append(f"{node.lineno}: {node.func.id}()")
        elif isinstance(node, ast.Attribute) and node.attr in _STREAMS \
                and isinstance(node.value, ast.Name) and node.value.id == "sys":
            found.append(f"{node.lineno}: sys.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" \
                and {a.name for a in node.names} & _STREAMS:
            found.append(f"{node.lineno}: from sys import a stream")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "write" and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "os" and node.args \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value in (1, 2):
            found.append(f"{node.lineno}: os.write to fd {node.args[0].value}")
    return found


@pytest.mark.parametrize("sample", [
    "print('x')", "name = input()", "breakpoint()", "import sys\nsys.stdout.write('x')",
    "import sys\nstream = sys.stderr", "from sys import stdout", "import os\nos.write(2, b'x')",
])
def test_the_print_scan_sees(sample: str) -> None:
    assert terminal_io(sample)


def test_the_print_scan_lets_pass() -> None:
    assert terminal_io("import logging, os\nlogging.getLogger(__name__).info('x')\n"
                       "os.write(fd, b'x')\nout.write('x')\n") == []


def test_only_the_edges_print() -> None:
    offenders = {}
    for path in source_files():
        name = relative(path)
        if name.startswith(EDGES) or name in MAY_WRITE:
            continue
        found = terminal_io(path.read_text())
        if found:
            offenders[name] = found
    assert not offenders, f"only {', '.join(EDGES)} print; found {offenders}"


def test_every_print_exception_is_still_needed() -> None:
    stale = [name for name in MAY_WRITE if not terminal_io((REPO / name).read_text())]
    assert not stale, f"remove from MAY_WRITE: {stale}"
    assert not [name for name in MAY_WRITE if name.startswith(EDGES)]


# --- (d) only ksm/ names /proc and /sys -----------------------------------------

KERNEL_FILES = ("/proc", "/sys")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) \
                and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant):
            ids.add(id(node.body[0].value))
    return ids


def kernel_paths(source: str) -> list[str]:
    """String (and bytes, and f-string) literals in ``source`` that are a path
    under /proc or /sys, docstrings aside. Path("/proc") is one such literal; a
    message that starts with one ("/proc/kpageflags marks ...") has spaces,
    which no path there has, and is prose."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            first = node.values[0] if node.values else None
            text = first.value if isinstance(first, ast.Constant) else ""
        elif isinstance(node, ast.Constant) and id(node) not in skip \
                and isinstance(node.value, str | bytes):
            text = node.value
        else:
            continue
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        if isinstance(text, str) and text.startswith(KERNEL_FILES) \
                and not any(c.isspace() for c in text):
            found.append(f"{node.lineno}: {text[:40]!r}")
    return found


@pytest.mark.parametrize("sample", [
    "open('/proc/meminfo')", "p = Path('/proc')", "f'/proc/{pid}/mem'",
    "knob = b'/sys/kernel/mm/ksm/run'", "ROOT = '/sys'",
    "def f():\n    '''doc'''\n    return open('/proc/self/stat')",
])
def test_the_kernel_path_scan_sees(sample: str) -> None:
    assert kernel_paths(sample)


def test_the_kernel_path_scan_lets_pass() -> None:
    assert kernel_paths('"""/proc/<pid>/smaps, read by ksm."""\n'
                        "def f():\n    '''/sys/kernel/mm/ksm: its knobs.'''\n"
                        "x = 'reads /proc'\ny = f'{root}/proc'\n"
                        "raise E('/proc/kpageflags marks a page as KSM')\n") == []


def test_only_ksm_names_proc_and_sys() -> None:
    offenders = {}
    for path in source_files():
        if path.is_relative_to(PACKAGE / "ksm"):
            continue
        found = kernel_paths(path.read_text())
        if found:
            offenders[relative(path)] = found
    assert not offenders, f"only vmshare/ksm/ opens /proc and /sys; found {offenders}"
