"""Numbers and strings from the command line are checked before they reach
arithmetic, a wait or a connection (issue 12, defects 8 and 9)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmshare.cli import argtypes
from vmshare.cli.main import main

REPO = Path(__file__).resolve().parent.parent
BAD_SECONDS = ["inf", "-inf", "1e308", "nan", "0", "-1", "3601", "ten", ""]


def usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI in-process; it must stop at argument parsing with exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("value", BAD_SECONDS)
def test_deadline_must_be_finite_positive_and_bounded(capsys: pytest.CaptureFixture[str],
                                                      value: str) -> None:
    err = usage_error(capsys, f"--deadline={value}", "list")
    assert "argument --deadline" in err and repr(value) in err


def test_deadline_in_range_is_taken() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deadline", type=argtypes.DEADLINE)
    assert parser.parse_args(["--deadline", "0.5"]).deadline == 0.5
    assert parser.parse_args(["--deadline", "3600"]).deadline == 3600.0


def test_deadline_inf_exits_2_at_once_not_70() -> None:
    """The reported failure: exit 70 (OverflowError) or a wait past 15 s."""
    env = {**os.environ, "VMSHARE_SYSFS_ROOT": "/nonexistent", "VMSHARE_PROC_ROOT": "/nonexistent"}
    for value in ("inf", "1e308"):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "vmshare", "--deadline", value, "list"],
                           capture_output=True, text=True, timeout=30, cwd=REPO, env=env)
        assert p.returncode == 2, p.stderr
        assert time.monotonic() - t0 < 10
        assert "at most 3600" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [
    ["tune", "--interval", "nan"], ["tune", "--interval", "inf"], ["tune", "--interval", "0"],
    ["tune", "--cpu-budget", "nan"], ["tune", "--cpu-budget", "0"],
    ["tune", "--tight", "-5"], ["tune", "--ample", "inf"], ["tune", "--steps", "-1"],
    ["scan", "--interval", "inf", "x"], ["scan", "--interval", "-1", "x"],
    ["scan", "--count", "-3", "x"], ["scan", "--count", "9" * 5000, "x"],
    ["predict", "--scans", "0", "--dump", "x"], ["predict", "--pid", "0"],
    ["predict", "--pid", "99999999999"], ["predict", "--max-page-sharing", "1", "--dump", "x"],
    ["daemon", "--observe-interval", "nan"], ["daemon", "--resync-interval", "-5"],
    ["daemon", "--resync-interval", "1e308"], ["demo", "--timeout", "inf"],
])
def test_number_options_are_range_checked(capsys: pytest.CaptureFixture[str],
                                          args: list[str]) -> None:
    err = usage_error(capsys, *args)
    assert f"argument {args[1]}" in err.splitlines()[-1]


def test_huge_integer_text_is_refused_quickly() -> None:
    parse = argtypes.bounded_int(0, 10)
    t0 = time.monotonic()
    with pytest.raises(argparse.ArgumentTypeError, match="not an integer"):
        parse("7" * 100_000)
    assert time.monotonic() - t0 < 0.1
    assert parse(" 10 ") == 10


@pytest.mark.parametrize("args", [["-c", "", "list"], ["--connect=", "list"],
                                  ["-c", "  ", "status"], ["--qmp", "", "list"]])
def test_empty_uri_or_socket_is_refused(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch,
                                        args: list[str]) -> None:
    """`-c ''` (an unset $URI) must not reach qemu:///system."""
    called: list[object] = []
    monkeypatch.setattr("vmshare.hypervisor.connect", lambda *a, **k: called.append(a))
    err = usage_error(capsys, *args)
    assert "empty" in err and "leave the option out" in err
    assert called == []
