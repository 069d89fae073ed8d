"""Kernel KSM fixtures: every test that touches KSM saves and restores all knobs.

Import the fixtures into a test module (``from integration.ksm_fixtures import
kernel_ksm``); benchmarks use ``ksm_session`` for the same save, unmerge, set
and restore. As in the kernel's ksm selftest, waits are on full_scans under a
deadline, never plain sleeps.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmshare.ksm.sysfs import KsmSysfs

REPO = Path(__file__).resolve().parent.parent


def require_root_ksm() -> KsmSysfs:
    sysfs = KsmSysfs()
    if os.geteuid() != 0:
        pytest.skip("needs root (kernel KSM knobs and /proc/kpageflags)")
    if not sysfs.available():
        pytest.skip("this kernel has no KSM (/sys/kernel/mm/ksm missing)")
    return sysfs


#: the kernel's defaults for what the engine models, every page scanned
#: (smart_scan=0), no advisor, and a fast ksmd
FAST_SCAN: Mapping[str, int | str] = {
    "use_zero_pages": 0, "max_page_sharing": 256, "merge_across_nodes": 1,
    "advisor_mode": "none", "smart_scan": 0, "pages_to_scan": 20000, "sleep_millisecs": 20}


@contextlib.contextmanager
def ksm_session(sysfs: KsmSysfs, settings: Mapping[str, int | str] = FAST_SCAN,
                **overrides: int | str) -> Iterator[KsmSysfs]:
    """Every knob saved, KSM stopped and unmerged, ``settings`` then ``overrides``
    set (knobs this kernel lacks are skipped); on exit everything merged is
    unmerged and every knob restored. Raises KnobError (vmshare.ksm.sysfs)."""
    snap = sysfs.snapshot()
    try:
        sysfs.unmerge()
        for name, value in {**settings, **overrides}.items():
            if name in snap.values:
                sysfs.set(name, value)
        yield sysfs
    finally:
        try:
            sysfs.unmerge()
        finally:
            sysfs.restore(snap)


@pytest.fixture
def kernel_ksm() -> Iterator[KsmSysfs]:
    """Kernel KSM, stopped and unmerged, fast scan settings; restored afterwards."""
    with ksm_session(require_root_ksm()) as sysfs:
        yield sysfs


def converge(sysfs: KsmSysfs, *, timeout: float = 120.0, min_scans: int = 3) -> dict[str, int]:
    """Run ksmd until pages_sharing is unchanged over a full scan (at least
    ``min_scans`` scans: the unstable tree needs two to merge anything)."""
    if sysfs.read_knob("run") != 1:
        sysfs.set("run", 1)
    deadline = time.monotonic() + timeout
    sysfs.wait_full_scans(min_scans, timeout=timeout)
    last = sysfs.read_int("pages_sharing")
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"KSM did not converge within {timeout}s: {sysfs.counters()}")
        sysfs.wait_full_scans(1, timeout=remaining)
        now = sysfs.read_int("pages_sharing")
        if now == last:
            return sysfs.counters()
        last = now


@dataclass
class MemProc:
    proc: subprocess.Popen[str]
    address: int
    pages: int
    ro_address: int = 0      # the --read-only mapping, if any
    ro_pages: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def mremap(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("mremap\n")
        self.proc.stdin.flush()
        word, addr, _ = self.proc.stdout.readline().split()
        assert word == "moved", word
        self.address = int(addr, 16)
        return self.address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_memproc(identical: int = 0, unique: int = 0, zero: int = 0, seed: int = 1,
                  madvise: bool = True, dontfork: bool = False,
                  read_only: int = 0) -> MemProc:
    argv = [sys.executable, "-m", "integration.memproc", "--identical", str(identical),
            "--unique", str(unique), "--zero", str(zero), "--seed", str(seed)]
    if not madvise:
        argv.append("--no-madvise")
    if dontfork:
        argv.append("--dontfork")
    if read_only:
        argv += ["--read-only", str(read_only)]
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        proc.kill()
        raise AssertionError(f"memproc did not start: {line}")
    ro = (int(line[3], 16), int(line[4])) if len(line) >= 5 else (0, 0)
    return MemProc(proc, int(line[1], 16), int(line[2]), *ro)


@pytest.fixture
def memprocs() -> Iterator[list[MemProc]]:
    """A list to append started MemProcs to; all are killed afterwards."""
    started: list[MemProc] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()
