"""`vmshare metrics`: Prometheus exposition, printed once or served over HTTP."""

from __future__ import annotations

import argparse
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from vmshare.errors import UsageError, VmshareError
from vmshare.present.metrics import CONTENT_TYPE, exposition
from vmshare.tuner.loop import tuner_holder

log = logging.getLogger("vmshare.present.metrics")
DEFAULT_LISTEN = "127.0.0.1:9731"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen wants HOST:PORT (e.g. {DEFAULT_LISTEN}), not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def cmd_metrics(ctx: Any) -> int:
    if ctx.args.listen is None:
        print(exposition(ctx.observer().host(), tuner_holder()), end="", flush=True)
        return 0
    host, port = parse_listen(ctx.args.listen)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served")
                return
            try:
                with lock:      # one collection at a time: the adapters are not re-entrant
                    body = exposition(ctx.observer().host(), tuner_holder()).encode()
            except VmshareError as exc:
                log.warning("collection failed: %s", exc)
                self.send_error(500, str(exc).splitlines()[0][:200])
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    try:
        server = HTTPServer((host, port), Handler)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    print(f"serving Prometheus metrics on http://{host}:{port}/metrics", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "metrics", help="Prometheus metrics: host KSM counters and per-VM figures")
    p.add_argument("--listen", metavar="HOST:PORT", nargs="?", const=DEFAULT_LISTEN,
                   help=f"serve /metrics over HTTP (default {DEFAULT_LISTEN}) instead of "
                        "printing once")
    p.set_defaults(func=cmd_metrics)
