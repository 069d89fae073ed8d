"""Measure the qemu hook's wall time the way libvirtd sees it.

Runs hooks/vmshare-qemu-hook N times (default 20) with libvirt's stripped
environment, a domain XML on stdin and stdout captured, against a temporary
spool, with and without a daemon socket bound, and prints the median and the
slowest run next to a bare ``python3 -IS -c pass`` for scale.

    .venv/bin/python hooks/measure_hook_time.py [runs]
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOOK = Path(__file__).resolve().parent / "vmshare-qemu-hook"
XML = (b"<domain type='qemu'><name>bench</name>"
       b"<uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid><devices/></domain>\n")


def timed(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run(argv, input=XML, env=env, capture_output=True, check=True, timeout=5)
        times.append(time.monotonic() - t0)
    return times


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import machine
    print(machine())
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory() as tmp:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LC_ALL": "C", "HOME": "/", "VMSHARE_SPOOL_DIR": f"{tmp}/spool",
               "VMSHARE_SOCKET": f"{tmp}/wakeup.sock", "VMSHARE_HOOK_CONF": "/nonexistent"}
        argv = [str(HOOK), "bench", "start", "begin", "-"]
        bare = timed(["/usr/bin/python3", "-IS", "-c", "pass"], env, runs)
        no_daemon = timed(argv, env, runs)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(f"{tmp}/wakeup.sock")
        with_daemon = timed(argv, env, runs)
        sock.close()
    for label, times in (("python3 -IS -c pass", bare), ("hook, daemon down", no_daemon),
                         ("hook, daemon listening", with_daemon)):
        print(f"{label:24} median {statistics.median(times) * 1000:6.1f} ms   "
              f"max {max(times) * 1000:6.1f} ms   ({runs} runs)")


if __name__ == "__main__":
    main()
