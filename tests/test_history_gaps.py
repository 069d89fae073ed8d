"""Stretches of a window with no sample (the daemon stopped) are reported, by
`vmshare history` on stderr and in its JSON, and never invented."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_cli import run
from tests.test_history_db import DAY, NOW, filled, sample
from vmshare.records.history_db import HistoryDb, Retention
from vmshare.records.history_query import answer, find_gaps


def test_find_gaps_between_samples_and_at_the_end() -> None:
    assert find_gaps([0, 60, 120, 180], 60, 200) == []
    assert find_gaps([0, 60, 600, 660], 60, 700) == [(60, 600)]
    assert find_gaps([0, 60], 60, 1000) == [(60, 1000)]
    assert find_gaps([0, 60], 60, 1000, trailing_slack=900) == []
    assert find_gaps([], 60, 1000) == []


def test_a_stopped_daemon_leaves_a_gap_in_raw_and_in_aggregates(tmp_path: Path) -> None:
    db = HistoryDb.open_writer(tmp_path / "h.sqlite")
    before = [NOW - 2 * DAY + 60 * i for i in range(600)]          # 10 h, then a stop
    after = [NOW - DAY + 60 * i for i in range(1440)]               # a day, up to now
    db.append_many(sample(t, i) for i, t in enumerate(before + after))
    db.maintain(NOW, Retention(), budget_s=60)
    raw = answer(db, NOW - 2 * DAY, resolution="raw", raw_step=60.0, now=NOW)
    assert raw.gaps == [(before[-1], after[0])]
    five = answer(db, NOW - 2 * DAY, resolution="5m", raw_step=60.0, now=NOW)
    assert len(five.gaps) == 1
    a, b = five.gaps[0]
    assert before[-1] - 300 <= a <= before[-1] and after[0] <= b <= after[0] + 300
    assert answer(db, NOW - DAY / 2, raw_step=60.0, now=NOW).gaps == []
    note = raw.gaps_note()
    assert note.startswith("no samples for 14.0 h from ") and "not recording" in note


def test_cli_names_the_gap_and_json_lists_it(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    db = filled(tmp_path / "h.sqlite", now - 3 * 3600, now - 2 * 3600, step=60.0)
    db.append_many(sample(now - 3600 + 60 * i, i) for i in range(60))
    db.close()
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\nhistory_interval = 60.0\n')
    code, out, err = run(capsys, "history", "--since", "3h", "--json", "--config", str(cfg))
    doc = json.loads(out)
    assert code == 0 and len(doc["gaps"]) == 1
    assert doc["gaps"][0]["seconds"] == pytest.approx(3600 - 60 + 60, abs=61)
    assert "no samples for 1.0 h" in err
