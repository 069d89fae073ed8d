from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vmshare.observe.remerge import (
    RemergeRecord,
    annotate_status,
    describe,
    fraction,
    progress,
    read_state,
    status_lines,
)


def test_fraction_math() -> None:
    assert fraction(0, 100) is None
    assert fraction(1000, 0) == 0.0
    assert fraction(1000, 250) == 0.25
    assert fraction(1000, 5000) == 1.0


def test_progress_fields() -> None:
    rec = RemergeRecord("restore", 100.0, 2000, 42)
    assert progress(rec, 500, now=130.0) == {"event": "restore", "since_seconds": 30.0,
                                             "previous_ksm_pages": 2000, "fraction": 0.25}


def test_annotate_only_for_the_recorded_process() -> None:
    state = {"vms": {"a": {"remerge": RemergeRecord("reset", 10.0, 100, 7).to_json()},
                     "b": {"remerge": RemergeRecord("restore", 10.0, 100, 8).to_json()}}}
    doc: dict[str, Any] = {"vms": [{"name": "a", "running": True, "pid": 7, "ksm_pages": 50},
                                   {"name": "b", "running": True, "pid": 9, "ksm_pages": 50},
                                   {"name": "c", "running": True, "pid": 3, "ksm_pages": 1}]}
    annotate_status(doc, state, now=20.0)
    assert doc["vms"][0]["remerge"]["fraction"] == 0.5
    assert doc["vms"][1]["remerge"] is None      # restarted since: another process
    assert doc["vms"][2]["remerge"] is None
    assert status_lines(doc) == ["re-merge: a: reset 10 s ago: 50% re-merged "
                                 "(previously 100 KSM pages)"]
    assert describe(None) is None


def test_read_state_tolerates_missing_and_corrupt(tmp_path: Path) -> None:
    assert read_state(tmp_path / "none.json")["vms"] == {}
    bad = tmp_path / "bad.json"
    bad.write_text('{"vms": [')
    assert read_state(bad)["vms"] == {}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"version": 1, "vms": {"x": {}}}))
    assert read_state(good)["vms"] == {"x": {}}


def test_malformed_record_is_ignored() -> None:
    assert RemergeRecord.from_json({"event": "reset", "time": "x"}) is None
    assert RemergeRecord.from_json({"event": "reset", "time": 1, "previous_ksm_pages": -1}) \
        is None
