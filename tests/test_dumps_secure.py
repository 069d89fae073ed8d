"""Dump hygiene: root-only directory, 0600 O_EXCL files removed, guest always resumed."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from vmshare.errors import DumpError
from vmshare.sources.secure import (
    async_paused_guard,
    dump_file,
    ensure_dump_dir,
    paused_guard,
    taken_dump,
)

ME = os.geteuid()


def test_dump_dir_created_0700(tmp_path: Path) -> None:
    d = ensure_dump_dir(tmp_path / "a" / "dumps", owner_uid=ME)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_dump_dir_group_or_world_writable_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "dumps"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(DumpError, match="writable"):
        ensure_dump_dir(d, owner_uid=ME)


def test_dump_dir_wrong_owner_refused(tmp_path: Path) -> None:
    if ME != 0:
        pytest.skip("needs root to chown")
    d = tmp_path / "dumps"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(DumpError, match="owned by uid 65534, not root"):
        ensure_dump_dir(d)


def test_dump_dir_symlink_and_file_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(DumpError, match="symlink"):
        ensure_dump_dir(tmp_path / "link", owner_uid=ME)
    (tmp_path / "file").write_text("")
    with pytest.raises(DumpError, match="not a directory"):
        ensure_dump_dir(tmp_path / "file", owner_uid=ME)


def test_dump_file_0600_exclusive_and_removed(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with dump_file(tmp_path / "d", "vm1", owner_uid=ME) as f:
            st = os.stat(f.path)
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 0
            os.write(f.fd, b"secret")
            assert f.path.name.startswith("vm1-")
            path = f.path
        assert not path.exists()
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError), dump_file(tmp_path / "d", owner_uid=ME) as f:
        path = f.path
        raise RuntimeError("boom")
    assert not path.exists()
    assert list((tmp_path / "d").iterdir()) == []


def test_paused_guard_resumes_on_every_path() -> None:
    calls: list[str] = []

    def pause() -> None:
        calls.append("pause")

    def resume() -> None:
        calls.append("resume")

    with paused_guard(pause, resume, True):
        assert calls == ["pause"]
    assert calls == ["pause", "resume"]

    calls.clear()
    with pytest.raises(ValueError), paused_guard(pause, resume, True):
        raise ValueError("dump failed")
    assert calls == ["pause", "resume"]

    calls.clear()
    with paused_guard(pause, resume, False):
        pass
    assert calls == []

    def bad_pause() -> None:
        calls.append("pause")
        raise TimeoutError("stop timed out")

    calls.clear()
    with pytest.raises(TimeoutError), paused_guard(bad_pause, resume, True):
        pytest.fail("the block must not run when pausing failed")
    assert calls == ["pause", "resume"]


def test_async_paused_guard_resumes_on_error() -> None:
    calls: list[str] = []

    async def pause() -> None:
        calls.append("pause")

    async def resume() -> None:
        calls.append("resume")

    async def run() -> None:
        async with async_paused_guard(pause, resume, True):
            raise KeyError("x")

    with pytest.raises(KeyError):
        asyncio.run(run())
    assert calls == ["pause", "resume"]


def test_taken_dump_resumes_and_removes_on_failure(tmp_path: Path) -> None:
    calls: list[str] = []
    seen: list[Path] = []

    def produce(f: object) -> None:
        from vmshare.sources.secure import DumpFile
        assert isinstance(f, DumpFile)
        seen.append(f.path)
        raise DumpError("qemu refused")

    with pytest.raises(DumpError), taken_dump(
            produce, pause_fn=lambda: calls.append("pause"),
            resume_fn=lambda: calls.append("resume"), was_running=True,
            directory=tmp_path / "d", owner_uid=ME):
        pytest.fail("unreachable")
    assert calls == ["pause", "resume"]
    assert seen and not seen[0].exists()

    calls.clear()

    def produce_ok(f: object) -> None:
        from vmshare.sources.secure import DumpFile
        assert isinstance(f, DumpFile)
        os.write(f.fd, b"x" * 10)

    with taken_dump(produce_ok, pause_fn=lambda: calls.append("pause"),
                    resume_fn=lambda: calls.append("resume"), was_running=True,
                    directory=tmp_path / "d", owner_uid=ME) as path:
        assert calls == ["pause", "resume"]          # resumed before reading
        assert path.read_bytes() == b"x" * 10
    assert not path.exists()
