"""systemd's notify protocol (sd_notify(3)), spoken directly: no libsystemd binding.

A message is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX
SOCK_DGRAM socket named by ``$NOTIFY_SOCKET``: a path, or an abstract
address written with a leading ``@``. Without ``$NOTIFY_SOCKET`` (not under
systemd, or ``Type=simple``) every call is a no-op. ``$WATCHDOG_USEC`` asks
for ``WATCHDOG=1`` at least that often, and ``$WATCHDOG_PID``, when set,
names the one process it asks it of.

Sending never raises and never blocks the event loop (MSG_DONTWAIT): a
manager that is gone or slow costs one WARNING line per run of failures, not
the daemon. The three variables are taken out of the environment when read,
as sd_notify's ``unset_environment`` does, so nothing the daemon starts
speaks for it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("vmshare.daemon.notify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
MAX_STATUS = 400          # characters of STATUS=; systemctl shows one line


def parse_address(value: str) -> str | bytes | None:
    """The socket address of a ``$NOTIFY_SOCKET`` value: a filesystem path as
    given, an ``@name`` as the abstract address ``b"\\0name"``; None for forms
    this does not speak (``vsock:``, relative paths, empty)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def watchdog_seconds(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog timeout systemd asks of process ``pid``, in seconds, or None
    (no watchdog, another process's, or a value that is not a positive integer)."""
    usec = env.get(WATCHDOG_USEC)
    if usec is None:
        return None
    owner = env.get(WATCHDOG_PID)
    if owner is not None and owner.strip() != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", WATCHDOG_USEC, usec)
        return None
    if value <= 0:
        log.warning("ignoring %s=%r: not positive", WATCHDOG_USEC, usec)
        return None
    return value / 1e6


class Notifier:
    """Sends notify messages to one address; ``watchdog`` is the timeout in
    seconds systemd enforces (None: no watchdog). A Notifier without an
    address is silent."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address is not None else None
        self.sent = 0
        self._failing = False
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None,
                 pid: int | None = None) -> Notifier:
        """The notifier the environment asks for (os.environ by default); takes
        the three variables out of ``env``."""
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        raw = env.pop(NOTIFY_SOCKET, None)
        watchdog = watchdog_seconds(env, pid)
        env.pop(WATCHDOG_USEC, None)
        env.pop(WATCHDOG_PID, None)
        if raw is None:
            return cls(None)
        address = parse_address(raw)
        if address is None:
            log.warning("ignoring %s=%r: neither a path nor an @abstract address; no "
                        "readiness or watchdog messages will be sent", NOTIFY_SOCKET, raw)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=VALUE`` each) as one message. True when the
        kernel took it; False when silent or it failed (logged once per run of
        failures, at DEBUG after that). Never raises."""
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "cannot notify the service manager at %s (%s); the daemon "
                    "keeps running, later failures are logged at DEBUG",
                    _shown(self.address), exc.strerror or exc)
            self._failing = True
            return False
        if self._failing:
            log.info("notifying the service manager at %s again", _shown(self.address))
        self._failing = False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", status_field(status))

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", status_field(status))

    def status(self, status: str) -> bool:
        return self.send(status_field(status))

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_field(text: str) -> str:
    """``STATUS=text`` on one line: a newline would end the field and start a
    forged one (a domain name can hold one)."""
    flat = "".join(c if c.isprintable() else " " for c in text)
    return "STATUS=" + flat[:MAX_STATUS]


def _shown(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) \
        else address
