"""Text from guests and domains reaches the terminal and log lines escaped, and
qemu.qmp's own ERROR lines stay out of a user's way (issue 12 defect 12,
issue 13's first part)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.hypervisor import FakeHypervisor, FakeVm
from tests.fakes.qmp_server import FakeQmpServer
from vmshare.cli.main import escaped_log_records, main
from vmshare.model import VmRef
from vmshare.present.text import table, visible

REPO = Path(__file__).resolve().parent.parent
EVIL = "web\x1b[2J\x1b]0;pwned\x07\rvmshare: ERROR: forged\n\u202etxt.exe\x9b31m"
CONTROLS = [chr(c) for c in (*range(0x20), *range(0x7f, 0xa0))] + [
    "\u2028", "\u2029", "\u202a", "\u202e", "\u2066", "\u2069"]


def printable_only(text: str, allow: str = "\n") -> bool:
    return not any(c in CONTROLS and c not in allow for c in text)


def test_visible_escapes_every_control_and_keeps_the_rest() -> None:
    for c in CONTROLS:
        shown = visible(f"a{c}b")
        assert printable_only(shown, allow="") and shown.startswith("a\\") and shown.endswith("b")
    assert visible("\x1b[31m\n\r\t") == "\\x1b[31m\\n\\r\\t"
    assert visible("\u202e") == "\\u202e" and visible("\x9b") == "\\x9b"
    plain = "web-1 café 日本 a\\b 80.1 MiB"
    assert visible(plain) == plain


def test_table_cells_cannot_break_the_table() -> None:
    text = table(["DOMAIN", "STATE"], [[EVIL, "running"], ["web-2", "shut off"]])
    lines = text.splitlines()
    assert len(lines) == 3 and printable_only(text)
    # Columns still line up: STATE starts at the same offset on every line.
    assert len({line.index(word) for line, word in
                zip(lines, ("STATE", "running", "shut off"), strict=True)}) == 1


@pytest.fixture
def evil_host(monkeypatch: pytest.MonkeyPatch) -> FakeHypervisor:
    hv = FakeHypervisor([FakeVm(VmRef(EVIL, "55555555-5555-5555-5555-555555555555", None,
                                      False), None)])
    monkeypatch.setattr("vmshare.hypervisor.connect", lambda *a, **k: hv)
    return hv


def test_list_shows_a_hostile_domain_name_escaped(evil_host: FakeHypervisor,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert printable_only(out) and len(out.splitlines()) == 2
    assert visible(EVIL) in out


def test_error_line_with_a_hostile_name_is_one_escaped_line(
        evil_host: FakeHypervisor, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vmshare.errors import DomainNotFound

    def lookup(ident: str) -> VmRef:      # a message that does not quote the name
        raise DomainNotFound(f"no domain {ident} here")
    monkeypatch.setattr(evil_host, "lookup", lookup)
    code = main(["enable", EVIL])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and printable_only(err)
    assert err == f"vmshare: error: no domain {visible(EVIL)} here\n"


def test_log_records_are_escaped_under_any_formatter() -> None:
    """The daemon's own handler and format (vmshare.daemon.service) included."""
    from vmshare.daemon.service import LOG_FORMAT
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger(f"vmshare.daemon.vm.{EVIL}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with escaped_log_records():
            logger.warning("domain %s: %r gone", EVIL, EVIL)
            logger.warning(EVIL)
        escaped = stream.getvalue()
        logger.warning("after: %s", "a\x1bb")      # the factory is restored on exit
    finally:
        logger.removeHandler(handler)
    lines = escaped.splitlines()
    assert len(lines) == 2 and printable_only(escaped)
    assert lines[0].endswith(f"domain {visible(EVIL)}: {visible(repr(EVIL))} gone")
    assert f"vmshare.daemon.vm.{visible(EVIL)}:" in lines[0]
    assert "after: a\x1bb" in stream.getvalue()[len(escaped):]


@pytest.fixture
def silent_qmp() -> Iterator[str]:
    # A short directory: unix socket paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vq") as d:
        path = os.path.join(d, "vm.qmp")
        server = FakeQmpServer(path, greet=False).start()
        try:
            yield path
        finally:
            server.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmshare", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("verbosity", [[], ["-v"]])
def test_qmp_greeting_timeout_is_vmshare_s_one_line(silent_qmp: str,
                                                    verbosity: list[str]) -> None:
    proc = cli("--qmp", silent_qmp, "--deadline", "1", *verbosity, "list")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"vmshare: error: QEMU monitor at {silent_qmp}: no QMP greeting within 1 s "
        "(another client connected?)"]


def test_qmp_library_lines_still_show_with_debug(silent_qmp: str) -> None:
    proc = cli("--qmp", silent_qmp, "--deadline", "1", "--debug", "list")
    assert "qemu.qmp" in proc.stderr and "no QMP greeting" in proc.stderr
