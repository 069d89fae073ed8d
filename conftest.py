"""Shared by tests/ and integration/: every test runs with its own vmshare
paths, and the run must leave the host as it found it.

At configure time (before collection imports any test module) every VMSHARE_*
path variable is pointed into a temporary tree (tests.hostguard.environment_for),
which module- and session-scoped fixtures see; each test then gets a tree of
its own (its own config, audit log, tuner lock, spool). Subprocesses inherit
them, and a test that needs other paths sets its own.

At session start the host state a test could disturb is recorded (KSM knobs,
libvirt domains, /etc/vmshare, /var/log/vmshare, /var/lib/vmshare,
/run/vmshare, /etc/libvirt/hooks); at session finish whatever differs fails the
run (exit status 1, listed in a "host state" section). Other sessions share
this host: when a process running pytest or vmshare outside this session was
seen during the run, a difference cannot be blamed on this run, and only those
naming this run's id (its domains) fail it; the rest are listed as a warning.
VMSHARE_HOST_CHECK=strict makes every difference fail; =off skips the check.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests import hostguard

_ENV = pytest.StashKey[dict[str, str | None]]()
_TMP = pytest.StashKey[Path]()
_BEFORE = pytest.StashKey[hostguard.HostState]()
_FOREIGN = pytest.StashKey[dict[int, str]]()
_SCANNED = pytest.StashKey[float]()
_REPORT = pytest.StashKey[tuple[list[str], list[str]]]()


def _mode() -> str:
    return os.environ.get("VMSHARE_HOST_CHECK", "on")


def pytest_configure(config: pytest.Config) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"vmshare-test-{hostguard.RUN_ID}-"))
    config.stash[_TMP] = tmp
    config.stash[_ENV] = hostguard.isolated_environment(tmp)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _ENV in config.stash:
        hostguard.restore_environment(config.stash[_ENV])
    if _TMP in config.stash:
        shutil.rmtree(config.stash[_TMP], ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_vmshare_paths(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in hostguard.environment_for(tmp_path_factory.mktemp("env")).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def pytest_sessionstart(session: pytest.Session) -> None:
    if _mode() == "off":
        return
    session.config.stash[_BEFORE] = hostguard.capture()
    session.config.stash[_FOREIGN] = hostguard.foreign_testers()


def pytest_runtest_setup(item: pytest.Item) -> None:
    # a scan of /proc takes ~10 ms: at most one a second (sessions last longer)
    stash = item.config.stash
    if _FOREIGN in stash and time.monotonic() - stash.get(_SCANNED, 0.0) >= 1.0:
        stash[_FOREIGN].update(hostguard.foreign_testers())
        stash[_SCANNED] = time.monotonic()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if _BEFORE not in config.stash:
        return
    foreign = config.stash[_FOREIGN]
    foreign.update(hostguard.foreign_testers())
    diffs = hostguard.differences(config.stash[_BEFORE], hostguard.capture())
    if _mode() == "strict" or not foreign:
        failing, excused = diffs, []
    else:
        failing = [d for d in diffs if hostguard.mine(d)]
        excused = [d for d in diffs if not hostguard.mine(d)]
    config.stash[_REPORT] = (failing, excused)
    if failing and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    if _REPORT not in config.stash:
        return
    failing, excused = config.stash[_REPORT]
    if failing:
        terminalreporter.section("host state: this run left the host different", red=True)
        for line in failing:
            terminalreporter.line(f"  {line}", red=True)
    if excused:
        terminalreporter.section("host state: differences while other sessions ran",
                                 yellow=True)
        for line in excused:
            terminalreporter.line(f"  {line}")
        terminalreporter.line("other test or vmshare processes seen during this run "
                              "(VMSHARE_HOST_CHECK=strict fails on these too):")
        for pid, cmd in sorted(config.stash[_FOREIGN].items())[:10]:
            terminalreporter.line(f"  pid {pid}: {cmd}")
    if not failing and not excused:
        terminalreporter.line(f"host state: unchanged (run {hostguard.RUN_ID})")
