"""The host's control lock (vmshare/control/lock.py): acts from several
processes run one at a time, a wait is bounded and names the holder, and
the CLI takes the lock around every command that acts."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.ksmtree import make_sysfs
from vmshare.cli.main import ACTS, acting, build_parser
from vmshare.control.lock import ControlBusy, ControlLockError, control_lock

REPO = Path(__file__).resolve().parent.parent

# A process that takes the lock, records when it held it and bumps a counter
# with a deliberately slow read-modify-write: without mutual exclusion,
# updates are lost and intervals overlap.
WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from vmshare.control.lock import control_lock
    lock, counter, log, hold = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    with control_lock("worker " + sys.argv[5], path=lock, wait=30):
        t0 = time.monotonic()
        n = int(counter.read_text())
        time.sleep(hold)
        counter.write_text(str(n + 1))
        t1 = time.monotonic()
    with open(log, "a") as f:
        f.write(json.dumps([t0, t1]) + "\\n")
""")


def worker(tmp_path: Path, name: str, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "control.lock"),
                             str(tmp_path / "counter"), str(tmp_path / "held.jsonl"),
                             str(hold), name], cwd=REPO, text=True)


def holding(tmp_path: Path, name: str, hold: float) -> subprocess.Popen[str]:
    """A worker process that has taken the lock (its line is in the file)."""
    (tmp_path / "counter").write_text("0")
    holder = worker(tmp_path, name, hold)
    lock = tmp_path / "control.lock"
    deadline = time.monotonic() + 10
    while not (lock.exists() and lock.read_text()):
        assert time.monotonic() < deadline, "the worker never took the lock"
        time.sleep(0.01)
    return holder


