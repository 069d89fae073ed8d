"""vmshare's KSM tuner against ksmtuned, on the same workload, real kernel KSM.

The workload: PROCS processes x SIZE MiB of private anonymous memory, half of
it identical across the processes, marked MADV_MERGEABLE. Each process is
started with argv[0] "qemu-system-x86_64" and "-X -enable-kvm" on its
command line so that ksmtuned's own test (pgrep -f '^qemu-system.*-enable-kvm',
RSS summed with ps) counts it as committed guest memory.

Runs, each on a fresh workload with KSM stopped and unmerged and the knobs at
the kernel defaults (pages_to_scan 100, sleep 20 ms, smart_scan 1):
  ksmtuned      the real Debian /usr/sbin/ksmtuned, configured through
                /etc/ksmtuned.conf (saved and restored) with
                KSM_MONITOR_INTERVAL=INTERVAL and KSM_THRES_COEF=99: with its
                default 20% this 24 GiB host never counts as short of memory
                and ksmtuned keeps KSM stopped (nothing would ever merge); 99%
                makes it boost, i.e. it treats memory as tight.
  vmshare       `vmshare tune --interval INTERVAL` with the default policy.
  vmshare-tight the same with --tight 99 --ample 100: memory declared tight,
                as ksmtuned was told, so the tuner watches instead of stopping.
Figures: time until pages_sharing reached 99% of its final value, ksmd CPU
seconds in that time, ksmd CPU seconds in the WINDOW seconds after that
(the idle cost, detection time included), final pages_sharing, and the
tuner process's own CPU (ksmtuned: its loop with awk/ps/pgrep children).
Every KSM knob is saved and restored; everything merged is unmerged.

Run as root:  .venv/bin/python benchmarks/tuner_vs_ksmtuned.py [PROCS] [SIZE_MIB] [WINDOW_S]
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.ksm_fixtures import ksm_session
from vmshare.ksm.procfs import ProcFs
from vmshare.ksm.sysfs import KsmSysfs
from vmshare.tuner.loop import KsmdClock

REPO = Path(__file__).resolve().parent.parent
KSMTUNED = Path("/usr/sbin/ksmtuned")
KSMTUNED_CONF = Path("/etc/ksmtuned.conf")
INTERVAL = 2
SEED = 4242


@dataclass
class Result:
    name: str
    t99: float
    cpu_to_t99: float
    cpu_window: float
    final_sharing: int
    tuner_cpu: float
    note: str = ""


def start_workload(procs: int, size_mib: int) -> list[subprocess.Popen[str]]:
    pages = size_mib * 256
    started = []
    for _ in range(procs):
        p = subprocess.Popen(
            ["qemu-system-x86_64", "-X", "-enable-kvm", "-m", "integration.memproc",
             "--identical", str(pages // 2), "--unique", str(pages - pages // 2),
             "--seed", str(SEED), "--dontfork"],
            executable=sys.executable, cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline().split()
        if not line or line[0] != "ready":
            p.kill()
            raise SystemExit(f"memproc did not start: {line}")
        started.append(p)
    return started


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def proc_cpu(pid: int) -> float:
    """utime+stime+cutime+cstime of a process we started, in seconds."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in rest[11:15]) / os.sysconf("SC_CLK_TCK")


def fresh_ksm(sysfs: KsmSysfs) -> None:
    sysfs.unmerge()
    for name, value in (("advisor_mode", "none"), ("smart_scan", 1),
                        ("pages_to_scan", 100), ("sleep_millisecs", 20)):
        if name in sysfs.knobs():
            sysfs.set(name, value)
    sysfs.set("run", 0)


def measure(name: str, sysfs: KsmSysfs, clock: KsmdClock, start_tuner: object,
            stop_tuner: object, expected: int, window: float,
            limit: float = 240.0) -> Result:
    """Poll pages_sharing and ksmd CPU from the tuner's start until WINDOW
    seconds after 99% of the expected sharing (or ``limit``)."""
    t0 = time.monotonic()
    c0 = clock.seconds()
    tuner_pid = start_tuner()  # type: ignore[operator]
    samples: list[tuple[float, int, float]] = []
    reached: float | None = None
    while True:
        now = time.monotonic() - t0
        sharing = sysfs.read_int("pages_sharing")
        samples.append((now, sharing, clock.seconds() - c0))
        if reached is None and sharing >= 0.99 * expected:
            reached = now
        if (reached is not None and now >= reached + window) or now > limit:
            break
        time.sleep(0.2)
    tuner_cpu = proc_cpu(tuner_pid)
    stop_tuner()  # type: ignore[operator]
    final = samples[-1][1]
    # 99% of the final value, from the samples
    t99, cpu99 = next((t, c) for t, s, c in samples if s >= 0.99 * final)
    after = [c for t, _, c in samples if t <= t99 + window]
    note = "" if reached is not None else f"(never reached 99% of {expected:,})"
    return Result(name, t99, cpu99, after[-1] - cpu99, final, tuner_cpu, note)


