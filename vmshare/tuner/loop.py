"""The tuner's collect and act: the edge of ``vmshare.tuner.decide.decide`` (pure),
shared by ``vmshare tune`` and the daemon (``vmshare daemon --tune``).

Collect: sysfs counters, ksmd's CPU time, MemAvailable/MemTotal. Act: each
knob that differs is validated, written, read back (KsmSysfs.set) and
audit-logged as actor "tuner". The tuner never unmerges (run=2 is never
written); while it runs it owns run, pages_to_scan and sleep_millisecs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmshare.config import TunerPolicy
from vmshare.errors import KnobError, ProcessGone, ProcfsError, UsageError
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import RUN_UNMERGE, KsmSysfs
from vmshare.records.audit import AuditLog
from vmshare.tuner.decide import Decision, Observation, TunerState, decide

OWNED_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")
Changes = list[tuple[str, int | str, int | str]]     # (knob, before, after)
#: one tuner per host: `vmshare tune` and `vmshare daemon --tune` both hold it
TUNER_LOCK = Path("/run/vmshare/tuner.lock")
TUNER_LOCK_ENV = "VMSHARE_TUNER_LOCK"          # another path (tests, a second instance)


def tuner_lock_path() -> Path:
    return Path(os.environ.get(TUNER_LOCK_ENV, str(TUNER_LOCK)))


@contextlib.contextmanager
def tuner_lock(path: Path | None = None) -> Iterator[None]:
    """Hold the host's tuner lock (an exclusive flock; the holder's pid in the
    file) for the block: two tuners would fight over the same knobs.

    Raises KnobError naming the holding pid when another tuner has it, and
    when the lock file cannot be made or locked.
    """
    path = path or tuner_lock_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise KnobError(f"cannot open the tuner lock {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise KnobError(f"cannot lock {path}: {exc.strerror}") from exc
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise KnobError(f"another vmshare tuner (pid {holder}) owns "
                            f"{', '.join(OWNED_KNOBS)}; stop it first ({path})") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)        # releases the flock


def tuner_holder(path: Path | None = None) -> int | None:
    """The pid of the vmshare tuner holding the host's tuner lock, or None
    when none does (a lock file left by a stopped tuner is not held)."""
    path = path or tuner_lock_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


class KsmdClock:
    """ksmd's CPU time, for the kernel thread whose comm is ``ksmd``, found
    once and found again if it goes away. Raises ProcfsError when no ksmd
    thread exists."""

    def __init__(self, procfs: ProcFs) -> None:
        self.procfs = procfs
        self.pid: int | None = None

    def find(self) -> int:
        pids = self.procfs.pids_named("ksmd")
        if not pids:
            raise ProcfsError(f"no ksmd kernel thread under {self.procfs.root} "
                              "(kernel without KSM?)")
        self.pid = pids[0]
        return self.pid

    def seconds(self) -> float:
        for _attempt in range(2):
            pid = self.pid if self.pid is not None else self.find()
            try:
                stat = self.procfs.stat(pid)   # comm and CPU time from one read
                if stat.comm != "ksmd":
                    raise ProcessGone(f"pid {pid} is no longer ksmd")
                return stat.cpu_seconds
            except (ProcessGone, ProcfsError):
                self.pid = None
        raise ProcfsError("cannot read ksmd's CPU time from /proc/<ksmd>/stat")


@dataclass
class Collector:
    """Collect: one Observation from sysfs, ksmd's stat and /proc/meminfo."""

    sysfs: KsmSysfs
    procfs: ProcFs
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.ksmd = KsmdClock(self.procfs)

    def observe(self) -> Observation:
        c = self.sysfs.counters()
        info = self.procfs.meminfo()
        return Observation(
            time=self.clock(),
            pages_scanned=c.get("pages_scanned", 0), full_scans=c["full_scans"],
            pages_shared=c["pages_shared"], pages_sharing=c["pages_sharing"],
            pages_unshared=c["pages_unshared"], pages_volatile=c["pages_volatile"],
            general_profit=c.get("general_profit", 0),
            ksmd_cpu_seconds=self.ksmd.seconds(),
            mem_available=info.get("MemAvailable", info.get("MemFree", 0)),
            mem_total=info.get("MemTotal", 0),
            run=int(self.sysfs.read_knob("run")),
            pages_to_scan=int(self.sysfs.read_knob("pages_to_scan")),
            sleep_millisecs=int(self.sysfs.read_knob("sleep_millisecs")))


def act(sysfs: KsmSysfs, decision: Decision, audit: AuditLog | None) -> Changes:
    """Apply a decision: each knob that differs is validated, written, read
    back (KsmSysfs.set) and audit-logged. Never unmerges.

    Returns (knob, before, after) for each change. Raises KnobError,
    AccessDenied, KsmUnavailable, AuditError.
    """
    changes: Changes = []
    for name, value in decision.knobs().items():
        if name == "run" and value == RUN_UNMERGE:
            raise KnobError("the tuner never unmerges (run=2)")
        sysfs.validate(name, value)
    for name, value in decision.knobs().items():
        before = sysfs.read_knob(name)
        if before == value:
            continue
        after = sysfs.set(name, value)
        if audit is not None:
            audit.record("knob", f"knob {name}", before, after,
                         f"tuner {decision.mode}: {decision.reason}")
        changes.append((name, before, after))
    return changes


def check_advisor(sysfs: KsmSysfs, take_over: bool, dry_run: bool,
                  audit: AuditLog | None) -> str | None:
    """Refuse to fight the kernel's own scan-time advisor unless told to take
    over; taking over sets advisor_mode=none. Returns a line to print, if any."""
    knobs = sysfs.knobs()
    if knobs.get("advisor_mode") != "scan-time":
        return None
    if not take_over:
        raise UsageError("the kernel's KSM advisor is on (advisor_mode=scan-time) and owns "
                         "pages_to_scan; pass --take-over to switch it off and tune instead")
    if dry_run:
        return "would switch the kernel advisor off (advisor_mode=scan-time -> none)"
    sysfs.set("advisor_mode", "none")
    if audit is not None:
        audit.record("knob", "knob advisor_mode", "scan-time", "none",
                     "tuner --take-over: the tuner owns pages_to_scan")
    return "kernel advisor switched off (advisor_mode=scan-time -> none)"


class Tuner:
    """Collect, decide, act, one ``step`` at a time (the caller owns the pace).

    ``start`` takes the first observation; each ``step`` observes again,
    decides and, unless ``dry_run``, acts. Raises what Collector and act raise.
    """

    def __init__(self, sysfs: KsmSysfs, procfs: ProcFs, policy: TunerPolicy,
                 audit: AuditLog | None, *, dry_run: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sysfs = sysfs
        self.policy = policy
        self.audit = audit
        self.dry_run = dry_run
        self.collector = Collector(sysfs, procfs, clock)
        self.state = TunerState()

    def start(self, *, act_now: bool = False) -> tuple[Observation, Decision, Changes | None]:
        """The first observation and the decision it gives.

        One observation shows no cost and no convergence, so a tuner starts
        in merge mode and its first decision is to scan at the budget with
        the assumed cost per page. With ``act_now`` (a tuner that keeps
        running) it is put in force at once, rather than after an interval
        of doing nothing; the next step measures the real cost and backs off
        if the assumption was over budget. Without it (``--once``: one
        measured decision) nothing is written.
        """
        obs = self.collector.observe()
        decision, self.state = decide(self.state, obs, self.policy)
        changes = act(self.sysfs, decision, self.audit) if act_now and not self.dry_run else None
        return obs, decision, changes

    def step(self) -> tuple[Observation, Decision, Changes | None]:
        """One decision: (observation, decision, changes made; None in a dry run)."""
        obs = self.collector.observe()
        decision, self.state = decide(self.state, obs, self.policy)
        changes = None if self.dry_run else act(self.sysfs, decision, self.audit)
        return obs, decision, changes
