"""The history database: schema migrations, what aggregates mean, retention in
bounded steps, the answer for a window and what it lacks, the JSON-lines
import, and a damaged database moved aside."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import host, run  # noqa: F401 - host is a fixture
from vmshare.records import history_schema as hs
from vmshare.records.audit import AuditLog
from vmshare.records.history import HistoryError
from vmshare.records.history_db import HistoryCorrupt, HistoryDb, HistoryTooNew, Retention
from vmshare.records.history_keeper import HistoryKeeper, import_legacy
from vmshare.records.history_query import answer

DAY = 86400.0
NOW = 1_789_999_200.0      # 2026-09-21 14:00 UTC: a whole hour, so buckets line up


def sample(t: float, i: int, vms: int = 2) -> dict[str, Any]:
    return {"time": t, "host": {"pages_sharing": 10 * i, "pages_shared": i, "full_scans": i},
            "vms": {f"vm{j}": {"saved_bytes": 4096 * (i + j), "ksm_pages": i + j,
                               "ram_bytes": 2**30} for j in range(vms)}}


def filled(path: Path, start: float, end: float, step: float = 30.0) -> HistoryDb:
    db = HistoryDb.open_writer(path)
    n = int((end - start) // step)
    db.append_many(sample(start + step * i, i) for i in range(n))
    return db


# ------------------------------------------------------------------ schema


def test_a_v1_database_is_migrated_with_its_samples(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    hs.migrate(conn, upto=1)                 # the version 1 schema, as it was
    assert hs.schema_version(conn) == 1
    conn.execute("INSERT INTO host_raw (time, pages_sharing, full_scans) VALUES (10.5, 7, 3)")
    conn.executemany("INSERT INTO vm_raw (time, name, saved_bytes, ksm_pages) VALUES (?,?,?,?)",
                     [(10.5, "web-1", 8192, 2), (10.5, "db \"x\"", 4096, 1)])
    conn.close()
    db = HistoryDb.open_writer(path)
    assert hs.schema_version(db.conn) == hs.SCHEMA_VERSION == 2
    assert db.samples("raw", 0.0) == [{
        "time": 10.5, "host": {"pages_sharing": 7, "full_scans": 3},
        "vms": {"web-1": {"saved_bytes": 8192, "ksm_pages": 2},
                'db "x"': {"saved_bytes": 4096, "ksm_pages": 1}}}]
    db.append(sample(20.0, 1))               # and the migrated database takes new samples
    assert [s["time"] for s in db.samples("raw", 0.0)] == [10.5, 20.0]
    db.close()
    # opening again migrates nothing and loses nothing
    assert len(HistoryDb.open_reader(path).samples("raw", 0.0)) == 2


def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    HistoryDb.open_writer(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 9")
    conn.close()
    before = path.read_bytes()
    for opener in (HistoryDb.open_writer, HistoryDb.open_reader):
        with pytest.raises(HistoryTooNew, match="schema version 9, newer than this vmshare's 2"):
            opener(path)
    assert path.read_bytes() == before


def test_wal_mode_and_private_file(tmp_path: Path) -> None:
    db = HistoryDb.open_writer(tmp_path / "d" / "h.sqlite")
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "d" / "h.sqlite").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o700


# ------------------------------------------------------------------ aggregates


def test_aggregates_are_mean_min_max_of_gauges_and_last_of_counters(tmp_path: Path) -> None:
    db = HistoryDb.open_writer(tmp_path / "h.sqlite")
    t0 = NOW - 3600
    values = [5, 1, 9, 3]                     # four samples in one 5-minute bucket
    db.append_many({"time": t0 + 60 * k, "host": {"pages_sharing": v, "full_scans": 100 + k},
                    "vms": {"a": {"saved_bytes": v * 4096}} if k != 2 else {}}
                   for k, v in enumerate(values))
    live = db.samples("5m", 0.0)
    assert db.maintain(NOW, Retention()) is False
    stored = db.samples("5m", 0.0)
    for got in (live, stored):                # folded or computed on the fly: the same
        [b] = got
        assert (b["time"], b["span"], b["n"]) == (t0, 300, 4)
        assert b["host"] == {"pages_sharing": 4, "full_scans": 103}    # mean 4.5 -> 4
        assert b["host_min"] == {"pages_sharing": 1} and b["host_max"] == {"pages_sharing": 9}
        # vm "a" ran in three of the samples: its mean is over those three
        assert b["vms"]["a"] == {"saved_bytes": round((5 + 1 + 3) / 3 * 4096)}
        assert b["vms_min"]["a"] == {"saved_bytes": 4096}
        assert b["vms_max"]["a"] == {"saved_bytes": 5 * 4096}
    [h] = db.samples("1h", 0.0)
    assert (h["n"], h["host"]["full_scans"]) == (4, 103)


def test_retention_keeps_each_resolution_its_time_in_bounded_steps(tmp_path: Path) -> None:
    db = filled(tmp_path / "h.sqlite", NOW - 20 * DAY, NOW, step=300.0)
    keep = Retention(raw=2 * DAY, five_min=5 * DAY, hourly=10 * DAY)
    steps = 0
    while db.maintain(NOW, keep, budget_s=0.0):     # one transaction per call
        steps += 1
    assert steps > 20
    starts = db.starts()
    assert starts["raw"] == pytest.approx(NOW - 2 * DAY, abs=300)
    assert db._first_agg(300) == pytest.approx(NOW - 5 * DAY, abs=300)
    assert db._first_agg(3600) == pytest.approx(NOW - 10 * DAY, abs=3600)
    # every raw sample dropped was folded first: the hourly means cover the 10 days whole
    hours = db.samples("1h", NOW - 10 * DAY)
    assert len(hours) == 240 and all(h["n"] == 12 for h in hours)
    assert db.maintain(NOW, keep) is False


def test_raw_samples_stay_until_folded(tmp_path: Path) -> None:
    db = filled(tmp_path / "h.sqlite", NOW - 3 * DAY, NOW, step=600.0)
    first = db.starts()["raw"]
    keep = Retention(raw=0.5 * DAY, five_min=DAY, hourly=DAY)
    assert db.maintain(NOW, keep, budget_s=0.0) is True     # one fold step, then out of time
    assert db.starts()["raw"] == first                      # nothing dropped before folding
    while db.maintain(NOW, keep, budget_s=0.0):
        pass
    assert db.starts()["raw"] == pytest.approx(NOW - 0.5 * DAY, abs=600)
    hours = db.samples("1h", NOW - DAY)
    assert len(hours) == 24 and all(h["n"] == 6 for h in hours)


def test_a_stray_old_sample_costs_no_step_per_empty_hour(tmp_path: Path) -> None:
    db = filled(tmp_path / "h.sqlite", NOW - DAY, NOW, step=300.0)
    db.append(sample(1.0, 1))                   # 1970: a clock that was not yet set
    calls = 1
    while db.maintain(NOW, Retention(), budget_s=0.0):
        calls += 1
    # folding a day in hours (24 + 288 / 12) and the 1970 sample, then dropping it
    assert calls < 60, calls
    assert db.starts()["raw"] == pytest.approx(NOW - DAY, abs=300)
    assert db._first_agg(3600) == pytest.approx(NOW - DAY, abs=3600)


# ------------------------------------------------------------------ answers


def test_since_30d_says_what_it_lacks_and_which_resolution(tmp_path: Path) -> None:
    db = filled(tmp_path / "h.sqlite", NOW - 16 * DAY, NOW, step=120.0)
    db.maintain(NOW, Retention(), budget_s=60)
    a = answer(db, NOW - 30 * DAY, now=NOW)
    assert a.resolution == "1h" and len(a.samples) == 16 * 24
    assert a.lacks.startswith("history starts ") and "(16.0 days ago); showing what there is" \
        in a.lacks
    b = answer(db, NOW - 3 * DAY, now=NOW)
    assert (b.resolution, b.lacks) == ("5m", "") and len(b.samples) == 3 * 288
    c = answer(db, NOW - 2 * 3600, now=NOW)
    assert c.resolution == "raw" and len(c.samples) == 59     # newer than since: 2 h less one
    # a forced resolution that does not reach back says where the rest is
    db.maintain(NOW, Retention(raw=DAY), budget_s=60)
    d = answer(db, NOW - 3 * DAY, resolution="raw", now=NOW)
    assert "raw samples start" in d.lacks and "--resolution 5m or 1h" in d.lacks
    assert json.loads(json.dumps(d.to_json()))["resolution_seconds"] is None


def test_cli_reports_the_gap_on_stderr_and_in_json(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import time
    now = time.time()
    filled(tmp_path / "h.sqlite", now - 8 * DAY, now, step=300.0).close()
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\n')
    code, out, err = run(capsys, "history", "--since", "30d", "--json", "--config", str(cfg))
    doc = json.loads(out)
    assert code == 0 and doc["lacks"] and err == f"vmshare: warning: {doc['lacks']}\n"
    assert doc["resolution"] == "1h" and doc["resolution_seconds"] == 3600
    code, out, err = run(capsys, "history", "--since", "30d", "--config", str(cfg))
    assert "(hourly aggregates: means)" in out.splitlines()[0] and "history starts" in err


# ------------------------------------------------------------------ import


def _legacy(path: Path, times: range) -> None:
    path.write_text("".join(json.dumps(sample(float(t), t)) + "\n" for t in times))


def test_import_takes_both_files_once_and_keeps_them(tmp_path: Path) -> None:
    legacy = tmp_path / "history.jsonl"
    _legacy(legacy.with_name("history.jsonl.1"), range(1, 501))
    _legacy(legacy, range(501, 1201))
    db = HistoryDb.open_writer(tmp_path / "history.sqlite")
    assert import_legacy(db, legacy, NOW) == 1200
    assert [s["time"] for s in db.samples("raw", 0.0)] == [float(t) for t in range(1, 1201)]
    assert sorted(p.name for p in tmp_path.iterdir() if "jsonl" in p.name) == \
        ["history.jsonl.1.imported", "history.jsonl.imported"]
    assert import_legacy(db, legacy, NOW) == 0          # nothing left to import


def test_an_interrupted_import_runs_again_without_duplicates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = tmp_path / "history.jsonl"
    _legacy(legacy, range(1, 1301))
    db = HistoryDb.open_writer(tmp_path / "history.sqlite")
    # the first start got through two batches (two transactions), then died
    lines = [json.loads(x) for x in legacy.read_text().splitlines()]
    db.append_many(lines[:500])
    db.append_many(lines[500:1000])
    db.close()
    db = HistoryDb.open_writer(tmp_path / "history.sqlite")
    # the second start imports the rest, then cannot rename (dies there, say)
    def refuse(*_a: object) -> None:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(HistoryError, match=r"imported .* but cannot rename it"):
        import_legacy(db, legacy, NOW)
    monkeypatch.undo()
    assert db.count_raw(0.0) == 1300 and legacy.exists()
    # the third: already in (the database noted it), so only renamed
    assert import_legacy(db, legacy, NOW) == 0
    assert db.count_raw(0.0) == 1300
    assert not legacy.exists() and (tmp_path / "history.jsonl.imported").exists()


# ------------------------------------------------------------------ damage


def test_a_damaged_database_is_moved_aside_and_audited(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    audit = AuditLog(tmp_path / "audit.jsonl", actor="daemon")
    keeper = HistoryKeeper(path, None, Retention(), audit, clock=lambda: NOW)
    keeper.record(sample(NOW, 1))
    [aside] = tmp_path.glob("h.sqlite.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not an SQLite database")
    assert [s["time"] for s in HistoryDb.open_reader(path).samples("raw", 0.0)] == [NOW]
    [rec] = [r for r in audit.read() if not isinstance(r, str)]
    assert (rec.action, rec.before, rec.after) == ("history", str(path), str(aside))
    assert "is damaged" in rec.reason


def test_a_page_damaged_later_is_found_by_the_check(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    filled(path, NOW - DAY, NOW, step=30.0).close()
    with open(path, "r+b") as f:            # scribble over interior b-tree pages
        f.seek(8 * 4096)
        f.write(b"\xff" * 4096 * 4)
    with pytest.raises(HistoryCorrupt):
        HistoryDb.open_writer(path)
    keeper = HistoryKeeper(path, None, Retention(), AuditLog(tmp_path / "a.jsonl"),
                           clock=lambda: NOW)
    keeper.record(sample(NOW + 30, 1))
    assert len(list(tmp_path.glob("h.sqlite.corrupt-*"))) == 1


def test_cli_says_one_line_for_a_damaged_database(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "h.sqlite").write_bytes(b"\0garbage" * 1000)
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\n')
    code, out, err = run(capsys, "history", "--config", str(cfg))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "is damaged (file is not a database)" in err
    assert "the daemon moves it aside" in err


def test_a_directory_in_its_place_is_not_moved(tmp_path: Path) -> None:
    (tmp_path / "h.sqlite").mkdir()
    keeper = HistoryKeeper(tmp_path / "h.sqlite", None, Retention(),
                           AuditLog(tmp_path / "a.jsonl"), clock=lambda: NOW)
    with pytest.raises(HistoryError):
        keeper.record(sample(NOW, 1))
    assert (tmp_path / "h.sqlite").is_dir()


# ------------------------------------------------------------------ concurrency

WRITER = """
import sys, time
from pathlib import Path
from vmshare.records.history_db import HistoryDb, Retention
db = HistoryDb.open_writer(Path(sys.argv[1]))
t = 1_790_000_000.0
for i in range(int(sys.argv[2])):
    db.append({"time": t + 30 * i, "host": {"pages_sharing": i},
               "vms": {f"vm{j}": {"saved_bytes": i} for j in range(50)}})
    if i % 50 == 0:
        db.maintain(t + 30 * i, Retention(raw=3600.0, five_min=7200.0, hourly=86400.0))
