"""A scripted QMP server on a unix socket, for tests of the QMP adapter.

It speaks the protocol as QEMU does: greeting, ``qmp_capabilities``
negotiation, one JSON reply per command (``id`` echoed), events, and it
serves one client at a time. Each command's reply is scripted:

* any JSON value -> ``{"return": value}``;
* ``QmpErr(cls, desc)`` -> ``{"error": {"class": cls, "desc": desc}}``;
* ``HANG`` -> never answer (deadline tests);
* ``EOF`` -> close the connection instead of answering;
* a callable ``f(arguments) -> any of the above``.

Unknown commands get QEMU's CommandNotFound error. ``greet=False`` makes
the server accept and never send the greeting. The server runs its own
event loop in a thread, so synchronous code under test can call it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QmpErr:
    cls: str
    desc: str


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


HANG = _Marker("HANG")
EOF = _Marker("EOF")

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": "fake"}, "capabilities": ["oob"]}}


class FakeQmpServer:
    def __init__(self, path: str, replies: dict[str, Any] | None = None, *,
                 greet: bool = True) -> None:
        self.path = path
        self.replies: dict[str, Any] = dict(replies or {})
        self.greet = greet
        self.received: list[tuple[str, dict[str, Any] | None]] = []
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fake-qmp")
        self._server: asyncio.AbstractServer | None = None
        self._busy = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None

    # -- lifecycle (called from the test thread) ----------------------------------

    def start(self) -> FakeQmpServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._busy = asyncio.Lock()
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            if self._writer is not None:
                self._writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> FakeQmpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def send_event(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send a QMP event to the connected client."""
        async def _send() -> None:
            assert self._writer is not None, "no client connected"
            msg: dict[str, Any] = {"event": event,
                                   "timestamp": {"seconds": 1, "microseconds": 2}}
            if data is not None:
                msg["data"] = data
            self._writer.write(json.dumps(msg).encode() + b"\r\n")
            await self._writer.drain()

        asyncio.run_coroutine_threadsafe(_send(), self._loop).result(5)

    def hang_up(self) -> None:
        """Close the current client connection (QEMU quit)."""
        async def _close() -> None:
            if self._writer is not None:
                self._writer.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)

    # -- protocol ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # QEMU's monitor serves one client at a time; later ones wait in the backlog.
        async with self._busy:
            self.connections += 1
            self._writer = writer
            try:
                await self._session(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self._writer = None
                writer.close()

    @staticmethod
    async def _until_eof(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.greet:
            await self._until_eof(reader)
            return
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        await writer.drain()
        decoder = json.JSONDecoder()
        buf = ""
        negotiated = False
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            buf += chunk.decode()
            while buf.strip():
                buf = buf.lstrip()
                try:
                    msg, end = decoder.raw_decode(buf)
                except json.JSONDecodeError:
                    break   # incomplete; read more
                buf = buf[end:]
                command = msg.get("execute")
                args = msg.get("arguments")
                reply: Any
                if command == "qmp_capabilities":
                    negotiated = True
                    reply = {}
                elif not negotiated:
                    reply = QmpErr("CommandNotFound",
                                   "Expecting capabilities negotiation with "
                                   "'qmp_capabilities'")
                else:
                    self.received.append((command, args))
                    reply = self.replies.get(
                        command, QmpErr("CommandNotFound",
                                        f"The command {command} has not been found"))
                    if callable(reply) and not isinstance(reply, _Marker):
                        reply = reply(args)
                if reply is HANG:
                    # A hung monitor: never answer, but let go once the client leaves.
                    await self._until_eof(reader)
                    return
                if reply is EOF:
                    return
                out: dict[str, Any]
                if isinstance(reply, QmpErr):
                    out = {"error": {"class": reply.cls, "desc": reply.desc}}
                else:
                    out = {"return": reply}
                if "id" in msg:
                    out["id"] = msg["id"]
                writer.write(json.dumps(out).encode() + b"\r\n")
                await writer.drain()


def _decode_script(obj: Any) -> Any:
    """JSON script values: {"__error__": [cls, desc]}, "__HANG__", "__EOF__"."""
    if obj == "__HANG__":
        return HANG
    if obj == "__EOF__":
        return EOF
    if isinstance(obj, dict) and set(obj) == {"__error__"}:
        return QmpErr(*obj["__error__"])
    return obj


def main(argv: list[str]) -> None:
    """``python -m tests.fakes.qmp_server -qmp unix:SOCKET,server=on REPLIES_JSON``.

    Serves until killed.

    Runs the fake as its own process, so SO_PEERCRED and /proc/<pid> see a
    process whose command line names the socket, as with a real QEMU.
    """
    option, value, script = argv
    assert option == "-qmp" and value.startswith("unix:"), argv
    path = value[len("unix:"):].split(",")[0]
    replies = {k: _decode_script(v) for k, v in json.loads(script).items()}
    server = FakeQmpServer(path, replies).start()
    try:
        threading.Event().wait()
    finally:
        server.stop()


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
