"""The libvirt qemu hook, run the way libvirtd runs it.

Each run goes through a small subreaper runner: it starts the hook with
libvirt's stripped environment, the XML through a pipe on stdin and stdout
captured (as libvirt does on migrate/restore), times it, and afterwards lists
every process reparented to it, so a child left behind by the hook is seen
even after the hook exited.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmshare.daemon import spool, wakeup

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "hooks" / "vmshare-qemu-hook"
LIBVIRT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
ENTRY_NAME = re.compile(r"^[0-9]{19}-[0-9]+-[0-9a-f]{16}\.json$")

DOMAIN_XML = f"""<domain type='qemu' id='3'>
  <name>guest-1</name>
  <uuid>{UUID.upper()}</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/g1.qcow2'/>
      <target dev='vda' bus='virtio'/></disk>
    <!-- a nested name must not be taken for the domain's -->
    <hostdev><source><name>not-the-domain</name></source></hostdev>
  </devices>
</domain>
""".encode()

# Every qemu hook call libvirt documents (docs/hooks.rst): operation, sub-operation, extra.
LIBVIRT_CALLS = [
    ("prepare", "begin", "-"),
    ("start", "begin", "-"),
    ("started", "begin", "-"),
    ("stopped", "end", "-"),
    ("release", "end", "-"),
    ("release", "end", "destroyed"),  # shutoff reason, libvirt >= 10.5
    ("release", "end", "from snapshot"),
    ("migrate", "begin", "-"),
    ("restore", "begin", "-"),
    ("reconnect", "begin", "-"),
    ("attach", "begin", "-"),
]

RUNNER = r"""
import ctypes, json, os, subprocess, sys, time
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
data = b""
if cfg["stdin_file"]:
    with open(cfg["stdin_file"], "rb") as f:
        data = f.read()
