"""A real Prometheus (Debian's package) on loopback for the fleet tests: its own
storage directory and config, scraping vmshare exporters every second, with the
shipped recording rules loaded; stopped and its data removed afterwards. Also
a real VictoriaMetrics (Debian's package, unpacked by integration/setup.sh)
scraping the same exporters, for the fleet commands on a second server that
speaks Prometheus's HTTP API."""

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
#: where integration/setup.sh unpacks Debian's victoria-metrics (not installed:
#: the package would add a service, started on :8428 on a systemd host)
VICTORIA = (Path(os.environ.get("VMSHARE_CACHE", "/var/cache/vmshare-test"))
            / "victoria-metrics" / "usr" / "bin" / "victoria-metrics")


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
    """A running server that answers Prometheus's HTTP API (Prometheus itself,
    or VictoriaMetrics)."""

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
        """Until /-/ready answers 200 (the TSDB is loaded); the process must live.
        (VictoriaMetrics answers the same path.)"""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server for {self.url} exited with "
                                     f"{self.proc.returncode}")
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
def _serving(argv: Sequence[str], log_path: Path, url: str) -> Iterator[Prometheus]:
    """Run ``argv`` (a server listening at ``url``) in a session of its own,
    its output in ``log_path``; yielded once ready; stopped, with its whole
    process group, after."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    server = Prometheus(url, proc)
    try:
        try:
            server.wait_ready()
        except AssertionError as exc:     # say why: the server's last words
            tail = log_path.read_text(errors="replace").splitlines()[-10:]
            raise AssertionError("\n".join([str(exc), *tail])) from None
        yield server
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
    with _serving([binary, f"--config.file={cfg}", f"--storage.tsdb.path={storage}",
                   f"--web.listen-address=127.0.0.1:{port}", *flags],
                  storage.parent / f"{storage.name}.log", f"http://127.0.0.1:{port}") as prom:
        yield prom


def _scrape_config(targets: Sequence[Exporter]) -> dict[str, Any]:
    """Every target every second as job vmshare, its instance label its host name."""
    static = [{"targets": [e.url.split("/")[2]], "labels": {"instance": e.instance}}
              for e in targets]
    return {"global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "vmshare", "scrape_timeout": "1s",
                                "static_configs": static}]}


@contextlib.contextmanager
def prometheus(targets: Sequence[Exporter]) -> Iterator[Prometheus]:
    """Scraping ``targets`` every second as job vmshare, the shipped rules loaded."""
    config = _scrape_config(targets)
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(RULES)]
    with tempfile.TemporaryDirectory(prefix="vmshare-prom-") as tmp, \
            run_prometheus(config, Path(tmp) / "data",
                           "--storage.tsdb.retention.time=1h") as prom:
        prom.wait_for('up{job="vmshare"} == 1', len(targets))
        yield prom


def victoria_binary() -> str:
    binary = shutil.which("victoria-metrics")
    if binary is not None:
        return binary
    if not VICTORIA.is_file():
        pytest.skip(f"victoria-metrics is not unpacked in {VICTORIA.parents[2]} "
                    "(Debian's package; integration/setup.sh unpacks it)")
    return str(VICTORIA)


@contextlib.contextmanager
def victoria(targets: Sequence[Exporter]) -> Iterator[Prometheus]:
    """Debian's VictoriaMetrics (single node) on a free loopback port, scraping
    ``targets`` as ``prometheus`` does (its own scraper, the same config; no
    recording rules: vmalert would evaluate those). Its newest samples are
    queryable after 1 s (-search.latencyOffset; by default VictoriaMetrics
    hides the last 30 s)."""
    binary = victoria_binary()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vmshare-victoria-") as tmp:
        cfg = Path(tmp) / "scrape.yml"
        cfg.write_text(json.dumps(_scrape_config(targets)))
        with _serving([binary, f"-storageDataPath={tmp}/data",
                       f"-httpListenAddr=127.0.0.1:{port}", f"-promscrape.config={cfg}",
                       "-search.latencyOffset=1s", "-retentionPeriod=1d",
                       "-loggerLevel=ERROR"],
                      Path(tmp) / "victoria.log", f"http://127.0.0.1:{port}") as server:
            server.wait_for('up{job="vmshare"} == 1', len(targets))
            yield server
