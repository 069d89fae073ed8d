"""The atomic writer (vmshare.records.atomic) and the state file's corrupt/newer handling."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from vmshare.daemon.state import StateError, StateStore
from vmshare.errors import VmshareError
from vmshare.observe.remerge import StateVersionError, read_state
from vmshare.records.atomic import AtomicWriteError, keep_copy, write_atomic


def test_write_atomic_keeps_old_file_on_failure(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(AtomicWriteError, match=r"cannot write .*state\.json: I/O error"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_write_atomic_refuses_a_character_device(device: str) -> None:
    before = os.lstat(device)
    with pytest.raises(AtomicWriteError, match=f"refusing to write {device}: it is a "
                       "character device, not a regular file"):
        write_atomic(Path(device), b"<html>")
    after = os.lstat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_mode == before.st_mode


def test_write_atomic_refuses_fifo_socket_symlink_directory(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    real = tmp_path / "real"
    real.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    folder = tmp_path / "dir"
    folder.mkdir()
    try:
        for target, kind in ((fifo, "a FIFO"), (sock_path, "a socket"),
                             (link, "a symbolic link"), (folder, "a directory")):
            with pytest.raises(AtomicWriteError, match=f"it is {kind}, not a regular file"):
                write_atomic(target, b"x")
    finally:
        sock.close()
    assert real.read_text() == "keep" and link.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_atomic_refuses_another_users_file(tmp_path: Path) -> None:
    path = tmp_path / "theirs.html"
    path.write_text("theirs")
    os.chown(path, 4242, 4242)
    with pytest.raises(AtomicWriteError, match="belongs to uid 4242"):
        write_atomic(path, b"ours")
    assert path.read_text() == "theirs" and path.stat().st_uid == 4242


def test_write_atomic_never_chmods_an_existing_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    write_atomic(shared / "out.html", b"x")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    write_atomic(tmp_path / "new" / "sub" / "f", b"y")
    assert stat.S_IMODE((tmp_path / "new" / "sub").stat().st_mode) == 0o700


def test_keep_copy_never_overwrites(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_text("one")
    copy = keep_copy(src, "corrupt-1")
    assert copy is not None and copy.read_text() == "one"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    src.write_text("two")
    with pytest.raises(AtomicWriteError, match="File exists"):
        keep_copy(src, "corrupt-1")
    assert copy.read_text() == "one"
    assert keep_copy(tmp_path / "absent", "x") is None


def test_corrupt_state_file_is_kept_before_it_is_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    poison = b'{"version": 1, "vms": {"a": {"ksm_pages": ' + b"9" * 5000 + b"}}}"
    path.write_bytes(poison)
    store = StateStore(path)
    assert store.doc == {"version": 1, "vms": {}}
    [copy] = tmp_path.glob("state.json.corrupt-*")
    assert copy.read_bytes() == poison
    assert "kept it as" in caplog.text and str(copy) in caplog.text
    store.observe("b", "u", 1, 5, now=1.0)
    store.save()
    assert json.loads(path.read_text())["vms"]["b"]["ksm_pages"] == 5
    assert copy.read_bytes() == poison


@pytest.mark.parametrize("doc", [
    {"version": 1, "vms": {"a": {"pid": "12"}}},
    {"version": 1, "vms": {"a": {"observed": "yesterday"}}},
    {"version": 1, "vms": {"a": {"pending": {"merge": "yes"}}}},
    {"version": 1, "vms": {"a": {"pending": {"merge": True, "before": {"pc.ram": 1}}}}},
    {"version": 1, "vms": {"a": {"remerge": {"event": "reset"}}}},
    {"version": 1, "vms": []},
    {"version": "1", "vms": {}},
    [1, 2],
])
def test_state_of_the_wrong_shape_is_corrupt(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    assert StateStore(path).doc["vms"] == {}
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def test_newer_state_version_is_refused_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    text = json.dumps({"version": 99, "vms": {"a": {"whatever": [1]}}})
    path.write_text(text)
    with pytest.raises(StateVersionError, match=r"newer vmshare \(state version 99; this "
                       r"one reads 1\)"):
        StateStore(path)
    assert path.read_text() == text
    assert read_state(path)["vms"] == {}    # status: ignored with a warning, not fatal
    assert isinstance(StateVersionError("x"), VmshareError)


def test_corrupt_state_that_cannot_be_copied_is_not_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    real_open = os.open

    def no_copies(name: str | os.PathLike[str], flags: int, mode: int = 0o777, *,
                  dir_fd: int | None = None) -> int:
        if ".corrupt-" in str(name) and flags & os.O_EXCL:
            raise OSError(28, "No space left on device")
        return real_open(name, flags, mode, dir_fd=dir_fd)
    monkeypatch.setattr(os, "open", no_copies)
    with pytest.raises(StateError, match=r"not replacing it.*No space left"):
        StateStore(path)
    assert path.read_text() == "{not json"
