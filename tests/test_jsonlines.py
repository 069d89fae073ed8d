"""The shared JSON-lines reader (audit log, legacy history)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmshare.records.jsonlines import read_lines
from vmshare.records.schema import RecordError, decode


def parse(raw: bytes, what: str) -> object:
    doc = decode(raw, RecordError, what, max_bytes=100)
    if not isinstance(doc, dict):
        raise RecordError(f"{what}: not a JSON object")
    return doc


def test_lines_parsed_in_order_and_bad_lines_handed_back(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a": 1}\nnot json\n[1]\n{"b": 2}\n{"torn": ')
    got = list(read_lines(p, parse, RecordError, "the test file"))
    assert got[0] == {"a": 1} and got[3] == {"b": 2}
    bad = [g for g in got if isinstance(g, RecordError)]
    assert len(bad) == 3
    assert f"{p}:2" in str(bad[0]) and f"{p}:3" in str(bad[1]) and f"{p}:5" in str(bad[2])


def test_missing_file_has_no_lines(tmp_path: Path) -> None:
    assert list(read_lines(tmp_path / "absent", parse, RecordError, "x")) == []


def test_unreadable_path_names_the_label(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="cannot read the test dir"):
        list(read_lines(tmp_path, parse, RecordError, "the test dir"))