print("done")
"""
READER = """
import sys
from pathlib import Path
from vmshare.records.history_db import HistoryDb
from vmshare.records.history_query import answer
seen = []
while len(seen) < 2 or seen[-1] < int(sys.argv[2]) - 1:
    db = HistoryDb.open_reader(Path(sys.argv[1]))
    a = answer(db, 0.0, resolution="raw", now=1_790_000_000.0 + 30 * int(sys.argv[2]))
    db.close()
    if a.samples:
        assert all(len(s["vms"]) == 50 for s in a.samples)    # never half a sample
        seen.append(a.samples[-1]["host"]["pages_sharing"])
print(len(seen), seen == sorted(seen))
"""


def test_a_reader_process_reads_while_a_writer_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    HistoryDb.open_writer(path).close()
    n = "1500"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), n],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = subprocess.run([sys.executable, "-c", READER, str(path), n],
                            capture_output=True, text=True, timeout=120)
    w_out, w_err = writer.communicate(timeout=120)
    assert writer.returncode == 0 and w_out == "done\n", w_err
    assert reader.returncode == 0, reader.stderr
    reads, ordered = reader.stdout.split()
    assert int(reads) >= 2 and ordered == "True"


def test_a_sample_sqlite_cannot_hold_is_refused_whole(tmp_path: Path) -> None:
    db = HistoryDb.open_writer(tmp_path / "h.sqlite")
    with pytest.raises(HistoryError, match="cannot store a sample"):
        db.append_many([sample(10.0, 1), {"time": 20.0, "host": {"pages_sharing": 2**64},
                                          "vms": {"new-vm": {"saved_bytes": 1}}}])
    assert db.count_raw(0.0) == 0                  # the batch rolled back whole
    db.append(sample(30.0, 1, vms=3))              # and the VM ids were forgotten with it
    assert sorted(db.samples("raw", 0.0)[0]["vms"]) == ["vm0", "vm1", "vm2"]


def test_a_database_it_cannot_open_is_retried_later_not_every_sample(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    HistoryDb.open_writer(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 9")        # a newer vmshare's
    conn.close()
    clock = [NOW]
    keeper = HistoryKeeper(path, None, Retention(), AuditLog(tmp_path / "a.jsonl"),
                           clock=lambda: clock[0])
    with pytest.raises(HistoryError, match="newer than this vmshare's 2; trying again in 300 s"):
        keeper.record(sample(NOW, 1))
    clock[0] += 60
    keeper.record(sample(clock[0], 2))            # within the wait: dropped, no error
    assert keeper.dropped == 1 and not list(tmp_path.glob("h.sqlite.corrupt-*"))
    clock[0] += 300
    with pytest.raises(HistoryError, match="schema version 9"):
        keeper.record(sample(clock[0], 3))        # tried again, still newer: left alone
    assert not list(tmp_path.glob("h.sqlite.corrupt-*"))


def test_report_charts_the_history_and_says_what_it_lacks(
        host: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    import time
    now = time.time()
    filled(tmp_path / "h.sqlite", now - 2 * DAY, now, step=600.0).close()
    cfg = tmp_path / "vmshare.toml"
    cfg.write_text(f'[daemon]\nhistory_db = "{tmp_path}/h.sqlite"\n')
    target = tmp_path / "r.html"
    code, _, err = run(capsys, "report", "--html", str(target), "--since", "30d",
                       "--config", str(cfg))
    assert code == 0 and "history starts" in err and "(2.0 days ago)" in err
    page = target.read_text()
    assert "<polyline" in page and "No history yet" not in page
