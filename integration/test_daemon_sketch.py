"""The daemon keeps this host's sketch fresh ([sketch] interval): a real guest
under libvirt, sketched from its live memory by the real daemon; the file
appears, reads back valid and 0600, is served at /sketch ([sketch] listen) to
a request with the token only, and `place --sketches http://...` reads it; it
is refreshed after the interval, and the VM leaves it when it stops."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import urllib.error
import urllib.request
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from integration.daemon_helpers import DaemonProc, libvirt_pid, wait_for, write_config
from integration.domains import domain_name
from tests.fakes.prometheus import serve, vector
from vmshare.cli.main import main
from vmshare.fleet.sketch_fetch import SketchFetcher
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
    token_file = tmp_path / "sketch.token"
    token_file.write_text(os.urandom(24).hex())
    token_file.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.write_text(cfg.read_text() + f'[sketch]\nkey_file = "{key_file}"\n'
                   f'dir = "{tmp_path}/sketches"\ninterval = {INTERVAL}\n'
                   f'cpu_budget = 100.0\nlisten = "127.0.0.1:{port}"\n'
                   f'token_file = "{token_file}"\n')
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
        served_to_place(f"http://127.0.0.1:{port}/sketch", token_file, key_file, name)
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
    assert token_file.read_text() not in d.text()
    for line in re.findall(r"sketched .*per GiB\)", d.text()):
        print(line)


def served_to_place(url: str, token_file: Path, key_file: Path, name: str) -> None:
    """The daemon's /sketch: refused without the token, and `vmshare place
    --sketches URL` reads it with the token (JSON: this host, its VM)."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    host = socket.gethostname()
    answer = vector(({"instance": f"{host}:9100"}, 8e9))
    with serve(lambda path, params: (200, "application/json", answer)) as prom, \
            redirect_stdout(io.StringIO()) as out:
        code = main(["place", "--rebalance", "--prometheus", prom, "--sketches", url,
                     "--sketch-token-file", str(token_file), "--key-file", str(key_file),
                     "--json"])
    assert code == 0
    assert json.loads(out.getvalue()) == {"hosts": 1, "interval": 0.95, "moves": []}
    fetched = SketchFetcher(token_file.read_bytes().strip()).fetch(url)
    assert fetched.host == host and [v.name for v in fetched.vms] == [name]