def run_ksmtuned(sysfs: KsmSysfs, clock: KsmdClock, procs: int, size_mib: int,
                 window: float, expected: int) -> Result:
    saved = KSMTUNED_CONF.read_bytes() if KSMTUNED_CONF.exists() else None
    pidfile = Path(tempfile.mkdtemp(prefix="vmshare-bench-")) / "ksmtune.pid"
    work = start_workload(procs, size_mib)
    holder: dict[str, subprocess.Popen[bytes]] = {}
    try:
        KSMTUNED_CONF.write_text(
            "# written by vmshare benchmarks/tuner_vs_ksmtuned.py; restored afterwards\n"
            f"KSM_MONITOR_INTERVAL={INTERVAL}\nKSM_THRES_COEF=99\nPIDFILE={pidfile}\n")

        def start() -> int:
            # its own session: the backgrounded loop and its sleeps share our group
            holder["p"] = subprocess.Popen([str(KSMTUNED)], start_new_session=True)
            holder["p"].wait(timeout=10)          # the script forks `loop &` and exits
            deadline = time.monotonic() + 5
            while not pidfile.exists() or not pidfile.read_text().strip():
                if time.monotonic() > deadline:
                    raise SystemExit("ksmtuned did not write its pid file")
                time.sleep(0.05)
            return int(pidfile.read_text())

        def stop() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(holder["p"].pid, signal.SIGKILL)

        return measure("ksmtuned", sysfs, clock, start, stop, expected, window)
    finally:
        if "p" in holder:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(holder["p"].pid, signal.SIGKILL)
        if saved is None:
            KSMTUNED_CONF.unlink(missing_ok=True)
        else:
            KSMTUNED_CONF.write_bytes(saved)
        stop_all(work)
        fresh_ksm(sysfs)


def run_vmshare(name: str, extra: list[str], sysfs: KsmSysfs, clock: KsmdClock, procs: int,
                size_mib: int, window: float, expected: int) -> Result:
    work = start_workload(procs, size_mib)
    holder: dict[str, subprocess.Popen[bytes]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="vmshare-bench-"))
    log = (tmp / "tune.log").open("w")
    print(f"{name}: decisions in {tmp / 'tune.log'}", flush=True)
    try:
        def start() -> int:
            holder["p"] = subprocess.Popen(
                [sys.executable, "-m", "vmshare", "tune", "--interval", str(INTERVAL),
                 "--audit-log", str(tmp / "audit.jsonl"), *extra], cwd=REPO, stdout=log)
            return holder["p"].pid

        def stop() -> None:
            holder["p"].send_signal(signal.SIGTERM)
            holder["p"].wait(timeout=10)

        return measure(name, sysfs, clock, start, stop, expected, window)
    finally:
        if "p" in holder and holder["p"].poll() is None:
            holder["p"].kill()
            holder["p"].wait()
        log.close()
        stop_all(work)
        fresh_ksm(sysfs)


def main() -> int:
    from benchmarks.common import machine
    print(machine())
    args = sys.argv[1:]
    procs = int(args[0]) if len(args) > 0 else 4
    size_mib = int(args[1]) if len(args) > 1 else 256
    window = float(args[2]) if len(args) > 2 else 30.0
    if os.geteuid() != 0:
        raise SystemExit("run as root: kernel KSM knobs")
    if not KSMTUNED.exists():
        raise SystemExit("ksmtuned is not installed: apt-get install ksmtuned")
    sysfs, clock = KsmSysfs(), KsmdClock(ProcFs())
    sysfs.require()
    expected = (procs - 1) * (size_mib * 256 // 2)
    results: list[Result] = []
    print(f"workload: {procs} processes x {size_mib} MiB, half identical "
          f"(expected pages_sharing {expected:,}); interval {INTERVAL} s; "
          f"idle window {window:g} s", flush=True)
    with ksm_session(sysfs, {}):      # every knob restored; fresh_ksm before each run
        fresh_ksm(sysfs)
        results.append(run_ksmtuned(sysfs, clock, procs, size_mib, window, expected))
        results.append(run_vmshare("vmshare", [], sysfs, clock, procs, size_mib, window,
                                   expected))
        results.append(run_vmshare("vmshare-tight", ["--tight", "99", "--ample", "100"],
                                   sysfs, clock, procs, size_mib, window, expected))
    print(f"{'run':<14} {'t99 (s)':>8} {'ksmd CPU to t99 (s)':>20} "
          f"{'ksmd CPU next ' + format(window, 'g') + ' s':>20} {'final sharing':>14} "
          f"{'tuner CPU (s)':>14}")
    for r in results:
        print(f"{r.name:<14} {r.t99:8.1f} {r.cpu_to_t99:20.2f} {r.cpu_window:20.2f} "
              f"{r.final_sharing:14,} {r.tuner_cpu:14.2f} {r.note}")
    base = results[0]
    for r in results[1:]:
        speed = base.t99 / r.t99 if r.t99 else float("inf")
        idle = (f"{base.cpu_window / r.cpu_window:.1f}x less" if r.cpu_window > 0
                else "none at all")
        print(f"{r.name} vs ksmtuned: converges {speed:.1f}x faster; idle ksmd CPU {idle} "
              f"({r.cpu_window:.2f} s vs {base.cpu_window:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
