"""The daemon keeps this host's sketch fresh ([sketch] interval): a real guest
under libvirt, sketched from its live memory by the real daemon; the file
appears, reads back valid and 0600, is refreshed after the interval, and the
VM leaves it when it stops."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import DaemonProc, libvirt_pid, wait_for, write_config
from integration.domains import domain_name
from vmshare.guest import FillSpec
from vmshare.ksm.procfs import ProcFs
from vmshare.prediction.sketch import process_started
from vmshare.records.sketchfile import Sketch, load_key, read_sketch

pytestmark = pytest.mark.integration
INTERVAL = 3.0


def test_the_daemon_keeps_the_host_sketch_fresh(boot_guests: Any, tmp_path: Path) -> None:
    name = domain_name("dsketch")
    (dom,) = boot_guests([name], FillSpec(identical_mib=8, unique_mib=8), memory_mib=128)
    key_file = tmp_path / "sketch.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    key = load_key(key_file)
    cfg = write_config(tmp_path, {name: "on"})
    cfg.write_text(cfg.read_text() + f'[sketch]\nkey_file = "{key_file}"\n'
                   f'dir = "{tmp_path}/sketches"\ninterval = {INTERVAL}\n'
                   "cpu_budget = 100.0\n")
    path = tmp_path / "sketches" / f"{socket.gethostname()}.sketch"
    pid = libvirt_pid(name)

    def with_vm() -> Sketch | None:
        if not path.exists():
            return None
        sk = read_sketch(path, key_id=key.key_id)     # valid, of our key
        return sk if [v.name for v in sk.vms] == [name] else None

    d = DaemonProc(cfg, tmp_path / "daemon.log", domains=(name,))
    try:
        first = wait_for(with_vm, 30, lambda: f"no sketch of {name}:\n{d.text()[-3000:]}")
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(path.parent).st_mode & 0o777 == 0o700
        vm = first.vms[0]
        # its resident RAM was read: at least the 16 MiB the guest filled
        assert vm.pages >= 16 * 256 and vm.values.size > 0 and vm.heavy_values.size > 0
        assert abs(vm.started - process_started(pid, ProcFs())) <= 1
        assert vm.group is not None
        # refreshed: sketched again once the interval has passed
        wait_for(lambda: (s := with_vm()) is not None and s.created >= first.created + INTERVAL,
                 20, lambda: f"not refreshed:\n{d.text()[-3000:]}")
        assert len(re.findall(rf"sketched {name}: ", d.text())) >= 2
        dom.destroy()
        wait_for(lambda: path.exists() and read_sketch(path).vms == (), 20,
                 lambda: f"{name} still in the host sketch:\n{d.text()[-3000:]}")
    finally:
        d.kill(signal.SIGTERM)
    assert d.proc.returncode == 0, d.text()[-3000:]
    for line in re.findall(r"sketched .*per GiB\)", d.text()):
        print(line)
