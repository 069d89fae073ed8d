"""Host sketches over HTTP(S), for `vmshare place --sketches URL`: the other
end is the daemon's sketch endpoint (vmshare.daemon.sketch_http) or a TLS
proxy in front of it.

Each GET carries the token as ``Authorization: Bearer``, has a deadline for
the whole transfer (not only per read) and a size cap, and follows no
redirect and no proxy from the environment (the token would go along:
sketches travel between the fleet's own hosts). https uses the standard library's
default TLS context (certificates and host names verified), with an extra CA
file when given. What comes back is decoded and checked exactly as a file
(vmshare.records.sketchfile.decode). Every failure is a SketchError of one
line naming the URL; the token never appears in one.
"""

from __future__ import annotations

import http.client
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmshare.errors import SketchError
from vmshare.records.sketchfile import Sketch, decode

DEFAULT_TIMEOUT = 30.0
#: the largest sketch accepted: 8 VMs at the default cap of 2**20 samples
#: (12 MiB each) and their heavy entries, with room to spare
MAX_SKETCH_BYTES = 256 << 20
FETCHES_AT_ONCE = 8
_REASONS = {401: "refused: the token is missing or wrong",
            403: "refused: forbidden",
            404: "not found: the daemon serves /sketch",
            503: "no sketch there yet (or the server is busy)"}


def is_url(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None              # urllib then raises the 3xx as an HTTPError


@dataclass(frozen=True)
class SketchFetcher:
    """GETs host sketches with ``token``; ``cafile``: extra CA certificates for https."""

    token: bytes = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    cafile: Path | None = None
    max_bytes: int = MAX_SKETCH_BYTES

    def __post_init__(self) -> None:
        if self.cafile is not None:
            self.context()          # refuse an unreadable CA file before any request

    def context(self) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(
                cafile=str(self.cafile) if self.cafile is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise SketchError(f"{self.cafile}: cannot load CA certificates: "
                              f"{getattr(exc, 'strerror', None) or exc}") from exc

    def fetch_all(self, urls: list[str]) -> list[Sketch]:
        """Every URL's sketch, a few fetched at once. Raises the first failure's
        SketchError, in the order given."""
        with ThreadPoolExecutor(max_workers=min(FETCHES_AT_ONCE, len(urls) or 1)) as pool:
            return list(pool.map(self.fetch, urls))

    def fetch(self, url: str) -> Sketch:
        """One host's sketch from ``url``, decoded and checked. Raises SketchError."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SketchError(f"{url}: not a sketch URL (want http[s]://HOST:PORT/sketch)")
        return decode(self.get(url), url)

    def get(self, url: str) -> bytes:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), _NoRedirect,
            urllib.request.HTTPSHandler(context=self.context()))
        request = urllib.request.Request(url, headers={
            "Authorization": "Bearer " + self.token.decode("ascii", "replace"),
            "Accept": "application/octet-stream"})
        deadline = time.monotonic() + self.timeout
        try:
            with opener.open(request, timeout=self.timeout) as reply:
                return self._read(url, reply, deadline)
        except urllib.error.HTTPError as exc:
            exc.close()
            why = _REASONS.get(exc.code, exc.reason)
            if 300 <= exc.code < 400:
                why = "redirects are not followed (the token would go along)"
            raise SketchError(f"{url}: HTTP {exc.code}: {why}") from exc
        except urllib.error.URLError as exc:
            raise SketchError(f"{url}: {_why(exc.reason, self.timeout)}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise SketchError(f"{url}: {_why(exc, self.timeout)}") from exc

    def _read(self, url: str, reply: Any, deadline: float) -> bytes:
        length = reply.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise SketchError(f"{url}: the sketch is {int(length):,} bytes, over the "
                              f"{self.max_bytes:,}-byte cap")
        chunks: list[bytes] = []
        size = 0
        read = getattr(reply, "read1", reply.read)   # read1: one recv, so the deadline holds
        while chunk := read(1 << 16):
            size += len(chunk)
            if size > self.max_bytes:
                raise SketchError(f"{url}: the sketch is over the {self.max_bytes:,}-byte cap")
            if time.monotonic() > deadline:
                raise SketchError(f"{url}: not read whole within {self.timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)


def _why(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {reason.verify_message}"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed: {reason.reason or reason}"
    if isinstance(reason, http.client.HTTPException):
        return f"not an HTTP answer ({type(reason).__name__})"
    text = getattr(reason, "strerror", None) or str(reason)
    return f"cannot connect: {text}"