t0 = time.monotonic()
p = subprocess.Popen(cfg["argv"], env=cfg["env"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
hung = False
if cfg["hold_stdin"]:
    p.stdin.write(data)
    p.stdin.flush()
    try:
        p.wait(timeout=cfg["timeout"])
    except subprocess.TimeoutExpired:
        hung = True
        p.kill()
    elapsed = time.monotonic() - t0
    p.stdin.close()
    out, err = p.stdout.read(), p.stderr.read()
else:
    try:
        out, err = p.communicate(data, timeout=cfg["timeout"])
    except subprocess.TimeoutExpired:
        hung = True
        p.kill()
        out, err = p.communicate()
    elapsed = time.monotonic() - t0
time.sleep(0.05)
me = os.getpid()
orphans = []
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    try:
        with open(f"/proc/{name}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        continue
    if int(fields[1]) == me:
        orphans.append(int(name))
for pid in orphans:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except OSError:
        pass
json.dump({"rc": p.returncode, "out": out.decode("latin-1"), "err": err.decode("latin-1"),
           "seconds": elapsed, "orphans": orphans, "hung": hung, "pid": p.pid}, sys.stdout)
"""


@dataclass
class HookRun:
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float
    orphans: list[int]
    hung: bool

    def assert_libvirt_safe(self, stderr_lines: int) -> None:
        """What libvirtd needs from every run, whatever went wrong."""
        assert not self.hung, "hook did not finish (or left its stdout open)"
        assert self.rc == 0, self.stderr
        assert self.seconds < 1.0, f"hook took {self.seconds:.3f} s"
        assert self.stdout == b"", "stdout would replace the domain XML"
        assert self.orphans == [], f"hook left children behind: {self.orphans}"
        lines = self.stderr.decode("ascii", "replace").splitlines()
        assert len(lines) == stderr_lines, self.stderr
        if stderr_lines:
            assert self.stderr.endswith(b"\n") and len(self.stderr) <= 400
            assert lines[0].startswith("vmshare-qemu-hook: ")


def libvirt_env(spool_dir: Path, sock: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": LIBVIRT_PATH, "LC_ALL": "C", "HOME": "/",
           "VMSHARE_SPOOL_DIR": str(spool_dir), "VMSHARE_SOCKET": str(sock),
           "VMSHARE_HOOK_CONF": "/nonexistent/hook.conf"}
    env.update(extra)
    return env


def run_hook(tmp: Path, args: list[str], stdin: bytes | Path = DOMAIN_XML, *,
             env: dict[str, str], hook: Path = HOOK, hold_stdin: bool = False,
             timeout: float = 5.0) -> HookRun:
    if isinstance(stdin, Path):
        stdin_file = stdin
    else:
        stdin_file = tmp / "stdin.xml"
        stdin_file.write_bytes(stdin)
    cfg = {"argv": [str(hook), *args], "env": env, "stdin_file": str(stdin_file),
           "hold_stdin": hold_stdin, "timeout": timeout}
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cfg)],
                          capture_output=True, timeout=timeout + 10, check=True)
    res = json.loads(done.stdout)
    return HookRun(res["rc"], res["out"].encode("latin-1"), res["err"].encode("latin-1"),
                   res["seconds"], res["orphans"], res["hung"])


def entries(spool_dir: Path) -> list[Path]:
    return sorted(p for p in spool_dir.iterdir() if p.name.endswith(".json"))


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "spool", tmp_path / "run" / "wakeup.sock"


@pytest.fixture
def daemon_socket(dirs: tuple[Path, Path]) -> Iterator[socket.socket]:
    sock = wakeup.bind_wakeup_socket(dirs[1])
    yield sock
    sock.close()


def test_hook_is_installed_executable_with_a_single_interpreter_option() -> None:
    first = HOOK.read_bytes().split(b"\n", 1)[0]
    # Linux passes everything after the interpreter as ONE argument: "-I -S" breaks python3
    assert first == b"#!/usr/bin/python3 -IS"
    assert HOOK.stat().st_mode & 0o111


@pytest.mark.parametrize(("operation", "sub_operation", "extra"), LIBVIRT_CALLS)
def test_every_libvirt_call_is_spooled_and_signalled(
        tmp_path: Path, dirs: tuple[Path, Path], daemon_socket: socket.socket,
        operation: str, sub_operation: str, extra: str) -> None:
    spool_dir, sock = dirs
    before = time.time()
    run = run_hook(tmp_path, ["guest-1", operation, sub_operation, extra],
                   env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=0)
    [entry] = entries(spool_dir)
    assert ENTRY_NAME.match(entry.name)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700  # created by the hook
    assert [p.name for p in spool_dir.iterdir()] == [entry.name]  # no temp file left
    raw = json.loads(entry.read_bytes())
    assert raw["v"] == spool.FORMAT_VERSION and raw["xml"] == "ok"
    assert raw["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    [woken] = wakeup.drain_wakeups(daemon_socket)
    [event] = spool.drain(spool_dir)
    assert event == spool.SpoolEvent(
        domain="guest-1", uuid=UUID, operation=operation, sub_operation=sub_operation,
        extra=extra, time=event.time, seq=event.seq, boot_id=raw["boot_id"], entry=entry.name)
    assert before <= event.time <= time.time()
    assert 0 < event.seq <= time.monotonic_ns()
    assert woken == event
    assert entries(spool_dir) == []


def test_consecutive_calls_keep_their_order(tmp_path: Path, dirs: tuple[Path, Path],
                                            daemon_socket: socket.socket) -> None:
    spool_dir, sock = dirs
    calls = [("prepare", "begin", "-"), ("start", "begin", "-"), ("started", "begin", "-"),
             ("stopped", "end", "-"), ("release", "end", "-")]
    for op, sub, extra in calls:
        run_hook(tmp_path, ["guest-1", op, sub, extra],
                 env=libvirt_env(spool_dir, sock)).assert_libvirt_safe(0)
    events = spool.drain(spool_dir)
    assert [(e.operation, e.sub_operation) for e in events] == [c[:2] for c in calls]
    assert len(wakeup.drain_wakeups(daemon_socket)) == len(calls)


def test_daemon_socket_absent(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    spool_dir, sock = dirs
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"], env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"daemon not notified (ENOENT)" in run.stderr
    assert len(entries(spool_dir)) == 1  # the spool is the record; the datagram only wakes


def test_daemon_socket_nobody_reads(tmp_path: Path, dirs: tuple[Path, Path],
                                    daemon_socket: socket.socket) -> None:
    spool_dir, sock = dirs
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            filler.sendto(b"x" * 4096, str(sock))
            sent += 1
    filler.close()
    assert sent > 0
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"], env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"daemon not notified (EAGAIN)" in run.stderr
    assert len(entries(spool_dir)) == 1


def test_spool_dir_missing_and_not_creatable(tmp_path: Path, dirs: tuple[Path, Path],
                                             daemon_socket: socket.socket) -> None:
    _, sock = dirs
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool's parent should be\n")
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"],
                   env=libvirt_env(blocker / "spool", sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"spool dir unusable (ENOTDIR), event dropped" in run.stderr
    # the daemon still hears of the event, and that it is not in the spool
    [event] = wakeup.drain_wakeups(daemon_socket)
    assert (event.operation, event.entry) == ("start", "")


def test_spool_dir_replaced_by_a_file(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    spool_dir, sock = dirs
    spool_dir.write_text("")
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"], env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"spool dir unusable (ENOTDIR)" in run.stderr
    assert spool_dir.read_text() == ""


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()}): needs root with CAP_SYS_ADMIN")


@pytest.fixture
def read_only_spool(tmp_path: Path) -> Iterator[Path]:
    """A spool directory on a read-only bind mount: EROFS stops root too."""
    real = tmp_path / "real-spool"
    real.mkdir(mode=0o700)
    ro = tmp_path / "ro-spool"
    ro.mkdir(mode=0o700)
    _mount("--bind", str(real), str(ro))
    try:
        _mount("-o", "remount,ro,bind", str(ro))
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_spool_dir_read_only(tmp_path: Path, dirs: tuple[Path, Path],
                             read_only_spool: Path) -> None:
    _, sock = dirs
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"],
                   env=libvirt_env(read_only_spool, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"spool write failed (EROFS), event dropped" in run.stderr


@pytest.fixture
def full_filesystem_spool(tmp_path: Path) -> Iterator[Path]:
    """A spool directory on a tiny tmpfs filled to the last block: ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(mnt))
    try:
        (mnt / "spool").mkdir(mode=0o700)
        with pytest.raises(OSError, match="No space left"), (mnt / "filler").open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield mnt / "spool"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_spool_filesystem_full(tmp_path: Path, dirs: tuple[Path, Path],
                               full_filesystem_spool: Path) -> None:
    _, sock = dirs
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"],
                   env=libvirt_env(full_filesystem_spool, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"spool write failed (ENOSPC), event dropped" in run.stderr
    assert list(full_filesystem_spool.iterdir()) == []  # the temp file was removed


def test_spool_cap_reached(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    spool_dir, sock = dirs
    spool_dir.mkdir(mode=0o700)
    for i in range(10_000):  # the default cap, counted for real
        (spool_dir / f"{i:019d}-1-{i:016x}.json").touch()
    run = run_hook(tmp_path, ["guest-1", "stopped", "end", "-"], env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"spool full (10000 entries), event dropped" in run.stderr
    assert len(entries(spool_dir)) == 10_000


def test_spool_cap_from_environment(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    spool_dir, sock = dirs
    env = libvirt_env(spool_dir, sock, VMSHARE_SPOOL_MAX="2")
    for expected_lines in (1, 1, 1):  # socket absent each time; the third is also dropped
        run_hook(tmp_path, ["guest-1", "start", "begin", "-"], env=env).assert_libvirt_safe(
            expected_lines)
    assert len(entries(spool_dir)) == 2


@pytest.mark.parametrize(("stdin", "problem"), [
    (b"<domain><name>guest-1</name><uuid>" + UUID.encode() + b"</uu", b"bad domain XML"),
    (b"\x89PNG\r\n\x1a\n\0\0garbage", b"domain XML"),
    (b"", b"no domain XML on stdin"),
    (b"<domain><name>guest-1</name><uuid>not-a-uuid</uuid></domain>", b"without a valid"),
    ("<domain><name>guest-1</name></domain>".encode("utf-16"), b"ASCII-compatible"),
])
def test_bad_xml_falls_back_to_the_name_libvirt_passed(
        tmp_path: Path, dirs: tuple[Path, Path], daemon_socket: socket.socket,
        stdin: bytes, problem: bytes) -> None:
    spool_dir, sock = dirs
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"], stdin,
                   env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert problem in run.stderr
    [event] = spool.drain(spool_dir)
    assert (event.domain, event.uuid, event.operation) == ("guest-1", None, "start")


def _hook_parsing_with(tmp_path: Path, code: str) -> Path:
    """A copy of the hook that runs ``code`` first thing in parse_domain."""
    marker = "def parse_domain(xml, problems):\n"
    text = HOOK.read_text()
    assert marker in text
    copy = tmp_path / "changed-hook"
    copy.write_text(text.replace(marker, marker + code))
    copy.chmod(0o755)
    return copy


def test_a_slow_parse_never_loses_the_event(tmp_path: Path, dirs: tuple[Path, Path],
                                            daemon_socket: socket.socket) -> None:
    spool_dir, sock = dirs
    slow = _hook_parsing_with(tmp_path, "    time.sleep(30)\n")
    run = run_hook(tmp_path, ["guest-1", "restore", "begin", "-"],
                   env=libvirt_env(spool_dir, sock), hook=slow)
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"gave up after 0.8 s, event recorded without its UUID" in run.stderr
    [woken] = wakeup.drain_wakeups(daemon_socket)          # woken by the timer
    [event] = spool.drain(spool_dir)                       # not locked any more
    assert (event.domain, event.uuid, event.operation) == ("guest-1", None, "restore")
    assert woken.entry == event.entry


def test_the_entry_is_locked_until_it_is_complete(tmp_path: Path, dirs: tuple[Path, Path],
                                                  daemon_socket: socket.socket) -> None:
    """A drainer running during the parse finds the entry locked and leaves it."""
    spool_dir, sock = dirs
    seen = tmp_path / "seen.json"
    check = (f"    import fcntl as _f, json as _j\n"
             f"    _names = [n for n in os.listdir({str(spool_dir)!r}) if n.endswith('.json')]\n"
             f"    _fd = os.open({str(spool_dir)!r} + '/' + _names[0], os.O_RDONLY)\n"
             f"    try:\n"
             f"        _f.flock(_fd, _f.LOCK_SH | _f.LOCK_NB)\n"
             f"        _locked = False\n"
             f"    except BlockingIOError:\n"
             f"        _locked = True\n"
             f"    open({str(seen)!r}, 'w').write(_j.dumps([_names, _locked]))\n")
    probe = _hook_parsing_with(tmp_path, check)
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"],
                   env=libvirt_env(spool_dir, sock), hook=probe)
    run.assert_libvirt_safe(stderr_lines=0)
    names, locked = json.loads(seen.read_text())
    assert len(names) == 1 and locked      # written before the parse, and held
    [event] = spool.drain(spool_dir)
    assert (event.domain, event.uuid, event.entry) == ("guest-1", UUID, names[0])
    assert [p.name for p in spool_dir.iterdir()] == []


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domain><name>&lol9;</name><uuid>""" + UUID.encode() + b"</uuid></domain>"


def test_xml_bomb_is_rejected_unparsed(tmp_path: Path, dirs: tuple[Path, Path],
                                       daemon_socket: socket.socket) -> None:
    spool_dir, sock = dirs
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"], BILLION_LAUGHS,
                   env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"DOCTYPE/ENTITY rejected" in run.stderr
    [event] = spool.drain(spool_dir)
    assert (event.domain, event.uuid) == ("guest-1", None)


def test_50_mib_stdin_is_drained_not_parsed(tmp_path: Path, dirs: tuple[Path, Path],
                                            daemon_socket: socket.socket) -> None:
    spool_dir, sock = dirs
    big = tmp_path / "big.xml"
    with big.open("wb") as f:
        f.write(DOMAIN_XML.replace(b"</domain>", b"<description>"))
        chunk = b"A" * (1 << 20)
        for _ in range(50):
            f.write(chunk)
        f.write(b"</description></domain>\n")
    run = run_hook(tmp_path, ["guest-1", "migrate", "begin", "-"], big,
                   env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"over 4 MiB not parsed" in run.stderr
    [event] = spool.drain(spool_dir)
    assert (event.domain, event.uuid, event.operation) == ("guest-1", None, "migrate")


def test_stdin_never_closed(tmp_path: Path, dirs: tuple[Path, Path],
                            daemon_socket: socket.socket) -> None:
    spool_dir, sock = dirs
    run = run_hook(tmp_path, ["guest-1", "start", "begin", "-"], DOMAIN_XML,
                   env=libvirt_env(spool_dir, sock), hold_stdin=True)
    run.assert_libvirt_safe(stderr_lines=1)
    assert b"stdin still open" in run.stderr
    [event] = spool.drain(spool_dir)
    assert event.uuid == UUID  # what arrived before the deadline was still used


def test_hostile_domain_name_never_reaches_a_path(tmp_path: Path, dirs: tuple[Path, Path],
                                                  daemon_socket: socket.socket) -> None:
    spool_dir, sock = dirs
    name = "../../evil\n$(touch pwned);`id` \u00e9\u2603"
    xml = (f"<domain><name>{name.replace('&', '&amp;').replace('<', '&lt;')}</name>"
           f"<uuid>{UUID}</uuid></domain>").encode()
    run = run_hook(tmp_path, [name, "start", "begin", "-"], xml,
                   env=libvirt_env(spool_dir, sock))
    run.assert_libvirt_safe(stderr_lines=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "spool", "stdin.xml"]
    [entry] = entries(spool_dir)
    assert ENTRY_NAME.match(entry.name)
    [event] = spool.drain(spool_dir)
    assert event.domain == name


def test_config_file_next_to_the_hook(tmp_path: Path) -> None:
    spool_dir, sock = tmp_path / "from-conf", tmp_path / "conf.sock"
    conf = tmp_path / "hook.conf"
    conf.write_text(f"# vmshare hook\n[hook]\nspool_dir = {spool_dir}\nsocket={sock}\n"
                    "unknown=1\nmax_entries=100\n")
    daemon = wakeup.bind_wakeup_socket(sock)
    try:
        env = {"PATH": LIBVIRT_PATH, "LC_ALL": "C", "HOME": "/", "VMSHARE_HOOK_CONF": str(conf)}
        run = run_hook(tmp_path, ["guest-1", "started", "begin", "-"], env=env)
        run.assert_libvirt_safe(stderr_lines=0)
        assert len(wakeup.drain_wakeups(daemon)) == 1
    finally:
        daemon.close()
    assert len(spool.drain(spool_dir)) == 1


def test_child_detection_can_fail(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    """The runner's orphan and stdout checks catch a hook that leaves a child behind."""
    bad = tmp_path / "bad-hook"
    bad.write_text("#!/bin/sh\nsleep 30 </dev/null >/dev/null 2>&1 &\necho '<domain/>'\n")
    bad.chmod(0o755)
    run = run_hook(tmp_path, ["guest-1", "migrate", "begin", "-"],
                   env=libvirt_env(*dirs), hook=bad)
    assert run.orphans and run.stdout
    with pytest.raises(AssertionError):
        run.assert_libvirt_safe(0)


def _imported_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module
            names.add(node.module.split(".")[0])
    return names


def _system_stdlib() -> set[str]:
    done = subprocess.run(["/usr/bin/python3", "-IS", "-c",
                           "import sys; print(' '.join(sorted(sys.stdlib_module_names)))"],
                          capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_hook_imports_only_the_standard_library() -> None:
    imported = _imported_modules(HOOK.read_text())
    assert "libvirt" not in imported and "subprocess" not in imported
    assert imported <= _system_stdlib(), imported - _system_stdlib()
    assert _imported_modules("import libvirt\nfrom libvirt_qemu import x\n") - _system_stdlib()


def test_hook_loads_no_libvirt_at_run_time(tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    spool_dir, sock = dirs
    done = subprocess.run(["/usr/bin/python3", "-IS", "-X", "importtime", str(HOOK), "guest-1",
                           "start", "begin", "-"], input=DOMAIN_XML, capture_output=True,
                          env=libvirt_env(spool_dir, sock), timeout=10, check=True)
    loaded = {line.split("|")[-1].strip().split(".")[0]
              for line in done.stderr.decode().splitlines() if line.startswith("import time:")}
    loaded.discard("imported package")
    assert "xml" in loaded and "json" in loaded  # the audit sees what the hook does import
    assert not {m for m in loaded if m.startswith("libvirt")}
    # "org": copy.py probes for Jython's org.python.core; the attempt is logged and fails
    assert loaded <= _system_stdlib() | {"org"}, loaded - _system_stdlib()
    assert done.stdout == b""


def test_hook_does_not_start_processes() -> None:
    source = HOOK.read_text()
    for forbidden in ("subprocess", "os.system", "os.fork", "os.exec", "os.spawn", "os.popen",
                      "virsh", "import libvirt"):
        assert forbidden not in source.split('"""', 2)[2], forbidden
