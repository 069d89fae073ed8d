"""The shipped logrotate file with the real logrotate: rotating the audit log
while writers append as fast as they can loses no record and duplicates none
(every writer opens, appends one record under flock and closes, so rename
rotation needs no signal). The shipped file's stanza is used as it ships, on a
temporary path."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "contrib" / "vmshare.logrotate"
WRITER = """
import sys
from pathlib import Path
from vmshare.records.audit import AuditLog
log = AuditLog(Path(sys.argv[1]), actor="test")
for i in range(int(sys.argv[3])):
    log.record("merge", f"{sys.argv[2]}/{i}", True, False, "rotation test", vm=sys.argv[2])
"""


def records(directory: Path) -> list[dict[str, object]]:
    found = []
    for path in sorted(directory.glob("audit.jsonl*")):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        found += [json.loads(line) for line in raw.decode().splitlines()]
    return found


def test_rotation_while_writing_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate")
    if logrotate is None:
        pytest.skip("logrotate is not installed (integration/setup.sh installs it)")
    log = tmp_path / "audit.jsonl"
    stanza = SHIPPED.read_text().replace("/var/log/vmshare/audit.jsonl", str(log))
    stanza = stanza.replace("create 0600 root root", "create 0600")   # the test's own user
    conf = tmp_path / "logrotate.conf"
    conf.write_text(stanza)
    per_writer, writers = 3000, 3
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(log), f"w{n}",
                               str(per_writer)], cwd=REPO) for n in range(writers)]
    rotations = 0
    # fewer rotations than the stanza keeps (rotate 12): none is deleted by design
    while any(p.poll() is None for p in procs) and rotations < 10:
        time.sleep(0.15)
        r = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rotations += 1
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert rotations >= 3, f"the writers finished before {rotations} rotations"
    got = records(tmp_path)
    targets = [str(r["target"]) for r in got]
    assert len(targets) == len(set(targets)), "a record was written twice"
    assert sorted(targets) == sorted(f"w{n}/{i}" for n in range(writers)
                                     for i in range(per_writer)), \
        f"{writers * per_writer - len(set(targets))} records lost over {rotations} rotations"
    assert len(list(tmp_path.glob("audit.jsonl.*"))) >= 2
