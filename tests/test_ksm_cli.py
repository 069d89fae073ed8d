"""`vmshare ksm unmerge` and `vmshare ksm set [--unmerge]` through the CLI, on a
fake /sys/kernel/mm/ksm (VMSHARE_SYSFS_ROOT) and a fake /proc/meminfo
(VMSHARE_PROC_ROOT): the free-memory refusal, --force, the guarded knobs, and
a knob write that fails midway with the knobs written before it put back.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ksmtree import make_sysfs
from vmshare.cli.main import main

MIB = 2**20
PAGE = 4096
SHARING = 300_000                 # pages: 1,171 MiB to un-share
MEM_TOTAL_KIB = 4 * 2**20         # 4 GiB: the margin is max(256 MiB, 5 %) = 256 MiB
MARGIN_MIB = 256
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


class FakeKsm:
    """A KSM sysfs tree whose "kernel" (a thread) empties pages_shared and
    pages_sharing once run=2 is written, as the kernel does inside the write."""

    def __init__(self, root: Path) -> None:
        self.root = make_sysfs(root)
        self.write("run", 1)
        self.write("pages_shared", SHARING // 4)
        self.write("pages_sharing", SHARING)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._kernel, daemon=True)
        self._thread.start()

    def write(self, name: str, value: int) -> None:
        # atomically: a reader must never see the file truncated and not yet written
        tmp = self.root / f".{name}.new"
        tmp.write_text(f"{value}\n")
        tmp.replace(self.root / name)

    def read(self, name: str) -> str:
        return (self.root / name).read_text().strip()

    def settings(self) -> dict[str, str]:
        """Every file but the counters the fake kernel changes."""
        return {p.name: self.read(p.name) for p in self.root.iterdir()
                if not p.name.startswith((".", "pages_")) or p.name == "pages_to_scan"}

    def _kernel(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(OSError):
                if self.read("run") == "2":
                    self.write("pages_shared", 0)
                    self.write("pages_sharing", 0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def ksm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKsm]:
    fake = FakeKsm(tmp_path / "ksm")
    monkeypatch.setenv("VMSHARE_SYSFS_ROOT", str(fake.root))
    monkeypatch.setenv("VMSHARE_PROC_ROOT", str(tmp_path / "proc"))
    available(tmp_path, 1024)
    try:
        yield fake
    finally:
        fake.stop()


def available(tmp_path: Path, mib: int) -> None:
    """Write the fake /proc/meminfo: MemTotal 4 GiB, MemAvailable ``mib``."""
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "meminfo").write_text(f"MemTotal:       {MEM_TOTAL_KIB} kB\n"
                                  f"MemFree:        {mib * 1024} kB\n"
                                  f"MemAvailable:   {mib * 1024} kB\n")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, *words: str) -> None:
    (line,) = err.strip().splitlines()
    assert line.startswith("vmshare: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in line, (word, line)


@contextlib.contextmanager
def refuse_writes(path: Path) -> Iterator[None]:
    """Make opening ``path`` for writing fail (EPERM/EACCES) even for root:
    the immutable flag as root, mode 0444 otherwise; undone on exit."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    fd = os.open(path, os.O_RDONLY)
    flags = array.array("i", [0])
    try:
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
            flags[0] |= FS_IMMUTABLE_FL
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
        except OSError as exc:
            pytest.skip(f"the filesystem of {path} has no immutable flag, so root's "
                        f"writes cannot be made to fail: {exc}")
        try:
            yield
        finally:
            flags[0] &= ~FS_IMMUTABLE_FL
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
    finally:
        os.close(fd)


def need_mib() -> int:
    return SHARING * PAGE // MIB


