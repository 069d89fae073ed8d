"""The daemon's side of the spool: drain, corrupt entries, temp files, socket, directory."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from vmshare.daemon import spool, wakeup
from vmshare.daemon.rejects import Rejects
from vmshare.errors import VmshareError


def _entry(domain: str = "vm1", op: str = "start", seq: int = 1, when: float = 1.7e9,
           boot: str = "boot-a", **extra: object) -> dict[str, object]:
    obj: dict[str, object] = {"v": 1, "domain": domain, "uuid": None, "operation": op,
                              "sub_operation": "begin", "extra": "-", "time": when,
                              "seq": seq, "boot_id": boot, "pid": 1, "xml": "unparsed"}
    obj.update(extra)
    return obj


def _put(spool_dir: Path, name: str, obj: object) -> Path:
    path = spool_dir / name
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return spool.ensure_spool_dir(tmp_path / "spool")


def test_drain_orders_by_boot_then_monotonic_seq(spool_dir: Path) -> None:
    # file names (wall time) disagree with seq: the wall clock stepped back mid-boot
    _put(spool_dir, "3000000000000000000-1-aa.json", _entry(op="prepare", seq=10, when=3e9))
    _put(spool_dir, "1000000000000000000-1-bb.json", _entry(op="start", seq=20, when=1e9))
    _put(spool_dir, "2000000000000000000-1-cc.json", _entry(op="started", seq=30, when=2e9))
    # an older boot (earlier wall time) comes first whatever its seq
    _put(spool_dir, "0500000000000000000-1-dd.json",
         _entry(op="release", seq=99_999, when=0.5e9, boot="boot-0"))
    events = spool.drain(spool_dir)
    assert [e.operation for e in events] == ["release", "prepare", "start", "started"]
    assert [p.name for p in spool_dir.iterdir()] == []
    assert events[1].entry == "3000000000000000000-1-aa.json"


def test_drain_sets_corrupt_entries_aside(spool_dir: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    uuid = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
    good = _put(spool_dir, "1-1-good.json", _entry(domain="ok", uuid=uuid))
    (spool_dir / "2-1-notjson.json").write_bytes(b"{\"v\": 1, \"domain\": ")
    (spool_dir / "3-1-binary.json").write_bytes(b"\xff\xfe\x00garbage")
    _put(spool_dir, "4-1-list.json", [1, 2])
    _put(spool_dir, "5-1-version.json", _entry(v=2))
    _put(spool_dir, "6-1-noseq.json", {k: v for k, v in _entry().items() if k != "seq"})
    _put(spool_dir, "7-1-badtype.json", _entry(time="yesterday"))
    _put(spool_dir, "8-1-boolseq.json", _entry(seq=True))
    _put(spool_dir, "9-1-emptyname.json", _entry(domain=""))
    (spool_dir / "10-1-huge.json").write_bytes(b" " * (spool.MAX_ENTRY_BYTES + 1))
    (spool_dir / "11-1-dir.json").mkdir()
    (spool_dir / "12-1-link.json").symlink_to(good)
    (spool_dir / "README").write_text("not an entry, left alone\n")
    rejects = Rejects(logging.getLogger("vmshare.daemon.spool"), burst=100)
    with caplog.at_level(logging.WARNING, logger="vmshare.daemon.spool"):
        events = spool.drain(spool_dir, rejects=rejects)
    assert [(e.domain, e.uuid) for e in events] == [("ok", uuid)]
    bad = sorted(p.name for p in (spool_dir / spool.BAD_DIR).iterdir())
    assert bad == sorted(["2-1-notjson.json", "3-1-binary.json", "4-1-list.json",
                          "5-1-version.json", "6-1-noseq.json", "7-1-badtype.json",
                          "8-1-boolseq.json", "9-1-emptyname.json", "10-1-huge.json",
                          "11-1-dir.json", "12-1-link.json"])
    assert sorted(p.name for p in spool_dir.iterdir()) == ["README", spool.BAD_DIR]
    assert len([r for r in caplog.records if "refused spool entry" in r.getMessage()]) \
        == len(bad)
    assert rejects.counts == {"spool_entry": len(bad)}
    assert stat.S_IMODE((spool_dir / spool.BAD_DIR).stat().st_mode) == 0o700
    assert spool.drain(spool_dir) == []  # bad/ is not read again


def test_temp_files_are_ignored_then_expired(spool_dir: Path) -> None:
    young = spool_dir / ".tmp-123-abcdef"
    young.write_text('{"v": 1, "domain": "half')
    old = spool_dir / ".tmp-456-012345"
    old.write_text('{"v": 1')
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    assert spool.drain(spool_dir) == []
    assert young.exists() and not old.exists()
    assert not (spool_dir / spool.BAD_DIR).exists()
    assert spool.drain(spool_dir, temp_grace=0.0) == []
    assert not young.exists()


def test_missing_spool_holds_nothing(tmp_path: Path) -> None:
    assert spool.drain(tmp_path / "absent") == []


def test_unreadable_spool_is_an_error(tmp_path: Path) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    with pytest.raises(spool.SpoolError):
        spool.drain(not_dir)


def test_ensure_spool_dir_is_private(tmp_path: Path) -> None:
    path = tmp_path / "run" / "vmshare" / "spool"
    old = os.umask(0)
    try:
        assert spool.ensure_spool_dir(path) == path
    finally:
        os.umask(old)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    path.chmod(0o755)      # ours and not writable by others: accepted, never chmod'ed
    spool.ensure_spool_dir(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770, 0o702])
def test_world_or_group_writable_spool_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "spool"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(spool.SpoolError, match=f"the spool directory {path} is writable by "
                       f"others \\(mode {mode:04o}\\); refusing it"):
        spool.ensure_spool_dir(path)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_foreign_owned_spool_and_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.mkdir(mode=0o700)
    os.chown(path, 4242, 4242)
    with pytest.raises(spool.SpoolError, match="belongs to uid 4242, not to us"):
        spool.ensure_spool_dir(path)
    assert path.stat().st_uid == 4242
    os.chown(path, 0, 0)
    forged = _put(path, "1-1-forged.json", _entry(domain="victim"))
    os.chown(forged, 4242, 4242)
    _put(path, "2-1-real.json", _entry(domain="real", seq=2))
    assert [e.domain for e in spool.drain(path)] == ["real"]
    assert (path / spool.BAD_DIR / "1-1-forged.json").exists()


def test_ensure_spool_dir_refuses_symlinks_and_files(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(spool.SpoolError, match="not a directory"):
        spool.ensure_spool_dir(link)
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(VmshareError):
        spool.ensure_spool_dir(file)


def test_wakeup_socket_binding(tmp_path: Path) -> None:
    path = tmp_path / "run" / "wakeup.sock"
    sock = wakeup.bind_wakeup_socket(path)
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert not sock.getblocking()
        with pytest.raises(spool.SpoolError, match="in use"):
            wakeup.bind_wakeup_socket(path)
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.sendto(json.dumps(_entry(entry="1-1-x.json")).encode(), str(path))
        sender.sendto(b"not json", str(path))
        sender.sendto(json.dumps(_entry(op="stopped", entry=None)).encode(), str(path))
        sender.close()
        events = wakeup.drain_wakeups(sock)
        assert [(e.operation, e.entry) for e in events] == [("start", "1-1-x.json"),
                                                            ("stopped", "")]
        assert wakeup.drain_wakeups(sock) == []
    finally:
        sock.close()
    # the daemon died: its socket file is stale and is replaced
    again = wakeup.bind_wakeup_socket(path)
    again.close()


def test_wakeup_socket_never_takes_over_a_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(spool.SpoolError, match=r"the socket directory .*shared is writable by "
                       r"others \(mode 1777\)"):
        wakeup.bind_wakeup_socket(shared / "wake.sock")
    st = shared.stat()
    assert stat.S_IMODE(st.st_mode) == 0o1777 and not (shared / "wake.sock").exists()


def test_wakeup_socket_never_replaces_other_files(tmp_path: Path) -> None:
    path = tmp_path / "wakeup.sock"
    path.write_text("precious")
    with pytest.raises(spool.SpoolError, match="not a socket"):
        wakeup.bind_wakeup_socket(path)
    assert path.read_text() == "precious"


def test_parse_event_accepts_the_hook_format() -> None:
    event = spool.parse_event(json.dumps(_entry(uuid="u", time=5)).encode(), entry="e.json")
    assert event == spool.SpoolEvent("vm1", "u", "start", "begin", "-", 5.0, 1, "boot-a",
                                     "e.json")
    with pytest.raises(spool.SpoolEntryError):
        spool.parse_event(json.dumps(_entry(uuid=7)).encode())
