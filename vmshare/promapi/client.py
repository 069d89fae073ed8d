"""A small, strict client of the Prometheus HTTP API (v1): instant and range queries.

Only GET requests, each with a timeout and a bound on the reply's size. A reply
is accepted only when it is a Prometheus envelope (``{"status": "success",
"data": {"resultType": ..., "result": [...]}}``) of the result type asked for;
sample values are the API's strings, parsed, and non-finite ones (NaN, ±Inf)
are dropped and counted, so nothing downstream does arithmetic on them.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from vmshare.errors import PrometheusError, UsageError

DEFAULT_TIMEOUT = 10.0
MAX_REPLY_BYTES = 64 << 20


@dataclass(frozen=True)
class Sample:
    """One series' value at one time (an instant vector element)."""

    labels: Mapping[str, str]
    value: float
    time: float


@dataclass(frozen=True)
class Series:
    """One series over a range (a range-query matrix element): (time, value) points."""

    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]


class Transport(Protocol):
    """The seam to the network: one GET, its status, content type and body."""

    def get(self, url: str, timeout: float) -> tuple[int, str, bytes]:
        """Raises PrometheusError when nothing usable came back in ``timeout``."""
        ...


class UrllibTransport:
    """GET over urllib; error statuses are returned (Prometheus explains them in JSON)."""

    def get(self, url: str, timeout: float) -> tuple[int, str, bytes]:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, reply.headers.get("Content-Type", ""), _bounded(reply)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers.get("Content-Type", ""), _bounded(exc)
        except TimeoutError as exc:
            raise PrometheusError(f"{_base(url)}: no answer within {timeout:g} s") from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise PrometheusError(f"{_base(url)}: no answer within {timeout:g} s") from exc
            text = getattr(reason, "strerror", None) or str(reason)
            raise PrometheusError(f"{_base(url)}: cannot connect: {text}") from exc
        except OSError as exc:
            raise PrometheusError(f"{_base(url)}: {exc.strerror or exc}") from exc


def _bounded(reply: Any) -> bytes:
    body: bytes = reply.read(MAX_REPLY_BYTES + 1)
    if len(body) > MAX_REPLY_BYTES:
        raise PrometheusError(f"reply larger than {MAX_REPLY_BYTES >> 20} MiB")
    return body


def _base(url: str) -> str:
    return url.split("?", 1)[0]


def _finite(text: object) -> float | None:
    try:
        value = float(str(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


class PromClient:
    """Queries one Prometheus-compatible API at ``url`` (e.g. http://prom:9090).

    ``dropped`` counts the non-finite sample values left out of all replies.
    One client may be used from several threads at once (fleet status does).
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: Transport | None = None) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"not a Prometheus URL: {url!r} (want http://HOST:PORT)")
        if not (math.isfinite(timeout) and 0 < timeout <= 600):
            raise UsageError(f"timeout must be in (0, 600] seconds, not {timeout!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.transport: Transport = transport or UrllibTransport()
        self.dropped = 0
        self._dropped_lock = threading.Lock()

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query. Raises PrometheusError."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        data = self._get("/api/v1/query", params)
        kind, result = data["resultType"], data["result"]
        if kind == "scalar":
            value = _finite(result[1]) if isinstance(result, list) and len(result) == 2 else None
            return [] if value is None else [Sample({}, value, float(result[0]))]
        if kind != "vector":
            raise PrometheusError(f"{self.url}: {expr!r} gave a {kind}, not a vector")
        samples = []
        for item in self._items(result, "value"):
            point = self._point(item["value"])
            if point is not None:
                samples.append(Sample(item["metric"], point[1], point[0]))
        return samples

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        """A range query from ``start`` to ``end`` (Unix seconds) every ``step`` s.
        Raises PrometheusError, UsageError for an impossible range."""
        if not (math.isfinite(start) and math.isfinite(end) and start <= end):
            raise UsageError(f"bad time range {start!r}..{end!r}")
        if not (math.isfinite(step) and step > 0) or (end - start) / step > 11000:
            raise UsageError(f"step {step!r} s is not positive or gives over 11,000 points")
        data = self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                                 "end": f"{end:.3f}", "step": f"{step:g}"})
        if data["resultType"] != "matrix":
            raise PrometheusError(f"{self.url}: {expr!r} gave a {data['resultType']}, "
                                  "not a matrix")
        out = []
        for item in self._items(data["result"], "values"):
            if not isinstance(item["values"], list):
                raise PrometheusError(f"{self.url}: malformed values in a matrix")
            points = [p for p in (self._point(v) for v in item["values"]) if p is not None]
            out.append(Series(item["metric"], tuple(points)))
        return out

    # -- reply checking -------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        status, ctype, body = self.transport.get(url, self.timeout)
        try:
            doc = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            what = ctype.split(";")[0] or "no content type"
            raise PrometheusError(f"{self.url}: not a Prometheus API reply (HTTP {status}, "
                                  f"{what}): is this the Prometheus URL?") from exc
        if not isinstance(doc, dict) or doc.get("status") not in ("success", "error"):
            raise PrometheusError(f"{self.url}: not a Prometheus API reply (HTTP {status})")
        if doc["status"] == "error":
            raise PrometheusError(f"{self.url}: query refused ({doc.get('errorType', '?')}): "
                                  f"{str(doc.get('error', ''))[:300]}")
        data = doc.get("data")
        if not (isinstance(data, dict) and isinstance(data.get("resultType"), str)
                and "result" in data):
            raise PrometheusError(f"{self.url}: Prometheus reply without data.result")
        return data

    def _items(self, result: Any, key: str) -> list[dict[str, Any]]:
        if not isinstance(result, list):
            raise PrometheusError(f"{self.url}: result is not a list")
        items = []
        for item in result:
            if not (isinstance(item, dict) and isinstance(item.get("metric"), dict)
                    and key in item
                    and all(isinstance(k, str) and isinstance(v, str)
                            for k, v in item["metric"].items())):
                raise PrometheusError(f"{self.url}: malformed series in the result")
            items.append(item)
        return items

    def _point(self, pair: Any) -> tuple[float, float] | None:
        if not (isinstance(pair, list) and len(pair) == 2
                and isinstance(pair[0], (int, float)) and not isinstance(pair[0], bool)):
            raise PrometheusError(f"{self.url}: malformed sample {str(pair)[:80]}")
        value = _finite(pair[1])
        if value is None or not math.isfinite(float(pair[0])):
            with self._dropped_lock:
                self.dropped += 1
            return None
        return float(pair[0]), value
