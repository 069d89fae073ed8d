"""libvirt events: asyncio event loop, domain and QMP events, connection close.

The event half of the libvirt adapter (vmshare.hypervisor.libvirt does the
calls); with it, the only modules importing libvirt, libvirt_qemu and
libvirtaio. It hands raw events to an ``EventSink``; what they mean for
policy is the daemon's business (vmshare.daemon.triggers).

* libvirt's asyncio event loop (libvirtaio) is registered before any
  connection is opened. libvirtaio is not thread-safe, and the hypervisor
  adapter makes its calls in worker threads (to give each a deadline), which
  add and update libvirt's file handles and timers. Registrations coming from
  another thread are therefore marshalled onto the loop thread
  (``call_soon_threadsafe``; the two that must return an id wait for it).
* Subscriptions: VIR_DOMAIN_EVENT_ID_LIFECYCLE and _DEVICE_ADDED for every
  domain, and QMP events (RESET, MIGRATION, MEMORY_DEVICE_SIZE_CHANGE,
  DEVICE_DELETED, BALLOON_CHANGE, RESUME) through
  ``libvirt_qemu.qemuMonitorEventRegister``. That pass-through is a
  libvirt-qemu API: libvirt may mark domains tainted (custom-monitor, as
  qemuMonitorCommand does); accepted, and documented in the README.
* Connection loss: the close callback (libvirtd went away, keepalive timed
  out) and failing calls both end in ``sink.disconnected``; the daemon reconnects
  with exponential backoff.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import libvirt
import libvirt_qemu
import libvirtaio  # type: ignore[import-untyped]

from vmshare.errors import HypervisorError

log = logging.getLogger("vmshare.hypervisor.libvirt_events")


class EventSink(Protocol):
    """Where raw libvirt events go; every method is called on the loop thread."""

    def lifecycle(self, name: str, uuid: str | None, event: int, detail: int) -> None: ...

    def device_added(self, name: str, uuid: str | None, alias: str) -> None: ...

    def qmp_event(self, name: str, uuid: str | None, event: str,
                  data: dict[str, Any]) -> None: ...

    def disconnected(self, reason: str) -> None: ...

_registered: asyncio.AbstractEventLoop | None = None
MARSHAL_TIMEOUT_S = 10.0


class LoopMarshal:
    """Runs libvirt's event-loop callbacks on ``loop``'s thread (libvirtaio is
    not thread-safe): directly when called there, else marshalled, waiting for
    the result when libvirt needs one (a handle or timer id).

    Once the loop is closed (the daemon is stopping, and libvirt still closes a
    connection, or frees one at exit) there is nothing left to watch: an update
    or removal is a no-op and a new handle or timer is refused (-1, libvirt's
    failure value), instead of libvirtaio raising "Event loop is closed"."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.owner = threading.get_ident()

    def __call__(self, fn: Callable[..., Any], *args: Any, wait: bool) -> Any:
        if self.loop.is_closed():
            return -1 if wait else 0
        if threading.get_ident() == self.owner:
            return fn(*args)
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)
        try:
            self.loop.call_soon_threadsafe(run if wait else lambda: fn(*args))
        except RuntimeError:             # closed since the check above
            return -1 if wait else 0
        return done.result(MARSHAL_TIMEOUT_S) if wait else 0


def register_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` libvirt's event loop (once per process, before any connection)."""
    global _registered
    if _registered is loop:
        return
    if _registered is not None:
        raise HypervisorError("libvirt's event loop is already bound to another asyncio loop")
    impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
    on_loop = LoopMarshal(loop)
    libvirt.virEventRegisterImpl(
        lambda fd, ev, cb, op: on_loop(impl._add_handle, fd, ev, cb, op, wait=True),
        lambda watch, ev: on_loop(impl._update_handle, watch, ev, wait=False),
        lambda watch: on_loop(impl._remove_handle, watch, wait=False),
        lambda t, cb, op: on_loop(impl._add_timeout, t, cb, op, wait=True),
        lambda timer, t: on_loop(impl._update_timeout, timer, t, wait=False),
        lambda timer: on_loop(impl._remove_timeout, timer, wait=False))
    _registered = loop


class LibvirtEvents:
    """One libvirt connection that delivers raw events to ``sink`` on the loop
    thread: lifecycle, device-added, the QMP events named in ``qmp_events``
    (through libvirt's QMP pass-through), and the connection closing."""

    def __init__(self, uri: str, sink: EventSink, qmp_events: Sequence[str], *,
                 deadline: float = 10.0, keepalive: tuple[int, int] = (5, 3)) -> None:
        self.uri = uri
        self.sink = sink
        self.qmp_regex = "^(" + "|".join(qmp_events) + ")$"
        self.deadline = deadline
        self.keepalive = keepalive
        self.conn: Any = None
        self._lost = False

    # Called in a worker thread: every call here is a blocking RPC.
    def open(self) -> None:
        """Connect and subscribe. Raises HypervisorError (DeadlineExceeded)."""
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to libvirt at {self.uri}: "
                                  f"{exc.get_error_message()}") from exc
        try:
            conn.registerCloseCallback(self._closed, None)
            try:
                conn.setKeepAlive(*self.keepalive)
            except libvirt.libvirtError as exc:
                log.debug("no keepalive on %s: %s", self.uri, exc)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._lifecycle, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                                        self._device_added, None)
            try:
                libvirt_qemu.qemuMonitorEventRegister(
                    conn, None, self.qmp_regex, self._qmp, None,
                    libvirt_qemu.VIR_CONNECT_DOMAIN_QEMU_MONITOR_EVENT_REGISTER_REGEX)
            except libvirt.libvirtError as exc:
                log.warning("no QMP events from %s (RESET, MIGRATION, hotplug are then "
                            "seen only by the periodic reconcile): %s", self.uri, exc)
        except libvirt.libvirtError as exc:
            conn.close()
            raise HypervisorError(f"cannot subscribe to events of {self.uri}: "
                                  f"{exc.get_error_message()}") from exc
        self.conn = conn
        self._lost = False
        log.info("connected to %s; subscribed to lifecycle and QMP events", self.uri)

    def alive(self) -> bool:
        conn = self.conn
        if conn is None or self._lost:
            return False
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        try:
            conn.close()
        except libvirt.libvirtError as exc:
            log.debug("closing %s: %s", self.uri, exc)

    # -- callbacks: on the loop thread ----------------------------------------------

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        names = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client closed"}
        self._lost = True
        self.sink.disconnected(f"libvirt connection closed ({names.get(reason, reason)})")

    @staticmethod
    def _ident(dom: Any) -> tuple[str, str | None]:
        try:
            return dom.name(), dom.UUIDString()
        except libvirt.libvirtError:
            return dom.name(), None

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _op: Any) -> None:
        name, uuid = self._ident(dom)
        log.debug("lifecycle %s: event %d detail %d", name, event, detail)
        self.sink.lifecycle(name, uuid, event, detail)

    def _device_added(self, _conn: Any, dom: Any, alias: str, _op: Any) -> None:
        name, uuid = self._ident(dom)
        self.sink.device_added(name, uuid, alias)

    def _qmp(self, _conn: Any, dom: Any, event: str, _s: int, _us: int, details: str | None,
             _op: Any) -> None:
        name, uuid = self._ident(dom)
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        log.debug("QMP %s on %s: %s", event, name, details)
        self.sink.qmp_event(name, uuid, event, data if isinstance(data, dict) else {})
