"""Issue 12 defects 1, 6, 12 and 13 in the spool: poison entries, scope, bad/ cap,
the hook's lock, rate-limited and escaped warnings for datagrams."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from vmshare.daemon import spool, wakeup
from vmshare.daemon.rejects import Rejects
from vmshare.daemon.service import OneLineFormatter


def _entry(domain: object = "vm1", seq: object = 1, **extra: object) -> dict[str, object]:
    obj: dict[str, object] = {"v": 1, "domain": domain, "uuid": None, "operation": "started",
                              "sub_operation": "begin", "extra": "-", "time": 1.7e9,
                              "seq": seq, "boot_id": "b", "pid": 1, "xml": "ok"}
    obj.update(extra)
    return obj


POISON: dict[str, bytes] = {
    "digits": b'{"v": 1, "domain": "x", "seq": ' + b"9" * 5000 + b"}",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "nan": json.dumps(_entry()).replace('1700000000.0', "NaN").encode(),
    "infinity": json.dumps(_entry()).replace('1700000000.0', "-Infinity").encode(),
    "overflow": json.dumps(_entry()).replace('1700000000.0', "1e999").encode(),
    "huge-int-time": json.dumps(_entry(time=10**400)).encode(),
    "domain-list": json.dumps(_entry(domain=["a"])).encode(),
    "seq-float": json.dumps(_entry(seq=1.5)).encode(),
    "seq-negative": json.dumps(_entry(seq=-1)).encode(),
    "v-true": json.dumps(_entry(v=True)).encode(),
    "uuid-object": json.dumps(_entry(uuid={"a": 1})).encode(),
    "long-domain": json.dumps(_entry(domain="a" * 10_000)).encode(),
    "surrogate": b'{"v": 1, "domain": "\\ud800"}',
}


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return spool.ensure_spool_dir(tmp_path / "spool")


@pytest.mark.parametrize("kind", sorted(POISON))
def test_poison_entry_is_set_aside_and_its_neighbours_are_acted_on(
        spool_dir: Path, kind: str) -> None:
    (spool_dir / "1-1-before.json").write_text(json.dumps(_entry("before", seq=1)))
    (spool_dir / "2-1-poison.json").write_bytes(POISON[kind])
    (spool_dir / "3-1-after.json").write_text(json.dumps(_entry("after", seq=3)))
    rejects = Rejects()
    events = spool.drain(spool_dir, rejects=rejects)
    assert [e.domain for e in events] == ["before", "after"]
    assert [p.name for p in (spool_dir / spool.BAD_DIR).iterdir()] == ["2-1-poison.json"]
    assert rejects.counts == {"spool_entry": 1}
    assert sorted(p.name for p in spool_dir.iterdir()) == [spool.BAD_DIR]


def test_drain_in_a_scope_leaves_other_domains_entries(spool_dir: Path) -> None:
    (spool_dir / "1-1-a.json").write_text(json.dumps(_entry("web-1", seq=1)))
    (spool_dir / "2-1-b.json").write_text(json.dumps(_entry("db-1", seq=2)))
    events = spool.drain(spool_dir, scope=lambda name: name.startswith("web-"))
    assert [e.domain for e in events] == ["web-1"]
    assert [p.name for p in spool_dir.iterdir()] == ["2-1-b.json"]
    assert [e.domain for e in spool.drain(spool_dir)] == ["db-1"]


def test_bad_dir_has_a_cap(spool_dir: Path, monkeypatch: pytest.MonkeyPatch,
                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(spool, "MAX_BAD_ENTRIES", 3)
    for i in range(5):
        (spool_dir / f"{i}-1-bad.json").write_bytes(b"{")
    rejects = Rejects()
    assert spool.drain(spool_dir, rejects=rejects) == []
    assert len(list((spool_dir / spool.BAD_DIR).iterdir())) == 3
    assert [p.name for p in spool_dir.iterdir()] == [spool.BAD_DIR]
    assert rejects.counts == {"spool_entry": 5}
    assert "4-1-bad.json: not JSON" in caplog.text and "deleted (bad/ holds 3" in caplog.text
    (spool_dir / "8-1-dir.json").mkdir()                     # empty: removed
    stuck = spool_dir / "9-1-stuck.json"
    stuck.mkdir()
    (stuck / "x").write_text("")                             # cannot be deleted: skipped
    for _ in range(3):
        spool.drain(spool_dir, rejects=rejects)
    assert sorted(p.name for p in spool_dir.iterdir()) == ["9-1-stuck.json", spool.BAD_DIR]
    assert rejects.counts == {"spool_entry": 7, "spool_dropped": 1}   # refused once each


def test_an_entry_the_hook_still_holds_waits(spool_dir: Path) -> None:
    entry = spool_dir / "1-1-held.json"
    entry.write_text(json.dumps(_entry("held")))
    fd = os.open(entry, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert spool.drain(spool_dir) == []
        assert entry.exists()
        # the hook replaces it with the completed entry, then lets go
        done = spool_dir / ".tmp-1-x"
        done.write_text(json.dumps(_entry("held", uuid="4dea22b3-1d52-d8f3-2516-782e98ab3fa0")))
        os.rename(done, entry)
        assert spool.drain(spool_dir) != []       # the new one is not locked
    finally:
        os.close(fd)
    assert spool.drain(spool_dir) == []


def test_a_replaced_entry_is_not_read_twice(spool_dir: Path) -> None:
    entry = spool_dir / "1-1-x.json"
    entry.write_text(json.dumps(_entry("x")))
    fd = os.open(entry, os.O_RDONLY)
    try:
        os.unlink(entry)       # what a drainer sees through a descriptor opened before
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert spool.drain(spool_dir) == []


def _send_all(path: Path, sock: socket.socket, payloads: list[bytes],
              rejects: Rejects) -> list[spool.SpoolEvent]:
    """Send without blocking; when the receiver's queue is full, drain it as the daemon would."""
    events: list[spool.SpoolEvent] = []
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    try:
        for data in payloads:
            while True:
                try:
                    sender.sendto(data, str(path))
                    break
                except BlockingIOError:
                    events += wakeup.drain_wakeups(sock, rejects)
        events += wakeup.drain_wakeups(sock, rejects)
    finally:
        sender.close()
    return events


