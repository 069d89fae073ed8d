"""What the placement tests share: the CLI, the exact engine's figures, and a
fleet of two "hosts" (vmshare exporters scoped to their own guests, a real
Prometheus scraping them) with a sketch key and directory of their own."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from integration.prometheus_fixture import Exporter, Prometheus, exporters, prometheus

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmshare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def exact_sharing(names: Sequence[str], env: dict[str, str], *options: str) -> int:
    """pages_sharing by the exact engine (`vmshare predict`) over ``names``."""
    r = cli("predict", "--json", *options, *names, env=env)
    assert r.returncode == 0, r.stderr
    total: int = json.loads(r.stdout)["totals"]["pages_sharing"]
    return total


def exact_extra(hosts: Mapping[str, Sequence[str]], new: str, env: dict[str, str],
                *options: str, dumps: Mapping[str, Path] | None = None
                ) -> tuple[int, dict[str, int]]:
    """The new VM's sharing alone, and per host what taking it adds beyond that
    (each VM read live, or from ``dumps[name]`` when given)."""
    def sources(names: Sequence[str]) -> list[str]:
        if dumps is None:
            return list(names)
        return [arg for name in names for arg in ("--dump", str(dumps[name]))]

    alone = exact_sharing(sources([new]), env, *options)
    return alone, {h: exact_sharing(sources([*names, new]), env, *options)
                   - exact_sharing(sources(names), env, *options) - alone
                   for h, names in hosts.items()}


@contextlib.contextmanager
def placement_fleet(scopes: Mapping[str, Sequence[str]], tmp_path: Path,
                    wrap: Mapping[str, Sequence[str]] | None = None
                    ) -> Iterator[tuple[Prometheus, dict[str, str], Path, list[Exporter]]]:
    """One exporter per host (``scopes``: host -> domain globs; ``wrap``: host ->
    what runs its exporter elsewhere) and Prometheus scraping them; yields
    Prometheus, the CLI's environment (its own config, sketch key and audit
    log), the sketch directory and the exporters."""
    config = tmp_path / "vmshare.toml"
    config.write_text(f'[sketch]\nkey_file = "{tmp_path}/sketch.key"\n'
                      f'dir = "{tmp_path}/sketches"\n')
    key = tmp_path / "sketch.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    env = {**os.environ, "VMSHARE_CONFIG": str(config),
           "VMSHARE_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    with exporters(scopes, config, env, wrap) as running, prometheus(running) as prom:
        prom.wait_for('vmshare_host_memory_available_bytes{job="vmshare"}', len(scopes))
        yield prom, env, tmp_path / "sketches", running
