"""The golden-file helper of tests/test_cli.py: it checks, or with
VMSHARE_UPDATE_GOLDEN rewrites and fails anyway, and refuses to rewrite under CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import test_cli

Failed = pytest.fail.Exception


@pytest.fixture
def golden_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(test_cli, "GOLDEN", tmp_path)
    monkeypatch.setattr(test_cli, "_updated", [])
    monkeypatch.delenv("VMSHARE_UPDATE_GOLDEN", raising=False)
    monkeypatch.delenv("CI", raising=False)
    (tmp_path / "out.txt").write_text("old\n")
    return tmp_path


def test_a_check_passes_on_a_match_and_fails_on_a_difference(golden_dir: Path) -> None:
    test_cli.golden("out.txt", "old\n")
    with pytest.raises(AssertionError, match="output differs"):
        test_cli.golden("out.txt", "new\n")
    assert (golden_dir / "out.txt").read_text() == "old\n"


def test_an_update_rewrites_and_still_fails(golden_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSHARE_UPDATE_GOLDEN", "1")
    with pytest.raises(Failed, match=r"updated .*out\.txt \(1 golden files updated") as err:
        test_cli.golden("out.txt", "new\n")
    assert "rerun without VMSHARE_UPDATE_GOLDEN" in str(err.value)
    assert (golden_dir / "out.txt").read_text() == "new\n"
    with pytest.raises(Failed, match=r"2 golden files updated"):
        test_cli.golden("fresh.txt", "made\n")
    assert (golden_dir / "fresh.txt").read_text() == "made\n"


def test_an_update_that_changes_nothing_fails_too(golden_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSHARE_UPDATE_GOLDEN", "1")
    with pytest.raises(Failed, match="already matches; rerun without"):
        test_cli.golden("out.txt", "old\n")


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_an_update_is_refused_under_ci(golden_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       ci: str) -> None:
    monkeypatch.setenv("VMSHARE_UPDATE_GOLDEN", "1")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(Failed, match="VMSHARE_UPDATE_GOLDEN is set under CI"):
        test_cli.golden("out.txt", "new\n")
    assert (golden_dir / "out.txt").read_text() == "old\n"


def test_ci_false_is_no_ci(golden_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSHARE_UPDATE_GOLDEN", "1")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(Failed, match="updated"):
        test_cli.golden("out.txt", "new\n")
