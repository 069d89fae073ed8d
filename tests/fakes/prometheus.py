"""A scripted Prometheus HTTP API: a Transport for PromClient (no network) and a
tiny loopback HTTP server speaking the same canned answers (for CLI tests)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vmshare.promapi.client import Transport

Answer = Callable[[str, dict[str, str]], tuple[int, str, bytes]]


def vector(*series: tuple[dict[str, str], float | str], at: float = 1000.0) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": m, "value": [at, str(v)]} for m, v in series]}}).encode()


def matrix(*series: tuple[dict[str, str], list[tuple[float, float]]]) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": m, "values": [[t, str(v)] for t, v in pts]} for m, pts in series]}}).encode()


class ScriptedPrometheus:
    """Answers by the first rule whose key is a substring of the PromQL asked."""

    def __init__(self, rules: dict[str, bytes], default: bytes | None = None) -> None:
        self.rules = rules
        self.default = default if default is not None else vector()
        self.asked: list[dict[str, str]] = []

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, str, bytes]:
        self.asked.append({"path": path, **params})
        query = params.get("query", "")
        for key, body in self.rules.items():
            if key in query:
                return 200, "application/json", body
        return 200, "application/json", self.default


class FakeTransport:
    """PromClient's seam, answered by a function of (path, params)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.urls: list[str] = []

    def get(self, url: str, timeout: float) -> tuple[int, str, bytes]:
        self.urls.append(url)
        parts = urllib.parse.urlsplit(url)
        return self.answer(parts.path, dict(urllib.parse.parse_qsl(parts.query)))


_typed: Transport = FakeTransport(lambda p, q: (200, "", b""))


@contextmanager
def serve(answer: Answer) -> Iterator[str]:
    """A loopback HTTP server answering with ``answer``; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            status, ctype, body = answer(parts.path, dict(urllib.parse.parse_qsl(parts.query)))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
