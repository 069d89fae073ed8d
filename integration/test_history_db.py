"""The history database with the real daemon: it imports the JSON-lines history
an earlier version left, writes a real SQLite file that `vmshare history` reads
(another process) while the daemon writes it, and, started on a damaged file,
moves it aside, audits that, starts a new one and keeps running.

The daemon manages no domain (VMSHARE_DAEMON_DOMAINS names none), so it only
observes: host counters go into the samples, nothing is changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import REPO, DaemonProc, audit_lines, wait_for, write_config
from integration.domains import IT_DOMAIN_PREFIX
from tests.hostguard import RUN_ID

pytestmark = pytest.mark.integration
NOBODY = (f"{IT_DOMAIN_PREFIX}hdb{RUN_ID}-none-*",)


def history(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmshare", "history", "--config", str(cfg),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def samples(cfg: Path) -> list[dict[str, Any]]:
    r = history(cfg, "--json", "--resolution", "raw")
    assert r.returncode == 0, r.stderr
    found: list[dict[str, Any]] = json.loads(r.stdout)["samples"]
    return found


def stop(d: DaemonProc) -> None:
    d.kill(signal.SIGTERM)
    assert d.proc.returncode == 0, d.text()[-3000:]


def test_daemon_imports_writes_while_read_and_replaces_a_damaged_db(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {})
    db = tmp_path / "history.sqlite"
    legacy = tmp_path / "history.jsonl"
    old = time.time() - 3 * 86400
    legacy.write_text("".join(json.dumps({"time": old + 60 * i, "host": {"pages_sharing": i},
                                          "vms": {"gone": {"saved_bytes": 4096 * i}}}) + "\n"
                              for i in range(100)) + '{"time": 1, "torn')
    d = DaemonProc(cfg, tmp_path / "daemon.log", domains=NOBODY)
    try:
        d.wait_log("imported the JSON-lines history")
        assert not legacy.exists() and (tmp_path / "history.jsonl.imported").exists()
        # a reader process, again and again, while the daemon writes a sample a second
        counts = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            got = samples(cfg)
            assert all(s["time"] > 0 for s in got)
            counts.append(len(got))
        assert counts == sorted(counts) and counts[-1] - counts[0] >= 3, counts
        assert counts[0] >= 100                       # the imported ones, and the new
        text = history(cfg, "--since", "30d")
        assert text.returncode == 0 and "history starts" in text.stderr
        assert db.exists() and db.read_bytes()[:16] == b"SQLite format 3\0"
    finally:
        stop(d)

    db.write_bytes(b"not a database, whatever it was\n" * 512)
    (tmp_path / "history.sqlite-wal").unlink(missing_ok=True)
    r = history(cfg)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is damaged" in r.stderr
    d = DaemonProc(cfg, tmp_path / "daemon2.log", domains=NOBODY)
    try:
        d.wait_log("moved it aside as")
        # the database and its sidecar (-shm; -wal was removed above) went aside together
        aside, *sidecars = sorted(tmp_path.glob("history.sqlite.corrupt-*"))
        assert [p.name for p in sidecars] == [aside.name + "-shm"]
        assert aside.read_bytes().startswith(b"not a database, whatever it was")
        wait_for(lambda: len(samples(cfg)) >= 3, 30, lambda: d.text()[-3000:])
        assert d.proc.poll() is None                 # and it keeps running
        [rec] = [r for r in audit_lines(tmp_path / "audit.jsonl") if r["action"] == "history"]
        assert (rec["actor"], rec["before"], rec["after"]) == ("daemon", str(db), str(aside))
        assert os.stat(db).st_mode & 0o777 == 0o600
    finally:
        stop(d)