def test_a_datagram_flood_is_counted_and_logged_at_a_bounded_rate(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "run" / "wake.sock"
    sock = wakeup.bind_wakeup_socket(path)
    clock = [0.0]
    rejects = Rejects(logging.getLogger("vmshare.daemon.spool"), burst=5, window=60.0,
                      clock=lambda: clock[0])
    payloads = [POISON[k] for k in sorted(POISON) if len(POISON[k]) < 60_000] * 100
    payloads += [b"\xff" * 70_000]                  # over the datagram bound
    payloads.append(json.dumps(_entry("good", entry=None)).encode())
    try:
        with caplog.at_level(logging.WARNING, logger="vmshare.daemon.spool"):
            events = _send_all(path, sock, payloads, rejects)
            assert len(caplog.records) == 5
            clock[0] = 61.0
            rejects.flush()
    finally:
        sock.close()
    assert [e.domain for e in events] == ["good"]
    assert rejects.counts == {"datagram": len(payloads) - 1}
    assert len(caplog.records) == 6
    assert caplog.records[-1].getMessage().startswith(
        f"{len(payloads) - 1 - 5} more bad datagram(s) not logged in the last 61 s")


def test_control_characters_never_reach_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    forged = "vm\n2026-01-01 00:00:00 vmshare[1]: INFO forged\x1b[31m\u2028"
    data = json.dumps(_entry(domain=forged, seq=-1)).encode()
    rejects = Rejects(logging.getLogger("vmshare.daemon.spool"))
    with caplog.at_level(logging.WARNING, logger="vmshare.daemon.spool"):
        with pytest.raises(spool.SpoolEntryError):
            spool.parse_event(data, entry="1-1-x\n.json")
        rejects.reject("spool_entry", f"spool entry {forged}: bad")
    [record] = caplog.records
    text = record.getMessage()
    assert "\n" not in text and "\x1b" not in text and "\u2028" not in text
    assert "vm\\n2026" in text and "\\x1b[31m" in text
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    line = formatter.format(logging.LogRecord("x", logging.INFO, "f", 1, "hook %s",
                                              (forged,), None))
    assert line.count("\n") == 0 and line.startswith("INFO hook vm\\n2026")
