"""The `vmshare` command: the global options, the command groups, exit codes.

Modelled on virsh: ``-c/--connect URI`` picks the libvirt connection
(default qemu:///system); ``--qmp SOCKET`` talks to a plain QEMU instead.
A user mistake prints one line ``vmshare: error: ...`` and exits non-zero;
tracebacks appear only with --debug. Each command group lives in its own
module with ``register(sub)``; they are listed in GROUPS, in help order.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence

from vmshare import __version__
from vmshare.cli import daemon, demo, fleet, hook, ksm, metrics, policy, predict, records, tune, vms
from vmshare.cli.context import EXIT_INTERNAL, Context
from vmshare.errors import VmshareError

log = logging.getLogger("vmshare")

GROUPS = (vms, ksm, policy, records, demo, hook, predict, metrics, fleet, daemon, tune)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmshare",
        description="Per-VM KSM control and exact per-VM memory-sharing accounting.")
    p.add_argument("--version", action="version", version=f"vmshare {__version__}")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt connection URI, as in virsh (default qemu:///system)")
    p.add_argument("--qmp", metavar="SOCKET",
                   help="talk to a plain QEMU over its QMP unix socket instead of libvirt")
    p.add_argument("--deadline", type=float, default=10.0, metavar="SECONDS",
                   help="deadline for every libvirt/QMP call (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="vmshare: %(levelname)s: %(name)s: %(message)s")
    func: Callable[[Context], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    ctx = Context(args)
    try:
        return func(ctx)
    except VmshareError as exc:
        log.debug("error detail", exc_info=True)
        print(f"vmshare: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vmshare: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:   # a bug: one line, traceback only with --debug
        if args.debug:
            raise
        print(f"vmshare: internal error: {type(exc).__name__}: {exc} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        with contextlib.suppress(VmshareError):
            ctx.close()
