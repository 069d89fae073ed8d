"""The metrics HTTP server: `vmshare metrics --listen` and the daemon's exporter.

The server is the standard library's threaded HTTP server with every wait
bounded, so one client can never hold up the others: a thread per
connection, at most MAX_CLIENTS connections at once (the next is answered
503 and closed), each socket read or write limited to IO_TIMEOUT seconds, the
whole request (line and headers) to REQUEST_DEADLINE, and one rendering at a
time, shared: a scrape that waited while another rendered takes that body when
the rendering began after the scrape arrived (it is then as fresh as one of its
own), so a burst of scrapes costs a rendering or two, not one each.
prometheus_client's own ``start_http_server`` is not used: its server
starts an unbounded thread per connection with no socket timeout, so one
silent client per thread could pile up without end. What is served is
prometheus_client's exposition of vmshare's Collector (vmshare.present.metrics).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vmshare.errors import UsageError, VmshareError
from vmshare.present.metrics import CONTENT_TYPE

log = logging.getLogger("vmshare.present.metrics")
DEFAULT_LISTEN = "127.0.0.1:9731"
# connections served at once: Prometheus needs one or two, an HA pair and a
# federation a few more; the bar is 50 scrapes at once beside a stuck client
MAX_CLIENTS = 64
IO_TIMEOUT = 5.0            # seconds any one read or write of a connection may take
REQUEST_DEADLINE = 10.0     # seconds from accept to a complete request line and headers
COLLECT_WAIT = 30.0         # seconds a scrape waits for another's collection, then 503
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Connection: close\r\nContent-Length: 24\r\n\r\ntoo many open scrapes\r\n\r\n")


def parse_listen(text: str) -> tuple[str, int, socket.AddressFamily]:
    """HOST:PORT, [IPV6]:PORT or :PORT (127.0.0.1) into a host, port and
    address family; port 0 picks a free port.

    Raises UsageError naming the value when it is malformed, an IPv6 address
    is not in brackets, or the host does not resolve.
    """
    want = f"--listen wants HOST:PORT or [IPV6]:PORT (e.g. {DEFAULT_LISTEN} or [::1]:9731)"
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise UsageError(f"{want}, not {text!r}")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or ":" not in host:
            raise UsageError(f"{want}: brackets are only for an IPv6 address, not {text!r}")
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{want}: put an IPv6 address in brackets, not {text!r}")
    host = host or "127.0.0.1"
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"--listen {text!r}: cannot resolve {host!r}: {exc}") from exc
    family, _, _, _, address = info[0]
    return str(address[0]), int(port), socket.AddressFamily(family)


class BoundedServer(ThreadingHTTPServer):
    """A threaded HTTP server whose connections are counted and timed; what it
    serves is its handler's (``handler(server)`` makes the handler class).

    ``service_actions`` (run by ``serve_forever`` every poll interval) shuts
    the socket of any connection still without a whole request after
    REQUEST_DEADLINE, so a client that trickles a header a second is cut off
    too, not only one that says nothing.
    """

    daemon_threads = True       # an exit never waits for a stuck client
    # The listen backlog: socketserver's 5 drops the SYNs of a burst of scrapes,
    # which then wait a second for the client's retransmit.
    request_queue_size = 128
    block_on_close = False
    served_path = "/"

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 handler: Callable[[Any], type[BaseHTTPRequestHandler]], *,
                 max_clients: int = MAX_CLIENTS, io_timeout: float = IO_TIMEOUT,
                 request_deadline: float = REQUEST_DEADLINE) -> None:
        self.address_family = family
        self.max_clients = max_clients
        self.io_timeout = io_timeout
        self.request_deadline = request_deadline
        self._slots = threading.BoundedSemaphore(max_clients)
        self._pending: dict[socket.socket, float] = {}
        self._pending_lock = threading.Lock()
        super().__init__(address, handler(self))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}{self.served_path}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("%s: refused, %d scrapes already open", client_address[0],
                        self.max_clients)
            with contextlib.suppress(OSError):
                request.settimeout(0.2)
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        with self._pending_lock:
            self._pending[request] = time.monotonic() + self.request_deadline
        try:
            super().process_request(request, client_address)
        except Exception:
            self.request_done(request)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.request_done(request)
            self._slots.release()

    def request_done(self, request: socket.socket) -> None:
        """The request is read (or abandoned): its deadline no longer applies."""
        with self._pending_lock:
            self._pending.pop(request, None)

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._pending_lock:
            late = [s for s, deadline in self._pending.items() if deadline < now]
            for s in late:
                del self._pending[s]
        for s in late:
            log.debug("closing a connection that sent no whole request in %gs",
                      self.request_deadline)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)   # its thread's read returns at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A bug in a handler thread: one line, never a traceback on the terminal.
        log.error("%s: internal error while serving %s", client_address[0], self.served_path)
        log.debug("detail", exc_info=True)


class MetricsServer(BoundedServer):
    """The bounded server answering /metrics with ``collect()``'s text."""

    served_path = "/metrics"

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 collect: Callable[[], str], **bounds: Any) -> None:
        self.collect = collect
        self.collect_lock = threading.Lock()  # the adapters are not re-entrant
        # the last body and when its rendering began (monotonic); under collect_lock
        self.last_body: tuple[bytes, float] | None = None
        super().__init__(address, family, _handler_class, **bounds)


def _handler_class(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = server.io_timeout          # per read/write: StreamRequestHandler.setup

        def do_GET(self) -> None:
            server.request_done(self.connection)
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, None, "only /metrics is served")
                return
            try:
                body = self._collect()
            except VmshareError as exc:
                log.warning("collection failed: %s", exc)
                # explain= goes to the escaped HTML body; the status line keeps
                # its fixed reason, so no text of ours can reach a header.
                self.send_error(500, None, (str(exc).splitlines() or [""])[0][:200])
                return
            except Exception as exc:
                log.error("collection failed: %s: %s", type(exc).__name__, exc)
                log.debug("detail", exc_info=True)
                self.send_error(500, None, "internal error; see the vmshare log")
                return
            if body is None:
                self.send_error(503, None, "a previous collection is still running")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _collect(self) -> bytes | None:
            asked = time.monotonic()
            if not server.collect_lock.acquire(timeout=COLLECT_WAIT):
                return None
            try:
                if server.last_body is not None and server.last_body[1] >= asked:
                    return server.last_body[0]     # rendered since this scrape arrived
                began = time.monotonic()
                body = server.collect().encode()
                server.last_body = (body, began)
                return body
            finally:
                server.collect_lock.release()

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def serve(listen: str, collect: Callable[[], str]) -> MetricsServer:
    """A MetricsServer bound to ``listen`` (see parse_listen). Raises
    UsageError for a bad value or an address that cannot be bound."""
    host, port, family = parse_listen(listen)
    try:
        return MetricsServer((host, port), family, collect)
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc


