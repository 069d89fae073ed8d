"""`vmshare metrics`: Prometheus exposition, printed once, written as a
node_exporter textfile, or served over HTTP (vmshare.daemon.metrics_http) from
snapshots taken in the background (vmshare.present.metrics.Refresher)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmshare.cli import argtypes
from vmshare.cli.shown import METRICS_LISTEN as DEFAULT_LISTEN
from vmshare.errors import UsageError

if TYPE_CHECKING:
    from vmshare.daemon.exporter import SnapshotSource


def _source(ctx: Any) -> SnapshotSource:
    from vmshare.config import load_config
    from vmshare.daemon.exporter import SnapshotSource
    config = load_config(ctx.args.config)
    return SnapshotSource(ctx.hv, ctx.sysfs, ctx.procfs, config, scope=ctx.args.domain)


def check_textfile_dir(directory: Path) -> None:
    """Raises UsageError when ``--textfile`` names no directory."""
    if not directory.is_dir():
        raise UsageError(f"--textfile {directory}: not a directory")


def write_textfile(directory: Path, text: str) -> Path:
    """node_exporter's textfile collector convention: DIR/vmshare.prom written to a
    temporary name in DIR and renamed, so node_exporter never reads half a file.
    Raises UsageError when DIR is not a directory or cannot be written."""
    import tempfile
    check_textfile_dir(directory)
    target = directory / "vmshare.prom"
    if target.exists() and not target.is_file():
        raise UsageError(f"{target} exists and is not a regular file")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".vmshare.prom.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target


def cmd_metrics(ctx: Any) -> int:
    from vmshare.daemon.metrics_http import parse_listen, serve
    from vmshare.present.metrics import Refresher, exposition
    a = ctx.args
    # the user's mistakes first, before libvirt is asked for anything
    if a.listen is not None:
        parse_listen(a.listen)
    if a.textfile is not None:
        check_textfile_dir(Path(a.textfile))
    source = _source(ctx)
    if a.listen is None:
        refresher = Refresher(source)
        refresher.refresh()
        text = exposition(refresher.latest())
        if a.textfile is not None:
            target = write_textfile(Path(a.textfile), text)
            print(f"wrote {target}", flush=True)
        else:
            print(text, end="", flush=True)
        return 0
    refresher = Refresher(source, interval=a.interval, cpu_budget=a.cpu_budget / 100.0)
    refresher.start()
    server = serve(a.listen, lambda: exposition(refresher.latest()))
    print(f"serving Prometheus metrics on {server.url} (figures refreshed every "
          f"{a.interval:g} s within {a.cpu_budget:g}% of a core)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        refresher.stop()
        server.server_close()
    return 0


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "metrics", help="Prometheus metrics: host KSM counters and per-VM figures")
    p.add_argument("--listen", metavar="HOST:PORT", nargs="?", const=DEFAULT_LISTEN,
                   help=f"serve /metrics over HTTP (default {DEFAULT_LISTEN}; [::1]:PORT for "
                        "IPv6; port 0 picks a free one) instead of printing once")
    p.add_argument("--textfile", metavar="DIR",
                   help="write DIR/vmshare.prom atomically (node_exporter's textfile "
                        "collector) instead of printing")
    p.add_argument("--domain", action="append", default=[], metavar="GLOB",
                   help="only domains whose name matches; repeatable (default: all)")
    p.add_argument("--interval", type=argtypes.seconds(), default=30.0, metavar="SECONDS",
                   help="with --listen: how often the figures are collected "
                        "(default %(default)g)")
    p.add_argument("--cpu-budget", type=argtypes.finite_float(0.01, 100.0), default=1.0,
                   metavar="PERCENT", help="with --listen: most of one core the collection "
                   "may use; a slow collection waits longer (default %(default)g)")
    p.add_argument("--config", metavar="PATH",
                   help="host config for each VM's policy and trust group")
    p.set_defaults(func=cmd_metrics)
