"""Our hook installed next to an administrator's qemu.d filter, run in libvirt's order.

``run_like_libvirt`` follows virHookCall() in libvirt's src/util/virhook.c
(6.5 and later): the monolithic ``hooks/qemu`` first if executable, then every
executable in ``qemu.d`` sorted with strcmp; when output is wanted
(migrate/restore) each script's non-empty stdout becomes the XML the next one
reads and the final result; empty output keeps the previous XML.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmshare.daemon import spool, wakeup
from vmshare.hook import install as hookinstall

from .test_hook import DOMAIN_XML, HOOK, LIBVIRT_PATH, UUID

OUTPUT_OPS = {"migrate", "restore"}


@dataclass
class HookCall:
    rc: int
    output: bytes | None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def run_like_libvirt(hooks_dir: Path, args: list[str], xml: bytes,
                     env: dict[str, str]) -> HookCall:
    want_output = args[1] in OUTPUT_OPS
    output: bytes | None = b"" if want_output else None
    script_ret = 1

    def run_script(path: Path, stdin: bytes) -> tuple[int, bytes]:
        done = subprocess.run([str(path), *args], input=stdin, env=env, capture_output=True,
                              timeout=5, check=False)
        return (0 if done.returncode == 0 else -1), done.stdout

    main = hooks_dir / "qemu"
    if _executable(main):
        script_ret, out = run_script(main, xml)
        if want_output:
            output = out
    qemu_d = hooks_dir / "qemu.d"
    if not qemu_d.is_dir():
        return HookCall(script_ret, output)
    entries = sorted((p for p in qemu_d.iterdir() if _executable(p)),
                     key=lambda p: os.fsencode(p.name))
    for entry in entries:
        entry_input = output if (script_ret == 0 and output) else xml
        entry_ret, entry_output = run_script(entry, entry_input)
        script_ret = min(script_ret, entry_ret)
        if entry_ret == 0 and want_output and entry_output:
            output = entry_output
    return HookCall(script_ret, output)


REWRITE = """#!/bin/sh
# An administrator's filter: on incoming migration and restore, move the disk.
case "$2" in
  migrate|restore) exec sed 's#/var/lib/libvirt/images/#/srv/images/#' ;;
esac
cat >/dev/null
"""

RECORD = """#!/bin/sh
# Records what XML it was given; prints nothing.
cat > "$RECORD_TO"
"""


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    hooks_dir = tmp_path / "hooks"
    hookinstall.install(hooks_dir, source=HOOK)
    for name, text in (("50-rewrite", REWRITE), ("zz-record", RECORD)):
        script = hooks_dir / "qemu.d" / name
        script.write_text(text)
        script.chmod(0o755)
    return hooks_dir


def _env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": LIBVIRT_PATH, "LC_ALL": "C", "HOME": "/",
            "VMSHARE_SPOOL_DIR": str(tmp_path / "spool"),
            "VMSHARE_SOCKET": str(tmp_path / "wakeup.sock"),
            "VMSHARE_HOOK_CONF": "/nonexistent", "RECORD_TO": str(tmp_path / "recorded.xml")}


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_filter_output_passes_through_our_hook(tmp_path: Path, hooks: Path,
                                               operation: str) -> None:
    assert sorted(p.name for p in (hooks / "qemu.d").iterdir()) == [
        "50-rewrite", "vmshare", "zz-record"]  # ours runs between the two
    sock = wakeup.bind_wakeup_socket(tmp_path / "wakeup.sock")
    try:
        call = run_like_libvirt(hooks, ["guest-1", operation, "begin", "-"], DOMAIN_XML,
                                _env(tmp_path))
        assert len(wakeup.drain_wakeups(sock)) == 1
    finally:
        sock.close()
    rewritten = DOMAIN_XML.replace(b"/var/lib/libvirt/images/", b"/srv/images/")
    assert rewritten != DOMAIN_XML
    assert call.rc == 0
    assert call.output == rewritten  # the other filter's XML, unchanged by us
    assert (tmp_path / "recorded.xml").read_bytes() == rewritten
    [event] = spool.drain(tmp_path / "spool")  # ours read the rewritten XML and spooled it
    assert (event.domain, event.uuid, event.operation) == ("guest-1", UUID, operation)

    (hooks / "qemu.d" / "vmshare").unlink()
    without_us = run_like_libvirt(hooks, ["guest-1", operation, "begin", "-"], DOMAIN_XML,
                                  _env(tmp_path))
    assert without_us == call  # our hook adds nothing to the chain


def test_our_hook_alone_leaves_xml_unchanged(tmp_path: Path) -> None:
    hooks_dir = tmp_path / "hooks"
    hookinstall.install(hooks_dir, source=HOOK)
    call = run_like_libvirt(hooks_dir, ["guest-1", "migrate", "begin", "-"], DOMAIN_XML,
                            _env(tmp_path))
    assert call == HookCall(0, b"")  # empty output: libvirt keeps the incoming XML


def test_a_failing_neighbour_is_not_masked_by_us(tmp_path: Path, hooks: Path) -> None:
    failing = hooks / "qemu.d" / "10-veto"
    failing.write_text("#!/bin/sh\ncat >/dev/null\nexit 1\n")
    failing.chmod(0o755)
    call = run_like_libvirt(hooks, ["guest-1", "start", "begin", "-"], DOMAIN_XML,
                            _env(tmp_path))
    assert call.rc == -1  # libvirt would refuse the start: the veto is someone else's
    assert len(spool.drain(tmp_path / "spool")) == 1


def test_monolithic_hook_runs_first_and_feeds_the_chain(tmp_path: Path, hooks: Path) -> None:
    main = hooks / "qemu"
    main.write_text("#!/bin/sh\ncase \"$2\" in migrate) exec sed 's#qemu#qemu#' ;; esac\n"
                    "cat >/dev/null\n")
    main.chmod(0o755)
    call = run_like_libvirt(hooks, ["guest-1", "migrate", "begin", "-"], DOMAIN_XML,
                            _env(tmp_path))
    assert call.output == DOMAIN_XML.replace(b"/var/lib/libvirt/images/", b"/srv/images/")
    assert len(spool.drain(tmp_path / "spool")) == 1