def test_processes_contending_run_one_at_a_time(tmp_path: Path) -> None:
    (tmp_path / "counter").write_text("0")
    procs = [worker(tmp_path, str(i), 0.05) for i in range(8)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert (tmp_path / "counter").read_text() == "8"          # no update lost
    held = (tmp_path / "held.jsonl").read_text().splitlines()
    spans = sorted(json.loads(line) for line in held)
    assert len(spans) == 8
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "two processes held the lock at once"
    assert not (tmp_path / "control.lock").exists()           # nothing left behind


def test_wait_is_bounded_and_names_the_holder(tmp_path: Path) -> None:
    holder = holding(tmp_path, "holder", 2.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(ControlBusy) as exc, \
                control_lock("test", path=tmp_path / "control.lock", wait=0.5):
            pass
        waited = time.monotonic() - t0
        assert 0.5 <= waited < 1.5
        assert f"pid {holder.pid} (worker holder)" in str(exc.value)
        assert "more than 0.5 s" in str(exc.value) and exc.value.exit_code == 75
    finally:
        assert holder.wait(timeout=30) == 0
    with control_lock("after", path=tmp_path / "control.lock", wait=0):
        assert (tmp_path / "control.lock").read_text() == f"{os.getpid()} after\n"


def test_a_dead_holder_releases_at_once(tmp_path: Path) -> None:
    holder = holding(tmp_path, "doomed", 30.0)
    holder.kill()
    holder.wait()
    with control_lock("next", path=tmp_path / "control.lock", wait=2):
        pass


def test_reentrant_in_a_thread_exclusive_between_threads(tmp_path: Path) -> None:
    path = tmp_path / "control.lock"
    errors: list[BaseException] = []
    entered: list[float] = []

    def other_thread(wait: float) -> None:
        try:
            with control_lock("thread", path=path, wait=wait):
                entered.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    with control_lock("outer", path=path, wait=1):
        with control_lock("inner", path=path, wait=0):    # an act calling an act
            pass
        assert path.exists()                              # still held by "outer"
        t = threading.Thread(target=other_thread, args=(0.2,))
        t.start()
        t.join()
        assert len(errors) == 1 and isinstance(errors[0], ControlBusy)
        assert "another thread of this process" in str(errors[0])
        t = threading.Thread(target=other_thread, args=(5,))
        t.start()
        time.sleep(0.3)
        assert entered == []                              # waits for "outer"
        released = time.monotonic()
    t.join()
    assert len(entered) == 1 and entered[0] >= released
    assert not path.exists()


def test_a_planted_fifo_or_symlink_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(ControlLockError, match="not a regular file"), \
            control_lock("x", path=fifo, wait=0):
        pass
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "link.lock").symlink_to(target)
    with pytest.raises(ControlLockError, match="cannot open"), \
            control_lock("x", path=tmp_path / "link.lock", wait=0):
        pass
    assert target.read_text() == "keep me"


# ----------------------------------------------------------------- the CLI
@pytest.mark.parametrize(("argv", "what"), [
    (["enable", "web-1"], "vmshare enable web-1"),
    (["disable", "web-1", "--force"], "vmshare disable web-1"),
    (["ksm", "set", "run=1"], "vmshare ksm set"), (["ksm", "start"], "vmshare ksm start"),
    (["ksm", "stop"], "vmshare ksm stop"), (["ksm", "unmerge"], "vmshare ksm unmerge"),
    (["policy", "set", "web-1", "--merge", "on"], "vmshare policy set web-1"),
    (["status"], None), (["list"], None), (["ksm", "show"], None), (["metrics"], None),
    (["policy", "show"], None), (["tune"], None),
])
def test_which_commands_act(argv: list[str], what: str | None) -> None:
    assert acting(build_parser().parse_args(argv)) == what
    assert len(ACTS) == 7


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmshare", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)


def test_cli_act_waits_a_bounded_time_then_names_the_holder(tmp_path: Path) -> None:
    env = {**os.environ, "VMSHARE_SYSFS_ROOT": str(make_sysfs(tmp_path / "ksm")),
           "VMSHARE_CONTROL_LOCK": str(tmp_path / "control.lock")}
    holder = holding(tmp_path, "holder", 2.0)
    try:
        proc = cli("--lock-wait", "0.5", "ksm", "set", "pages_to_scan=500", env=env)
        assert proc.returncode == 75
        assert proc.stderr == (f"vmshare: error: pid {holder.pid} (worker holder) has held the "
                               f"control lock {tmp_path}/control.lock for more than 0.5 s; "
                               "try again when it is done\n")
        assert (tmp_path / "ksm" / "pages_to_scan").read_text() == "100\n"   # untouched
        # A command that only reads does not wait.
        assert cli("ksm", "show", env=env).returncode == 0
    finally:
        holder.wait(timeout=30)


def test_cli_acts_from_many_shells_form_one_serial_order(tmp_path: Path) -> None:
    """Five `ksm set` at once: each reports the value the previous one left
    (one chain from the start value), and the knob ends as the last set it."""
    env = {**os.environ, "VMSHARE_SYSFS_ROOT": str(make_sysfs(tmp_path / "ksm")),
           "VMSHARE_CONTROL_LOCK": str(tmp_path / "control.lock")}
    values = [str(1000 + i) for i in range(5)]
    procs = [subprocess.Popen([sys.executable, "-m", "vmshare", "ksm", "set",
                               f"pages_to_scan={v}"], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for v in values]
    pairs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        before, after = out.strip().removeprefix("pages_to_scan: ").split(" -> ")
        pairs.append((before, after))
    chain = {before: after for before, after in pairs}
    assert len(chain) == 5, f"two acts read the same 'before': {pairs}"
    value, seen = "100", []
    while value in chain:
        value = chain[value]
        seen.append(value)
    assert sorted(seen) == values
    assert (tmp_path / "ksm" / "pages_to_scan").read_text().strip() == seen[-1]
    assert not (tmp_path / "control.lock").exists()


def test_tune_takes_the_lock_per_step_and_skips_a_busy_step(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`tune` holds the lock only around each act: while another act holds
    it, the step is skipped with a warning naming the holder, and the tuner
    carries on (it runs for hours; it must not die of a busy moment)."""
    from vmshare.cli.main import main
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "comm").write_text("ksmd\n")
    (proc / "77" / "stat").write_text("77 (ksmd) S " + " ".join(["0"] * 19) + " 555\n")
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    monkeypatch.setenv("VMSHARE_SYSFS_ROOT", str(make_sysfs(tmp_path / "ksm")))
    monkeypatch.setenv("VMSHARE_PROC_ROOT", str(proc))
    monkeypatch.setenv("VMSHARE_TUNER_LOCK", str(tmp_path / "tuner.lock"))
    monkeypatch.setenv("VMSHARE_CONTROL_LOCK", str(tmp_path / "control.lock"))
    holder = holding(tmp_path, "holder", 1.0)
    try:
        code = main(["--lock-wait", "0.1", "tune", "--interval", "0.05", "--steps", "1",
                     "--json", "--audit-log", str(tmp_path / "audit.jsonl")])
    finally:
        holder.wait(timeout=30)
    out, err = capsys.readouterr()
    assert code == 0
    skipped = [line for line in err.splitlines() if "this step is skipped" in line]
    assert skipped and all(f"pid {holder.pid} (worker holder)" in line for line in skipped)
    assert len(out.splitlines()) == 1 and json.loads(out)["mode"]     # then one decision
