"""The daemon's sketch endpoint (``[sketch] listen``, off by default): this
host's sketch file (``HOST.sketch`` in ``[sketch] dir``, the one the sketcher
keeps fresh) at ``/sketch``, for `vmshare place --sketches URL` on another host.

A sketch tells which VMs hold equal content, so the endpoint is off unless
``listen`` is set, and then every request must carry the token of
``[sketch] token_file`` as ``Authorization: Bearer TOKEN``. The token is
checked before anything else (a request without it learns nothing, not even
whether a path exists) and compared in constant time (hmac.compare_digest);
a refusal is answered 401 and logged without the token, at most one line a
minute with the count since. The token file is looked at (one lstat) on every
request and read again when it changed, so a rotated token applies from the
next request, with no restart, and the old one is refused from then on; a
file that becomes unusable (gone, readable by others, too short) refuses
every request until it is mended (logged once per change). The server is
metrics_http's bounded one (a connection cap, a timeout on every read and
write, a deadline for the request), on a listener of its own so it can be
firewalled apart from /metrics. The file is sent from an open descriptor: a
rewrite meanwhile (an atomic rename) never mixes two versions. Plain HTTP:
put TLS in front (a reverse proxy) when the network between hosts is not
trusted.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from vmshare.config import Config
from vmshare.daemon.metrics_http import BoundedServer, parse_listen
from vmshare.daemon.sketcher import SketcherSeat, run_sketcher
from vmshare.errors import PolicyError, SketchError, UsageError
from vmshare.records.sketchfile import load_token

log = logging.getLogger("vmshare.daemon.sketch_http")
MAX_CLIENTS = 16            # placement reads each host once; a few at a time
REFUSALS_EVERY = 60.0       # seconds between log lines about refused requests
CHUNK = 1 << 20
_DENIED = b"a valid bearer token is required\n"


class TokenFile:
    """The endpoint's token, read again when its file changes (``current``).

    ``load`` reads it first; raises SketchError as ``load_token`` does."""

    def __init__(self, path: Path, token: bytes | None, stamp: tuple[int, ...] | None) -> None:
        self.path = path
        self.token = token
        self.stamp = stamp
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: Path) -> TokenFile:
        stamp = _stamp(path)              # before the read: a change meanwhile is seen later
        return cls(path, load_token(path), stamp)

    def current(self) -> bytes | None:
        """The token now (None: the file is unusable, every request refused)."""
        stamp = _stamp(self.path)
        with self.lock:
            if stamp == self.stamp:
                return self.token
            self.stamp = stamp
            try:
                self.token = load_token(self.path)
            except SketchError as exc:
                self.token = None
                log.error("%s; the sketch endpoint refuses every request until it is mended",
                          exc)
            else:
                log.info("sketch endpoint: %s changed; its token applies from now", self.path)
            return self.token


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What changes when the file is rewritten, replaced or chmod'ed (None: gone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
            st.st_uid)


class SketchServer(BoundedServer):
    """Serves ``path`` at /sketch to requests bearing the token of ``tokens``."""

    served_path = "/sketch"

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, path: Path,
                 tokens: TokenFile, **bounds: Any) -> None:
        self.sketch_path = path
        self.tokens = tokens
        self.refused = 0                     # since the last log line about them
        self.refused_logged = float("-inf")
        self.refused_lock = threading.Lock()
        bounds.setdefault("max_clients", MAX_CLIENTS)
        super().__init__(address, family, _sketch_handler, **bounds)

    def authorized(self, header: str | None) -> bool:
        """Whether ``header`` is ``Bearer <the token>`` (constant-time compare)."""
        token = self.tokens.current()
        if token is None:
            return False
        scheme, _, given = (header or "").strip().partition(" ")
        match = hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)
        return match and scheme.lower() == "bearer"

    def note_refusal(self, client: str, why: str) -> None:
        with self.refused_lock:
            self.refused += 1
            now = time.monotonic()
            if now - self.refused_logged < REFUSALS_EVERY:
                return
            count, self.refused, self.refused_logged = self.refused, 0, now
        log.warning("%s: sketch request refused (%s); %d refused since the last such line",
                    client, why, count)


def _sketch_handler(server: SketchServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = server.io_timeout          # per read/write: StreamRequestHandler.setup

        def do_GET(self) -> None:
            server.request_done(self.connection)
            header = self.headers.get("Authorization")
            if not server.authorized(header):
                server.note_refusal(self.client_address[0],
                                    "no token" if header is None else "wrong token")
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="vmshare-sketch"')
                self._body(_DENIED, "text/plain")
                return
            if self.path.split("?", 1)[0] != server.served_path:
                self.send_error(404, None, f"only {server.served_path} is served")
                return
            try:
                fd = os.open(server.sketch_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                self.send_error(503, None, "no host sketch yet")
                return
            except OSError as exc:
                log.error("cannot read %s to serve it: %s", server.sketch_path, exc.strerror)
                self.send_error(500, None, "the host sketch cannot be read; see the log")
                return
            with open(fd, "rb") as f:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
                self.end_headers()
                try:
                    shutil.copyfileobj(f, self.wfile, CHUNK)
                except OSError as exc:     # the client went away or stalled
                    log.debug("%s: sketch not sent whole: %s", self.client_address[0], exc)

        def _body(self, body: bytes, ctype: str) -> None:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def host_sketch_path(config: Config) -> Path:
    """The file the sketcher writes and the endpoint serves."""
    return config.sketch.dir / f"{socket.gethostname()}.sketch"


def endpoint_token(config: Config) -> bytes | None:
    """The endpoint's token when ``[sketch] listen`` is set (None: off), its
    address checked too. Raises PolicyError naming the setting."""
    settings = config.sketch
    if not settings.listen:
        return None
    where = f"{config.path or 'config'}: [sketch]"
    try:
        parse_listen(settings.listen)
    except UsageError as exc:
        raise PolicyError(f"{where} listen: {exc}") from exc
    try:
        return load_token(settings.token_file)
    except SketchError as exc:
        raise PolicyError(f"{where} token_file: {exc}") from exc


def serve_sketch(listen: str, path: Path, token_file: Path, **bounds: Any) -> SketchServer:
    """A SketchServer bound to ``listen``, its token from ``token_file``. Raises
    UsageError (bad value, cannot bind), SketchError (the token file)."""
    host, port, family = parse_listen(listen)
    tokens = TokenFile.load(token_file)
    try:
        return SketchServer((host, port), family, path, tokens, **bounds)
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc


async def run_sketch_server(config: Config, stop: asyncio.Event) -> None:
    """Serve this host's sketch until ``stop``. Raises PolicyError (token) and
    UsageError (address) for the supervisor to log."""
    if endpoint_token(config) is None:
        return
    try:
        server = serve_sketch(config.sketch.listen, host_sketch_path(config),
                              config.sketch.token_file)
    except SketchError as exc:        # the file changed since endpoint_token read it
        raise PolicyError(f"{config.path or 'config'}: [sketch] token_file: {exc}") from exc
    thread = threading.Thread(target=server.serve_forever, name="vmshare-sketch-http",
                              daemon=True)
    thread.start()
    log.info("serving %s on %s to requests with the token of %s (read again when it "
             "changes)", server.sketch_path, server.url, config.sketch.token_file)
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(server.shutdown)
        server.server_close()


def sketch_jobs(seat: SketcherSeat, stop: asyncio.Event
                ) -> dict[str, Callable[[], Awaitable[None]]]:
    """The daemon's background tasks for sketches, as its settings ask."""
    config = seat.opts.config
    jobs: dict[str, Callable[[], Awaitable[None]]] = {}
    if config.sketch.interval > 0:
        jobs["sketcher"] = lambda: run_sketcher(seat, stop)
    if config.sketch.listen:
        jobs["sketch-http"] = lambda: run_sketch_server(config, stop)
    return jobs
