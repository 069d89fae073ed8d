"""vmshare.records.audit: append-only JSON lines, 0600, torn last line tolerated, ids."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from vmshare.records.audit import AUDIT_ENV, AuditError, AuditLog, AuditRecord, audit_path


def test_append_and_read_back(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "sub" / "audit.jsonl", actor="cli")
    r1 = log.record("merge", "vm1/pc.ram", False, True, "vmshare enable", vm="vm1")
    r2 = log.record("policy", "vm1", None, {"merge": "on", "group": None, "force": False},
                    "vmshare policy set", vm="vm1", id="k1", event="e1")
    got = list(log.read())
    assert got == [r1, r2]
    assert r1.actor == "cli" and r1.pid == os.getpid() and r1.user
    lines = log.path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["target"] == "vm1/pc.ram"
    assert log.ids() == {"k1"}


def test_mode_0600_and_dir_0700(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "d" / "audit.jsonl")
    log.record("merge", "a/b", False, True, "r")
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700


def test_torn_last_line_is_reported_not_fatal(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    good = log.record("merge", "a/b", False, True, "r")
    with open(log.path, "ab") as f:
        f.write(b'{"time": 1.0, "actor": "cli", "us')
    items = list(log.read())
    assert items[0] == good
    assert isinstance(items[1], str)
    assert re.search(r"audit.jsonl:2: not JSON .*\(record skipped\)$", items[1])


def test_record_after_torn_line_is_readable(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.path.write_bytes(b'{"time": 1.0, "actor": "cli", "us')
    later = log.record("merge", "a/b", True, False, "r")
    assert later in list(log.read())


def test_wrong_fields_are_unreadable(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    p.write_text('{"nope": 1}\n[1,2]\n')
    items = list(AuditLog(p).read())
    assert all(isinstance(i, str) for i in items) and len(items) == 2


def test_missing_log_reads_empty(tmp_path: Path) -> None:
    assert list(AuditLog(tmp_path / "none.jsonl").read()) == []


def test_env_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "x.jsonl"))
    assert audit_path() == tmp_path / "x.jsonl"
    assert audit_path(tmp_path / "y") == tmp_path / "y"


def test_oversized_record_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(AuditError, match="too large"):
        log.record("merge", "a", None, "x" * 70_000, "r")
    assert not log.path.exists() or log.path.read_text() == ""


def test_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(AuditError):
        AuditLog(tmp_path / "file" / "audit.jsonl").record("merge", "a", 1, 2, "r")


def test_record_json_is_one_sorted_line() -> None:
    rec = AuditRecord(1.5, "cli", "root", 1, "merge", "a/b", False, True, "why")
    text = rec.to_json()
    assert "\n" not in text and list(json.loads(text)) == sorted(json.loads(text))
