"""The /proc readers other packages call instead of opening /proc themselves:
descriptors bound to one process, soft-dirty clearing, liveness, boot time and
the mount table (ksm/procfs.py), on test trees shaped like /proc and on this
process's own /proc entries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ksmtree import FakeProc
from vmshare.errors import ProcessGone, ProcfsError
from vmshare.hook.libvirtd import libvirtd_state
from vmshare.ksm.procfs import ProcFs, mount_table


def stat_line(pid: int, state: str, start_time: int) -> str:
    fields = [state] + ["0"] * 18 + [str(start_time)] + ["0"] * 10
    return f"{pid} (a (b) c) " + " ".join(fields) + "\n"


def test_stat_reads_the_state_after_a_comm_with_parentheses(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text(stat_line(7, "Z", 99))
    st = ProcFs(tmp_path).stat(7)
    assert (st.comm, st.state, st.start_time) == ("a (b) c", "Z", 99)


@pytest.mark.parametrize("state,start,asked,alive", [
    ("S", 5, None, True),
    ("R", 5, 5, True),
    ("S", 5, 6, False),      # the pid now names a later process
    ("Z", 5, 5, False),      # a zombie holds no memory
    ("X", 5, None, False),
])
def test_alive(tmp_path: Path, state: str, start: int, asked: int | None,
               alive: bool) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text(stat_line(7, state, start))
    assert ProcFs(tmp_path).alive(7, asked) is alive


def test_a_missing_or_garbled_process_is_not_alive(tmp_path: Path) -> None:
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "stat").write_text("8 (x\n")
    procfs = ProcFs(tmp_path)
    assert procfs.alive(7) is False and procfs.alive(8) is False


def test_a_real_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while ProcFs().stat(child.pid).state != "Z":   # exited, not yet reaped
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        assert ProcFs().alive(child.pid) is False
        assert ProcFs().alive(os.getpid()) is True
    finally:
        child.wait()


def test_open_fd_reads_the_file_and_maps_a_missing_process(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add_process(9, 0, [1, 2, 3])
    fd = ProcFs(tmp_path).open_fd(9, "pagemap")
    try:
        assert os.pread(fd, 8, 8) == (2).to_bytes(8, "little")
    finally:
        os.close(fd)
    with pytest.raises(ProcessGone, match="process 10 is gone"):
        ProcFs(tmp_path).open_fd(10, "mem")


def test_open_fd_stays_bound_to_the_process_it_opened() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    fd = ProcFs().open_fd(child.pid, "stat")
    try:
        assert os.pread(fd, 4096, 0).startswith(f"{child.pid} (".encode())
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        # the process is gone: the held descriptor cannot read a successor's stat
        with pytest.raises(OSError):
            os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def test_clear_soft_dirty_writes_4_and_maps_a_missing_process(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    assert ProcFs(tmp_path).clear_soft_dirty(7) is True
    assert (tmp_path / "7" / "clear_refs").read_text() == "4"
    with pytest.raises(ProcessGone):
        ProcFs(tmp_path).clear_soft_dirty(8)


def test_boot_time_from_uptime(tmp_path: Path) -> None:
    (tmp_path / "uptime").write_text("100.25 50.00\n")
    assert abs(ProcFs(tmp_path).boot_time() - (time.time() - 100.25)) < 5
    (tmp_path / "uptime").write_text("soon\n")
    with pytest.raises(ProcfsError, match="unexpected format"):
        ProcFs(tmp_path).boot_time()
    with pytest.raises(ProcfsError):
        ProcFs(tmp_path / "nowhere").boot_time()


def test_libvirtd_start_comes_from_boot_time_and_start_ticks(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add_process(4242, 0, [], start_time=3 * os.sysconf("SC_CLK_TCK"))
    (tmp_path / "4242" / "comm").write_text("libvirtd\n")
    (tmp_path / "uptime").write_text("10.00 0.00\n")
    state = libvirtd_state(tmp_path / "no.pid", tmp_path)
    assert state.running and state.pid == 4242 and state.started_at is not None
    assert abs(state.started_at - (time.time() - 10 + 3)) < 5
    (tmp_path / "uptime").unlink()      # no boot time: no start time, so not counted
    assert libvirtd_state(tmp_path / "no.pid", tmp_path).running is False


def test_mount_table(tmp_path: Path) -> None:
    (tmp_path / "mounts").write_text("none /dev/hugepages hugetlbfs rw 0 0\n")
    assert mount_table(str(tmp_path / "mounts")).startswith("none /dev/hugepages")
    assert "/" in {line.split()[1] for line in mount_table().splitlines()}
    with pytest.raises(ProcfsError, match="cannot read mount table"):
        mount_table(str(tmp_path / "missing"))


def test_smaps_thp_eligible_is_read_per_mapping() -> None:
    from vmshare.ksm.procfs import parse_smaps
    text = ("7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n"
            "AnonHugePages:      2048 kB\nTHPeligible:    1\nVmFlags: rd wr hg\n"
            "7f0000200000-7f0000400000 rw-p 00000000 00:00 0 \n"
            "THPeligible:    0\nVmFlags: rd wr\n"
            "7f0000400000-7f0000600000 rw-p 00000000 00:00 0 \nVmFlags: rd wr\n")
    got = [(v.thp_eligible, v.anon_huge_bytes) for v in parse_smaps(text)]
    assert got == [(True, 2 << 20), (False, 0), (None, 0)]
