"""A real Prometheus (Debian's package) on loopback for the fleet tests: its own
storage directory and config, scraping vmshare exporters every second, with the
shipped recording rules loaded; stopped and its data removed afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "contrib" / "prometheus" / "vmshare-rules.yml"


@dataclass
class Exporter:
    instance: str
    url: str
    proc: subprocess.Popen[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def exporters(scopes: Mapping[str, Sequence[str]], config: Path, env: Mapping[str, str],
              wrap: Mapping[str, Sequence[str]] | None = None) -> Iterator[list[Exporter]]:
    """One `vmshare metrics --listen` per instance name, scoped to its domain globs;
    ``wrap[instance]`` is put before its command (e.g. nsenter into another host)."""
    started: list[Exporter] = []
    try:
        for instance, globs in scopes.items():
            argv = [*(wrap or {}).get(instance, ()), sys.executable, "-m", "vmshare",
                    "metrics", "--listen", "127.0.0.1:0", "--interval", "1", "--cpu-budget", "50",
                    "--config", str(config)]
            for g in globs:
                argv += ["--domain", g]
            proc = subprocess.Popen(argv, cwd=REPO, env=dict(env), stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("serving Prometheus metrics on "):
                stop(proc)
                raise AssertionError(f"exporter {instance} did not start: {line!r}")
            started.append(Exporter(instance, line.split()[4], proc))
        yield started
    finally:
        for e in started:
            stop(e.proc)


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as reply:
            doc = json.load(reply)
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until /-/ready answers 200 (the TSDB is loaded); the process must live."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as reply:
                if reply.status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def wait_for(self, expr: str, want: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Until ``expr`` returns at least ``want`` series."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.query(expr)
            except OSError:
                got = []
            if len(got) >= want:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: {expr!r} gave {got} after {timeout:.0f} s")
            time.sleep(0.5)


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian's package; integration/setup.sh "
                    "installs it)")
    return binary


@contextlib.contextmanager
def run_prometheus(config: Mapping[str, Any], storage: Path,
                   *flags: str) -> Iterator[Prometheus]:
    """Debian's prometheus on a free loopback port with ``config``, its TSDB in
    ``storage`` (a directory the caller owns and removes), yielded once it is
    ready (its blocks loaded); stopped, with its whole process group, after."""
    binary = prometheus_binary()
    port = free_port()
    storage.mkdir(parents=True, exist_ok=True)
    cfg = storage.parent / f"{storage.name}.yml"
    cfg.write_text(json.dumps(config))        # YAML is a superset of JSON
    log = open(storage.parent / f"{storage.name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={storage}",
         f"--web.listen-address=127.0.0.1:{port}", *flags],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc)
    try:
        prom.wait_ready()
        yield prom
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def prometheus(targets: Sequence[Exporter]) -> Iterator[Prometheus]:
    """Scraping ``targets`` every second as job vmshare, the shipped rules loaded."""
    static = [{"targets": [e.url.split("/")[2]], "labels": {"instance": e.instance}}
              for e in targets]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "vmshare", "scrape_timeout": "1s",
                                  "static_configs": static}]}
    with tempfile.TemporaryDirectory(prefix="vmshare-prom-") as tmp, \
            run_prometheus(config, Path(tmp) / "data",
                           "--storage.tsdb.retention.time=1h") as prom:
        prom.wait_for('up{job="vmshare"} == 1', len(targets))
        yield prom
