"""The daemon's edge: logging, signals, asyncio.run, exit status.

``vmshare daemon`` runs in the foreground (systemd's Type=simple, or a
supervisor of the operator's choice) and logs to stderr, one line per
record, with the VM's logger name (``vmshare.daemon.vm.NAME``) on each line.
SIGTERM and SIGINT stop it cleanly; SIGHUP is ignored (re-read the config
by restarting it). ``--once`` reconciles every running VM once and exits,
for tests and cron.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from vmshare.config import Config
from vmshare.daemon.runner import Daemon, DaemonOptions
from vmshare.errors import VmshareError
from vmshare.records.schema import printable

log = logging.getLogger("vmshare.daemon")

LOG_FORMAT = "%(asctime)s vmshare[%(process)d]: %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, control characters escaped: a domain name
    with a newline or an escape sequence cannot forge a log line or drive a
    terminal, whichever module logged it. A traceback, appended after the
    message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message, MAX_LOG_MESSAGE)
        return super().formatMessage(record)


MAX_LOG_MESSAGE = 4000


def setup_logging(level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # libvirtaio logs every handle update at DEBUG; keep it out unless asked for.
    logging.getLogger("virEventAsyncIOImpl").setLevel(max(level, logging.INFO))
    # qemu.qmp logs its own ERROR lines before vmshare's one line says the same:
    # only with --debug, as in the CLI
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if level <= logging.DEBUG
                                           else logging.CRITICAL)


async def _main(opts: DaemonOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored; restart the "
                                                            "daemon to re-read its config"))
    daemon = Daemon(opts)
    try:
        return await daemon.run(stop)
    finally:
        log.info("stopped; outcomes: %s", daemon.stats.outcomes or "none")


def run_daemon(config: Config, *, once: bool = False, uri: str | None = None,
               qmp_globs: tuple[str, ...] = (), observe_interval: float = 10.0,
               resync_interval: float = 60.0, deadline: float = 10.0,
               domains: tuple[str, ...] = (), tune: bool | None = None,
               level: int = logging.INFO) -> int:
    """Run the daemon until a signal (or once). Returns the exit status.

    Errors that stop the daemon (config, socket in use, libvirt unreachable
    with --once) are one ERROR line and exit status 1.
    """
    setup_logging(level)
    opts = DaemonOptions(config=config, once=once, uri=uri or "qemu:///system",
                         qmp_globs=qmp_globs, observe_interval=observe_interval,
                         resync_interval=resync_interval, deadline=deadline,
                         domains=domains, tune=tune)
    try:
        return asyncio.run(_main(opts))
    except VmshareError as exc:
        log.error("%s", exc)
        log.debug("detail", exc_info=True)
        return exc.exit_code
