"""The daemon's edge: logging, signals, asyncio.run, exit status.

``vmshare daemon`` runs in the foreground (systemd's Type=notify, or a
supervisor of the operator's choice) and logs to stderr, one line per
record, with the VM's logger name (``vmshare.daemon.vm.NAME``) on each line.
Under systemd (``$NOTIFY_SOCKET``) it sends READY=1 once it serves, STATUS=
lines, WATCHDOG=1 while its loop and worker live (vmshare.daemon.liveness)
and STOPPING=1 as it stops. SIGTERM and SIGINT stop it cleanly; SIGHUP is
ignored (re-read the config by restarting it), so it never sends
RELOADING=1. ``--once`` reconciles every running VM once and exits, for
tests and cron.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys

from vmshare.config import Config
from vmshare.daemon.liveness import keep_alive
from vmshare.daemon.notify import Notifier
from vmshare.daemon.runner import Daemon, DaemonOptions
from vmshare.daemon.sketch_http import endpoint_token
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
    notifier = Notifier.from_env()
    daemon = Daemon(opts)
    stopping: list[str] = []

    def stop_for(why: str) -> None:
        if not stopping:       # STOPPING=1 once, as soon as the daemon knows
            stopping.append(why)
            notifier.stopping(f"stopping: {why}")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_for, signal.Signals(sig).name)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored; restart the "
                                                            "daemon to re-read its config"))
    daemon.live.on_ready = lambda: _ready(notifier, daemon)
    alive = asyncio.ensure_future(_keep_alive(notifier, daemon, stop))
    try:
        return await daemon.run(stop)
    finally:
        stop_for(f"the {daemon.supervisor.failed} task kept dying" if daemon.supervisor.failed
                 else "exiting")
        alive.cancel()
        await asyncio.gather(alive, return_exceptions=True)
        notifier.close()
        log.info("stopped; outcomes: %s", daemon.stats.outcomes or "none")


def _ready(notifier: Notifier, daemon: Daemon) -> None:
    daemon.live.status_sent = daemon_status(daemon)
    notifier.ready(daemon.live.status_sent)


async def _keep_alive(notifier: Notifier, daemon: Daemon, stop: asyncio.Event) -> None:
    try:
        await keep_alive(notifier, daemon.live, lambda: daemon_status(daemon), stop)
    except Exception:   # a bug: no more pings, so systemd's watchdog restarts the daemon
        log.exception("the watchdog task died; systemd restarts the daemon when the "
                      "watchdog timeout passes")


def _traceback_on_abort() -> None:
    """SIGABRT (systemd's WatchdogSignal= default) prints every thread's Python
    traceback to stderr before the process dies, so the journal shows where a
    stuck step was stuck. Left alone when something (pytest) already set it up."""
    if faulthandler.is_enabled():
        return
    with contextlib.suppress(AttributeError, ValueError, OSError):   # no real stderr fd
        faulthandler.enable(sys.stderr, all_threads=True)


def run_daemon(config: Config, *, once: bool = False, uri: str | None = None,
               qmp_globs: tuple[str, ...] = (), observe_interval: float = 10.0,
               resync_interval: float = 60.0, deadline: float = 10.0,
               domains: tuple[str, ...] = (), tune: bool | None = None,
               level: int = logging.INFO) -> int:
    """Run the daemon until a signal (or once). Returns the exit status.

    Errors that stop the daemon (config, e.g. ``[sketch] listen`` without a
    private token file; socket in use, libvirt unreachable
    with --once) are one ERROR line and exit status 1.
    """
    setup_logging(level)
    _traceback_on_abort()
    opts = DaemonOptions(config=config, once=once, uri=uri or "qemu:///system",
                         qmp_globs=qmp_globs, observe_interval=observe_interval,
                         resync_interval=resync_interval, deadline=deadline,
                         domains=domains, tune=tune)
    try:
        endpoint_token(config)      # a bad [sketch] listen or token stops the start
        return asyncio.run(_main(opts))
    except VmshareError as exc:
        log.error("%s", exc)
        log.debug("detail", exc_info=True)
        return exc.exit_code


def daemon_status(daemon: Daemon) -> str:
    """The STATUS= line: "watching 3 domains, last reconcile 12:01:05 (0 changed),
    ksm run=1", or what the daemon waits for."""
    if not daemon.connected.is_set():
        target = ", ".join(daemon.qmp_globs) or daemon.opts.uri
        return f"connection to {target} lost; reconnecting" if daemon.live.ready \
            else f"starting: connecting to {target}"
    try:
        run: object = daemon.rc.sysfs.read_knob("run")
    except (VmshareError, OSError):
        run = "?"
    return f"{daemon.live.summary()}, ksm run={run}"
