"""libvirt events for the daemon: asyncio event loop, domain and QMP events, close.

This is the daemon's one libvirt adapter besides vmshare.hypervisor.libvirt
(which does the actions); it imports libvirt, libvirt_qemu and libvirtaio and
maps everything to ``Trigger``s or a disconnect notice.

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
  out) and failing calls both end in ``on_disconnect``; the runner reconnects
  with exponential backoff.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirt_qemu
import libvirtaio  # type: ignore[import-untyped]

from vmshare.daemon.triggers import (
    QMP_EVENT_REGEX,
    Trigger,
    device_added_trigger,
    lifecycle_trigger,
    qmp_trigger,
)
from vmshare.errors import DeadlineExceeded, HypervisorError

log = logging.getLogger("vmshare.daemon.libvirt")

_registered: asyncio.AbstractEventLoop | None = None
MARSHAL_TIMEOUT_S = 10.0


def register_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` libvirt's event loop (once per process, before any connection)."""
    global _registered
    if _registered is loop:
        return
    if _registered is not None:
        raise HypervisorError("libvirt's event loop is already bound to another asyncio loop")
    impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
    owner = threading.get_ident()

    def on_loop(fn: Callable[..., Any], *args: Any, wait: bool) -> Any:
        if threading.get_ident() == owner:
            return fn(*args)
        if not wait:
            loop.call_soon_threadsafe(fn, *args)
            return 0
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)
        loop.call_soon_threadsafe(run)
        return done.result(MARSHAL_TIMEOUT_S)

    libvirt.virEventRegisterImpl(
        lambda fd, ev, cb, op: on_loop(impl._add_handle, fd, ev, cb, op, wait=True),
        lambda watch, ev: on_loop(impl._update_handle, watch, ev, wait=False),
        lambda watch: on_loop(impl._remove_handle, watch, wait=False),
        lambda t, cb, op: on_loop(impl._add_timeout, t, cb, op, wait=True),
        lambda timer, t: on_loop(impl._update_timeout, timer, t, wait=False),
        lambda timer: on_loop(impl._remove_timeout, timer, wait=False))
    _registered = loop


class LibvirtEvents:
    """One libvirt connection that delivers events. ``deliver`` and
    ``on_disconnect`` are called on the loop thread."""

    def __init__(self, uri: str, deliver: Callable[[Trigger], None],
                 on_disconnect: Callable[[str], None], *, deadline: float = 10.0,
                 keepalive: tuple[int, int] = (5, 3)) -> None:
        self.uri = uri
        self.deliver = deliver
        self.on_disconnect = on_disconnect
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
                    conn, None, QMP_EVENT_REGEX, self._qmp, None,
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
        self.on_disconnect(f"libvirt connection closed ({names.get(reason, reason)})")

    @staticmethod
    def _ident(dom: Any) -> tuple[str, str | None]:
        try:
            return dom.name(), dom.UUIDString()
        except libvirt.libvirtError:
            return dom.name(), None

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _op: Any) -> None:
        name, uuid = self._ident(dom)
        trigger = lifecycle_trigger(name, uuid, event, detail)
        log.debug("lifecycle %s: event %d detail %d -> %s", name, event, detail, trigger)
        if trigger is not None:
            self.deliver(trigger)

    def _device_added(self, _conn: Any, dom: Any, alias: str, _op: Any) -> None:
        name, uuid = self._ident(dom)
        self.deliver(device_added_trigger(name, uuid, alias))

    def _qmp(self, _conn: Any, dom: Any, event: str, _s: int, _us: int, details: str | None,
             _op: Any) -> None:
        import json
        name, uuid = self._ident(dom)
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        trigger = qmp_trigger(name, uuid, event, data if isinstance(data, dict) else {})
        log.debug("QMP %s on %s: %s -> %s", event, name, details, trigger)
        if trigger is not None:
            self.deliver(trigger)


async def in_thread(fn: Callable[[], Any], deadline: float, what: str) -> Any:
    """Run a blocking call in the default executor with a deadline."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(None, fn), deadline)
    except TimeoutError as exc:
        raise DeadlineExceeded(f"{what}: no answer within {deadline:g} s") from exc
