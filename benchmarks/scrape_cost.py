"""Scrape cost: the exporter's HTTP server (vmshare.daemon.metrics_http, as
`vmshare metrics --listen` and the daemon run it) serving a host of 200 VMs.

The snapshot is built from fakes (tests/fakes/snapshots.py: 200 VMs in trust
groups of 20, each sharing with its 19 peers): a scrape renders the last
snapshot and never measures, so its cost depends on the figures alone. Printed
side by side: rendering the exposition in-process and whole HTTP scrapes
(best and median of --scrapes, one after another), the exposition's size and
series; then 50 scrapes at once while one client holds a connection open
without sending a byte (every answer must be 200 with the whole exposition),
and how long the server keeps that silent client (its per-read timeout).

    .venv/bin/python benchmarks/scrape_cost.py [--vms 200] [--concurrent 50] [--scrapes 50]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import logging
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine
from tests.fakes.snapshots import big_host
from vmshare.daemon.metrics_http import IO_TIMEOUT, MAX_CLIENTS, MetricsServer, serve
from vmshare.present.metrics import Refresher, exposition


def scrape(port: int, timeout: float = 60.0) -> tuple[int, int, float]:
    """(status, body bytes, seconds) of one GET /metrics on a new connection."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        body = reply.read()
        return reply.status, len(body), time.perf_counter() - t0
    finally:
        conn.close()


def silent_client(port: int) -> tuple[socket.socket, list[float]]:
    """A connection that never sends; the list gets the seconds until the server
    closed it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    closed: list[float] = []
    t0 = time.monotonic()

    def watch() -> None:
        with contextlib.suppress(OSError):
            sock.recv(1)
        closed.append(time.monotonic() - t0)

    threading.Thread(target=watch, daemon=True).start()
    return sock, closed


def burst(port: int, n: int) -> list[tuple[int, int, float]]:
    gate = threading.Barrier(n)

    def one(_: int) -> tuple[int, int, float]:
        gate.wait()
        try:
            return scrape(port)
        except OSError as exc:
            print(f"  scrape failed: {exc}")
            return 0, 0, 0.0

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def ms(values: Sequence[float]) -> str:
    return f"best {min(values) * 1e3:7.1f} ms, median {statistics.median(values) * 1e3:7.1f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument("--scrapes", type=int, default=50)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)      # the refusals are counted below, not logged
    print(machine())
    snapshot = big_host(args.vms)
    refresher = Refresher(lambda: snapshot, interval=3600)
    refresher.start()
    renders = [0]

    def collect() -> str:
        renders[0] += 1
        return exposition(refresher.latest())

    server: MetricsServer = serve("127.0.0.1:0", collect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = int(server.server_address[1])
    try:
        text = exposition(refresher.latest())
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        print(f"exporter: {args.vms} VMs, {series:,} series, {len(text):,} bytes a scrape; "
              f"server limits: {MAX_CLIENTS} connections, {IO_TIMEOUT:g} s per read/write")
        render = []
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            exposition(refresher.latest())
            render.append(time.perf_counter() - t0)
        sequential = [scrape(port)[2] for _ in range(args.scrapes)]
        print(f"  rendering in-process: {ms(render)}")
        print(f"  whole HTTP scrape:    {ms(sequential)}  "
              f"({statistics.median(sequential) / statistics.median(render):.2f}x rendering)")
        sock, closed = silent_client(port)
        time.sleep(0.2)
        before, t0 = renders[0], time.perf_counter()
        results = burst(port, args.concurrent)
        wall = time.perf_counter() - t0
        # whole: the size of the exposition, give or take the age figure's digits
        ok = [r for r in results if r[0] == 200 and abs(r[1] - len(text)) < 64]
        statuses = Counter(r[0] for r in results)
        print(f"{args.concurrent} scrapes at once beside a silent client: {len(ok)} whole 200s, "
              f"{len(results) - len(ok)} failed (HTTP status: count {dict(statuses)}); "
              f"all done in {wall:.2f} s; per scrape "
              f"{ms([r[2] for r in ok] or [0.0])}, slowest {max(r[2] for r in results):.2f} s; "
              f"{renders[0] - before} renderings served them")
        deadline = time.monotonic() + 3 * IO_TIMEOUT
        while not closed and time.monotonic() < deadline:
            time.sleep(0.05)
        print("silent client: " + (f"closed by the server after {closed[0]:.1f} s" if closed
                                   else f"STILL OPEN after {3 * IO_TIMEOUT:g} s"))
        sock.close()
        return 0 if len(ok) == len(results) and closed else 1
    finally:
        server.shutdown()
        server.server_close()
        refresher.stop()


if __name__ == "__main__":
    raise SystemExit(main())