# ------------------------------------------------------------------ ksm unmerge
def test_unmerge_refused_when_the_copies_would_not_fit(ksm: FakeKsm,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    before = ksm.settings()
    code, out, err = run(capsys, "ksm", "unmerge")
    assert code == 1 and out == ""
    one_line_error(err, f"needs {need_mib()} MiB", f"{MARGIN_MIB} MiB margin",
                   "only 1024 MiB is available", "--force")
    assert ksm.settings() == before                  # run still 1: nothing written
    assert ksm.read("pages_sharing") == str(SHARING)


def test_unmerge_when_the_copies_fit(ksm: FakeKsm, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    available(tmp_path, need_mib() + MARGIN_MIB + 1)
    code, out, err = run(capsys, "ksm", "unmerge")
    assert (code, err) == (0, "")
    assert out == f"unmerged: pages_sharing {SHARING:,} -> 0; ksmd stopped (run=2)\n"
    assert ksm.read("run") == "2"


def test_unmerge_at_the_margin_is_refused(ksm: FakeKsm, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    available(tmp_path, need_mib() + MARGIN_MIB - 1)
    code, _, err = run(capsys, "ksm", "unmerge")
    assert code == 1 and "margin" in err
    assert ksm.read("run") == "1"


def test_unmerge_force_skips_the_check(ksm: FakeKsm, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    code, out, err = run(capsys, "ksm", "unmerge", "--force")
    assert (code, err) == (0, "")
    assert out.startswith(f"unmerged: pages_sharing {SHARING:,} -> 0;")
    assert ksm.read("run") == "2"


# ------------------------------------------------------------------ ksm set --unmerge
def test_guarded_knob_while_merged_needs_unmerge(ksm: FakeKsm,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = ksm.settings()
    code, _, err = run(capsys, "ksm", "set", "sleep_millisecs=50", "merge_across_nodes=0")
    assert code == 1
    one_line_error(err, "merge_across_nodes", "--unmerge")
    assert ksm.settings() == before                  # all or none: sleep_millisecs kept too


def test_set_unmerge_refused_when_the_copies_would_not_fit(
        ksm: FakeKsm, capsys: pytest.CaptureFixture[str]) -> None:
    before = ksm.settings()
    code, _, err = run(capsys, "ksm", "set", "--unmerge", "merge_across_nodes=0")
    assert code == 1
    one_line_error(err, f"needs {need_mib()} MiB", "only 1024 MiB is available")
    assert ksm.settings() == before
    assert ksm.read("pages_sharing") == str(SHARING)


def test_set_unmerge_changes_the_knob_and_resumes_ksmd(
        ksm: FakeKsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    available(tmp_path, need_mib() + MARGIN_MIB + 1)
    code, out, err = run(capsys, "ksm", "set", "--unmerge", "merge_across_nodes=0")
    assert (code, err) == (0, "")
    assert out == "merge_across_nodes: 1 -> 0\n"
    assert (ksm.read("merge_across_nodes"), ksm.read("run")) == ("0", "1")
    assert ksm.read("pages_sharing") == "0"


def test_set_unmerge_force(ksm: FakeKsm, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ksm", "set", "--unmerge", "--force", "max_page_sharing=512")
    assert (code, err) == (0, "")
    assert out == "max_page_sharing: 256 -> 512\n"
    assert ksm.read("run") == "1"


# ------------------------------------------------------------------ rollback
def test_a_write_failing_midway_puts_the_earlier_knobs_back(
        ksm: FakeKsm, capsys: pytest.CaptureFixture[str]) -> None:
    before = ksm.settings()
    with refuse_writes(ksm.root / "pages_to_scan"):
        code, _, err = run(capsys, "ksm", "set", "sleep_millisecs=50", "use_zero_pages=1",
                           "pages_to_scan=500")
    assert code == 1
    one_line_error(err, "pages_to_scan", "permission denied")
    # sleep_millisecs and use_zero_pages were written, then put back
    assert ksm.settings() == before


def test_a_write_failing_after_the_unmerge_puts_run_back_too(
        ksm: FakeKsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    available(tmp_path, need_mib() + MARGIN_MIB + 1)
    before = ksm.settings()
    with refuse_writes(ksm.root / "merge_across_nodes"):
        code, _, err = run(capsys, "ksm", "set", "--unmerge", "max_page_sharing=512",
                           "merge_across_nodes=0")
    assert code == 1
    one_line_error(err, "merge_across_nodes", "permission denied")
    # unmerged (that cannot be undone), but max_page_sharing and run are as they were
    assert ksm.read("pages_sharing") == "0"
    assert ksm.settings() == before
