"""The `vmshare` command's start-up: whole commands in fresh processes (N runs
each, the first thrown away), and `-X importtime`'s figure for vmshare.cli.main.

  .venv/bin/python benchmarks/cli_startup.py [--runs N] [--against TREE]

``--against TREE`` times another checkout of vmshare side by side (run by run,
interleaved; its C extensions must be built), e.g. the commit before a change:

  git worktree add --detach /tmp/base COMMIT && cp vmshare/engine/*.so \
      /tmp/base/vmshare/engine/ && cp vmshare/sources/*.so /tmp/base/vmshare/sources/

Touches no KSM knob and no guest: no lock needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine

IMAGE_MIB = 8


def commands(image: Path) -> list[list[str]]:
    return [["--version"], ["predict", "--help"], ["predict", "--raw", str(image), "--json"]]


def once(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vmshare", *argv], stdout=subprocess.DEVNULL,
                   env=env, check=True, cwd=tempfile.gettempdir())
    return time.perf_counter() - t


def import_ms(env: dict[str, str]) -> float:
    """vmshare.cli.main's cumulative import time, as -X importtime reports it."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "vmshare", "--version"],
                         capture_output=True, text=True, env=env, check=True,
                         cwd=tempfile.gettempdir()).stderr
    line = next(ln for ln in err.splitlines() if ln.rstrip().endswith("| vmshare.cli.main"))
    return int(line.split("|")[1]) / 1000


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--against", type=Path, help="another vmshare tree to time beside this one")
    a = ap.parse_args(argv)
    trees = {"this tree": dict(os.environ)}
    if a.against:
        trees[str(a.against)] = dict(os.environ, PYTHONPATH=str(a.against.resolve()))
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "ram.raw"
        image.write_bytes(os.urandom(IMAGE_MIB << 20))
        for argv_ in commands(image):
            times: dict[str, list[float]] = {k: [] for k in trees}
            for i in range(a.runs + 1):
                for name, env in trees.items():
                    t = once(argv_, env)
                    if i:
                        times[name].append(t)
            shown = " ".join(x if x != str(image) else f"<{IMAGE_MIB} MiB raw>" for x in argv_)
            cells = "  ".join(f"{k}: median {statistics.median(v) * 1000:.0f} ms "
                              f"(min {min(v) * 1000:.0f})" for k, v in times.items())
            print(f"vmshare {shown:<32} {cells}")
    imports = {k: min(import_ms(env) for _ in range(3)) for k, env in trees.items()}
    print("summary: vmshare.cli.main imports in " + ", ".join(
        f"{v:.0f} ms ({k})" for k, v in imports.items()) + f"; {a.runs} runs per command")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
