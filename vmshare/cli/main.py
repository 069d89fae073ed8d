"""The `vmshare` command: the global options, the command groups, exit codes.

Modelled on virsh: ``-c/--connect URI`` picks the libvirt connection
(default qemu:///system); ``--qmp SOCKET`` talks to a plain QEMU instead.
A user mistake prints one line ``vmshare: error: ...`` and exits non-zero;
tracebacks appear only with --debug. Each command group lives in its own
module with ``register(sub)``; they are listed in GROUPS, in help order.

Start-up pays only for the command that runs: every module imported here,
and every ``register``, imports nothing heavier than argparse (the parser's
constants that live in heavy packages are copied in ``cli.shown``); each
command imports what it needs when it runs (tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vmshare import __version__
from vmshare.cli import (
    argtypes,
    daemon,
    demo,
    fleet,
    hook,
    ksm,
    metrics,
    place,
    policy,
    predict,
    records,
    sketch,
    tune,
    vms,
)
from vmshare.cli.context import EXIT_INTERNAL, Context
from vmshare.control.lock import DEFAULT_WAIT, control_lock
from vmshare.errors import VmshareError

log = logging.getLogger("vmshare")

#: Commands that change merge state, policy or KSM knobs: one at a time per host.
#: `tune` takes the lock around each step itself (it runs for hours).
ACTS = frozenset({"enable", "disable", "policy set", "ksm start", "ksm stop", "ksm unmerge",
                  "ksm set"})
GROUPS = (vms, ksm, policy, records, demo, hook, predict, sketch, metrics, fleet, place,
          daemon, tune)


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size gives it ($COLUMNS, else
    the size of the terminal on stdout, else 80), without importing shutil."""
    with contextlib.suppress(ValueError):
        if int(os.environ.get("COLUMNS", "0")) > 0:
            return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80   # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's own formatter, its width found without shutil: argparse makes
    one for every option added, and shutil (with bz2 and lzma) cost the
    command's start 4-6 ms."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else _columns() - 2)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help uses _Formatter, as do its subparsers' (they
    are made with the parser's own class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vmshare",
        description="Per-VM KSM control and exact per-VM memory-sharing accounting.")
    p.add_argument("--version", action="version", version=f"vmshare {__version__}")
    p.add_argument("-c", "--connect", metavar="URI", type=argtypes.nonempty("libvirt URI"),
                   help="libvirt connection URI, as in virsh (default, when the option is "
                        "absent: qemu:///system; an empty URI is refused)")
    p.add_argument("--qmp", metavar="SOCKET", type=argtypes.nonempty("QMP socket path"),
                   help="talk to a plain QEMU over its QMP unix socket instead of libvirt")
    p.add_argument("--deadline", type=argtypes.DEADLINE, default=10.0, metavar="SECONDS",
                   help="deadline for every libvirt/QMP call, greater than 0 and at most "
                        f"{argtypes.MAX_SECONDS:g} (default 10)")
    p.add_argument("--lock-wait", type=argtypes.seconds(zero_ok=True), default=DEFAULT_WAIT,
                   metavar="SECONDS",
                   help="how long a command that acts waits for another's to finish "
                        f"(the host's control lock; default {DEFAULT_WAIT:g}, at most "
                        f"{argtypes.MAX_SECONDS:g})")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[Context], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    with escaped_log_records():
        setup_logging(args.debug, args.verbose)
        return run(func, args)


def setup_logging(debug: bool, verbose: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="vmshare: %(levelname)s: %(name)s: %(message)s")
    # qemu.qmp logs its own ERROR lines (a greeting timeout gives two) before
    # vmshare's one-line error says the same thing better: --debug only.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if debug else logging.CRITICAL)


@contextlib.contextmanager
def escaped_log_records() -> Iterator[None]:
    """For the block, every log record made in this process carries its message
    and logger name through ``visible``: domain names and guest text reach log
    lines with their control characters escaped, so they can neither forge a
    line nor drive the terminal.

    A record factory rather than a Formatter, because the daemon installs its
    own handler and formatter (vmshare.daemon.service) and a record passes
    through the factory whichever handler writes it.
    """
    plain = logging.getLogRecordFactory()

    def factory(*a: Any, **k: Any) -> logging.LogRecord:
        # imported at the first record, not at start-up: a command that logs
        # nothing (predict --json) never loads present.text (no vmshare module
        # logs while it is imported, so this import cannot meet itself)
        from vmshare.present.text import visible
        record = plain(*a, **k)
        try:
            message = record.getMessage()
        except Exception:      # a malformed call: let the handler report it as usual
            return record
        record.msg, record.args = visible(message), ()
        record.name = visible(record.name)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(plain)


def acting(args: argparse.Namespace) -> str | None:
    """What the command does to the host, for the control lock's holder line,
    or None when it only reads. A command declares itself with
    ``set_defaults(acts=True)``, or is named in ACTS."""
    words = [args.command, *(getattr(args, k, None) for k in ("ksm_cmd", "policy_cmd"))]
    name = " ".join(w for w in words if w)
    if not (getattr(args, "acts", False) or name in ACTS):
        return None
    domain = getattr(args, "domain", None)
    return f"vmshare {name} {domain}" if isinstance(domain, str) else f"vmshare {name}"


def run(func: Callable[[Context], int], args: argparse.Namespace) -> int:
    """Run one command; every failure is one line on stderr and an exit code.
    A command that acts runs under the host's control lock (vmshare.control.lock)."""
    ctx = Context(args)
    what = acting(args)
    try:
        with (control_lock(what, wait=args.lock_wait) if what else contextlib.nullcontext()):
            return func(ctx)
    except VmshareError as exc:
        from vmshare.present.text import visible
        log.debug("error detail", exc_info=True)
        print(f"vmshare: error: {visible(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vmshare: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:   # a bug: one line, traceback only with --debug
        if args.debug:
            raise
        from vmshare.present.text import visible
        print(f"vmshare: internal error: {type(exc).__name__}: {visible(str(exc))} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        with contextlib.suppress(VmshareError):
            ctx.close()
