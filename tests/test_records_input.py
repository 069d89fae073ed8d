"""Issue 12 defects 2 and 10 at the CLI: report --html through devices, history rows,
bad history lines, strict JSON out, audit records of a newer writer."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.test_cli import host, run  # noqa: F401 - host is a fixture
from vmshare.cli.context import emit_json
from vmshare.records.audit import AuditLog, AuditRecord
from vmshare.records.history_db import HistoryDb
from vmshare.records.history_keeper import import_legacy


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_report_html_refuses_a_device(host: object, tmp_path: Path,  # noqa: F811
                                      capsys: pytest.CaptureFixture[str], device: str) -> None:
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\n')
    before = os.lstat(device)
    code, out, err = run(capsys, "report", "--html", device, "--config", str(cfg))
    assert (code, out) == (2, "")
    assert err == (f"vmshare: error: refusing to write {device}: it is a character device, "
                   "not a regular file\n")
    after = os.lstat(device)
    assert stat.S_ISCHR(after.st_mode) and (after.st_rdev, after.st_mode) == \
        (before.st_rdev, before.st_mode)


def _history(tmp_path: Path) -> tuple[Path, Path]:
    """A config naming a database and a JSON-lines history of three samples."""
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\n'
                   f'history_file = "{tmp_path}/h.jsonl"\n')
    legacy = tmp_path / "h.jsonl"
    legacy.write_bytes(b"".join(b'{"time": %d, "host": {"pages_sharing": %d}, "vms": {}}\n'
                                % (t, t) for t in (1, 2, 3)))
    return cfg, legacy


@pytest.mark.parametrize("rows", ["0", "-3", "10001"])
def test_history_rows_out_of_range_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           rows: str) -> None:
    cfg, _ = _history(tmp_path)
    code, out, err = run(capsys, "history", "--rows", rows, "--config", str(cfg))
    assert (code, out) == (2, "")
    assert err == f"vmshare: error: --rows must be between 1 and 10000, not {rows}\n"


def test_history_import_counts_bad_lines_and_prints_strict_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    cfg, legacy = _history(tmp_path)
    code, out, _ = run(capsys, "history", "--config", str(cfg))
    assert code == 0 and out.endswith(f"; it imports {legacy} when it starts\n")
    with open(legacy, "ab") as f:
        f.write(b'{"time": 1e999, "host": {}}\n')                   # overflows to inf
        f.write(b'{"time": NaN}\n')
        f.write(b'{"time": 4, "host": {"pages_sharing": ' + b"9" * 5000 + b"}}\n")
        f.write(b"[" * 100_000 + b"\n")
        f.write(b'{"time": 5, "vms": {"a": {"saved_bytes": "lots"}}}\n')
        f.write(b'{"time": 6, "host": {"pages_sharing": 6}')       # torn
    db = HistoryDb.open_writer(tmp_path / "h.sqlite")
    with caplog.at_level("INFO", logger="vmshare.history"):
        assert import_legacy(db, legacy, now=10.0) == 3
    assert f"imported the JSON-lines history {legacy} into {db.path} (6 lines skipped)" \
        in caplog.text
    assert not legacy.exists() and (tmp_path / "h.jsonl.imported").exists()
    code, out, err = run(capsys, "history", "--json", "--config", str(cfg))
    # samples of 1970: the one warning is the gap from the last of them to now
    assert code == 0 and err.startswith("vmshare: warning: no samples for ") \
        and err.endswith(" to now (vmshare's daemon was not recording)\n") \
        and err.count("\n") == 1, err
    assert "Infinity" not in out and "NaN" not in out
    assert [s["time"] for s in json.loads(out)["samples"]] == [1.0, 2.0, 3.0]
    code, out, err = run(capsys, "history", "--rows", "1", "--config", str(cfg))
    assert code == 0 and "3 samples" in out


def test_emit_json_never_prints_non_finite(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        emit_json({"x": float("inf")})
    assert capsys.readouterr().out == ""


def test_audit_record_of_a_newer_writer_is_kept(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    rec = log.record("merge", "vm/pc.ram", False, True, "test", vm="vm")
    newer = json.loads(rec.to_json()) | {"host": "h1", "signature": {"alg": "x"}}
    with open(log.path, "a") as f:
        f.write(json.dumps(newer) + "\n")
    items = list(log.read())
    assert len(items) == 2 and all(isinstance(i, AuditRecord) for i in items)
    second = items[1]
    assert isinstance(second, AuditRecord)
    assert second.extra == {"host": "h1", "signature": {"alg": "x"}}
    assert json.loads(second.to_json()) == newer       # written back as read


@pytest.mark.parametrize("line,problem", [
    (b'{"time": 1, "actor": 5, "before": 1, "after": 2}', "'actor' is an integer, not a string"),
    (b'{"time": "1", "before": 1, "after": 2, "actor": "a", "user": "u", "action": "x", '
     b'"target": "t", "reason": "r", "pid": 1}', "'time' is a string, not a number"),
    (b'{"time": 1, "before": 1}', "'after' is missing"),
    (b'[1]', "not a JSON object"),
    (b'{"time": NaN}', "NaN is not a JSON number"),
    (b'{"pid": ' + b"1" * 5000 + b"}", "not acceptable JSON"),
    (b"[" * 50_000, "nested deeper than 32 levels"),
])
def test_audit_lines_of_the_wrong_shape_are_reported(tmp_path: Path, line: bytes,
                                                     problem: str) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.path.write_bytes(line + b"\n")
    [item] = list(log.read())
    assert isinstance(item, str) and "audit.jsonl:1: " in item and problem in item
