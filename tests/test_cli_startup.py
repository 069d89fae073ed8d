"""Start-up pays only for the command that runs: building the parser (every
command's ``register``), ``--version`` and ``--help`` import none of the heavy
packages (guest builders, the libvirt adapter, the exporter, numpy, the
engine); the command that runs imports what it needs. And the parser's copies
of defaults that live in heavy packages (vmshare.cli.shown) equal their source.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmshare.cli import shown

#: packages that the parser must not import (each is a real module: see
#: test_the_check_sees_heavy_imports)
HEAVY = ("vmshare.guest", "vmshare.hypervisor", "libvirt", "prometheus_client",
         "vmshare.daemon", "numpy", "vmshare.engine", "vmshare.observe", "vmshare.ksm",
         "vmshare.prediction", "vmshare.present", "vmshare.fleet", "vmshare.promapi",
         "vmshare.records", "vmshare.tuner", "vmshare.policy", "vmshare.hook",
         "vmshare.config", "vmshare.model")

#: what `predict --pid` needs none of: the dump readers, and shutil (with bz2
#: and lzma), which argparse's own help formatter imports
NOT_FOR_PID = ("vmshare.sources.elf", "vmshare.sources.kdump", "vmshare.sources.codecs",
               "vmshare.sources.raw", "shutil", "bz2", "lzma")

#: run in a fresh interpreter: ``calls`` (argument lists for main; "SELF" is
#: the probe's own pid), then print as JSON the modules the process holds
PROBE = """
import contextlib, io, json, os, sys
from vmshare.cli import main
main.build_parser()
for argv in json.loads(sys.argv[1]):
    argv = [str(os.getpid()) if x == "SELF" else x for x in argv]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main.main(argv)
for name in json.loads(sys.argv[2]):
    __import__(name)
print(json.dumps(sorted(sys.modules)))
"""


def loaded(calls: list[list[str]], imports: tuple[str, ...] = ()) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls), json.dumps(imports)],
                          capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(proc.stdout))


def heavy_in(modules: set[str]) -> list[str]:
    return sorted(h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules))


@pytest.mark.parametrize("calls", [
    [],
    [["--version"]],
    [["--help"]],
    [["predict", "--help"]],
    [["demo", "--help"], ["metrics", "--help"], ["fleet", "status", "--help"]],
], ids=["build_parser", "version", "help", "predict-help", "demo-metrics-fleet-help"])
def test_parser_imports_no_heavy_package(calls: list[list[str]]) -> None:
    assert heavy_in(loaded(calls)) == []


def test_the_check_sees_heavy_imports(tmp_path: Path) -> None:
    """The same probe, running a command and importing the demo's and the
    exporter's machinery, finds every name of HEAVY: the names are right and
    the check above can fail."""
    raw = tmp_path / "ram.raw"
    raw.write_bytes(bytes(4096) * 4 + b"\x01" * 4096)
    modules = loaded([["predict", "--raw", str(raw), "--json"]],
                     ("vmshare.cli.demorun", "vmshare.daemon.metrics_http", "vmshare.fleet.status",
                      "vmshare.tuner.loop", "vmshare.hook.install", "vmshare.policy.sources"))
    assert heavy_in(modules) == sorted(HEAVY)


def test_predict_pid_imports_only_what_it_reads() -> None:
    """`predict --pid` (the probe predicting its own memory) loads the engine
    but neither the dump readers nor shutil; a dump does load its reader, so
    the names are real and the check can fail."""
    pid_run = loaded([["predict", "--pid", "SELF", "--json", "--scans", "1"]])
    assert "vmshare.engine" in pid_run
    assert sorted(set(NOT_FOR_PID) & pid_run) == []
    assert sorted(set(NOT_FOR_PID) & loaded([], ("vmshare.sources.kdump", "vmshare.sources.elf",
                                                 "vmshare.sources.raw", "shutil"))) == \
        sorted(NOT_FOR_PID)


@pytest.mark.parametrize(("copy", "module", "source"), shown.SOURCES)
def test_shown_copies_equal_their_source(copy: str, module: str, source: str) -> None:
    value: object = importlib.import_module(module)
    for part in source.split("."):
        value = getattr(value, part)
    assert getattr(shown, copy) == (str(value) if isinstance(value, Path) else value)
