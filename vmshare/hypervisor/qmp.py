"""The plain-QEMU adapter: the only module in vmshare that uses qemu.qmp.

One VM per QMP socket (``-qmp unix:PATH,server=on,wait=off``), as on hosts
that run QEMU without libvirt. The synchronous ``Hypervisor`` methods run one
short session per call (``asyncio.run``); the daemon uses the async API
(``execute``, ``events``, ``aclose``) on one long-lived session. QEMU's QMP
server serves one client at a time, so do not mix the two on one socket at
the same moment: the second client waits for a greeting until its deadline.

The QEMU pid comes from SO_PEERCRED on our own connection to the socket
(made before the QMP session and then handed to QMPClient), then checked
against /proc/<pid>/cmdline so a reused pid is never reported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from qemu.qmp import (
    ConnectError,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)

from vmshare.errors import (
    AccessDenied,
    DeadlineExceeded,
    DomainNotFound,
    HypervisorError,
    MonitorError,
)
from vmshare.hypervisor.base import DEFAULT_DEADLINE, Hypervisor
from vmshare.hypervisor.common import (
    MOUNTS_PATH,
    PROC_ROOT,
    backend_types,
    build_ram_backends,
    followup_queries,
    merge_set_call,
    read_mounts,
    verify_pid,
)
from vmshare.model import RamBackend, VmFacts, VmRef

log = logging.getLogger(__name__)

T = TypeVar("T")

ZERO_UUID = "00000000-0000-0000-0000-000000000000"
# QOM types of confidential-computing objects (launch security).
CONFIDENTIAL_TYPES = frozenset({"sev-guest", "sev-snp-guest", "tdx-guest",
                                "s390-pv-guest", "pef-guest"})


class _Session:
    """One QMP connection: our socket (for SO_PEERCRED) handed to a QMPClient."""

    def __init__(self, socket_path: str, deadline: float) -> None:
        self.socket_path = socket_path
        self.deadline = deadline
        self.client = QMPClient(os.path.basename(socket_path))
        self.peer_pid = 0

    def closed_error(self, during: str, cause: BaseException | None = None) -> HypervisorError:
        detail = f": {cause}" if cause is not None and str(cause) else ""
        return HypervisorError(f"QEMU monitor at {self.socket_path} closed{during}{detail}")

    async def open(self) -> None:
        """Connect and negotiate. Raises HypervisorError, AccessDenied, DeadlineExceeded."""
        path = self.socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path),
                                       self.deadline)
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"connect to QEMU monitor at {path}: no answer within {self.deadline:g} s"
                ) from exc
            except PermissionError as exc:
                raise AccessDenied(f"QEMU monitor at {path}: permission denied") from exc
            except OSError as exc:
                raise HypervisorError(
                    f"no QEMU monitor at {path}: {exc.strerror or exc}") from exc
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            self.peer_pid = struct.unpack("3i", creds)[0]
            try:
                await asyncio.wait_for(self.client.connect(sock), self.deadline)
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"QEMU monitor at {path}: no QMP greeting within {self.deadline:g} s "
                    "(another client connected?)") from exc
            except ConnectError as exc:
                raise self.closed_error(" while connecting", exc.exc) from exc
        except BaseException:
            sock.close()
            raise

    async def execute(self, command: str, arguments: dict[str, Any] | None) -> Any:
        """Run one command. Raises MonitorError, HypervisorError, DeadlineExceeded."""
        where = f"QMP {command} at {self.socket_path}"
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments),
                                          self.deadline)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{where}: no answer within {self.deadline:g} s") from exc
        except ExecuteError as exc:
            raise MonitorError(f"{where} failed: {exc.error_class}: {exc}", command=command,
                               arguments=arguments, response=dict(exc.received)) from exc
        except (ExecInterruptedError, StateError) as exc:
            raise self.closed_error(f" during {command}", exc) from exc
        except QMPError as exc:
            raise HypervisorError(f"{where}: {exc}") from exc

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(), self.deadline)
        except (QMPError, OSError, EOFError, TimeoutError) as exc:
            # The error that ended the session was already reported by execute().
            log.debug("disconnect from %s: %r", self.socket_path, exc)


class QmpHypervisor:
    """``Hypervisor`` for one plain QEMU through its QMP unix socket.

    Raises (from every call) HypervisorError "QEMU monitor at PATH closed"
    when QEMU hangs up, DeadlineExceeded when it does not answer within
    ``deadline`` seconds, MonitorError when a command fails.
    """

    def __init__(self, socket_path: str, deadline: float = DEFAULT_DEADLINE, *,
                 proc_root: str = PROC_ROOT, mounts_path: str = MOUNTS_PATH) -> None:
        self.socket_path = socket_path
        self.uri = f"qmp+unix://{socket_path}"
        self.deadline = deadline
        self.proc_root = proc_root
        self.mounts_path = mounts_path
        self._session: _Session | None = None

    # -- sync facade ---------------------------------------------------------

    def _sync(self, work: Callable[[_Session], Awaitable[T]]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise HypervisorError("QmpHypervisor: synchronous call from inside an event "
                                  "loop; use the async API (execute/events)")

        async def batch() -> T:
            session = _Session(self.socket_path, self.deadline)
            await session.open()
            try:
                return await work(session)
            finally:
                await session.close()

        return asyncio.run(batch())

    async def _identify(self, session: _Session) -> VmRef:
        name_reply = await session.execute("query-name", None)
        name = name_reply.get("name") if isinstance(name_reply, dict) else None
        if not isinstance(name, str) or not name:
            name = os.path.splitext(os.path.basename(self.socket_path))[0]
        uuid_reply = await session.execute("query-uuid", None)
        uuid = uuid_reply.get("UUID") if isinstance(uuid_reply, dict) else None
        return VmRef(name=name, uuid=uuid if isinstance(uuid, str) else ZERO_UUID,
                     domain_id=None, running=True)

    def _check_same(self, ref: VmRef, vm: VmRef) -> None:
        same = vm.name == ref.name or (vm.uuid != ZERO_UUID and vm.uuid.lower() ==
                                       ref.uuid.lower())
        if not same:
            raise DomainNotFound(f"QEMU at {self.socket_path} runs {ref.name!r}, "
                                 f"not {vm.name!r}")

    def list_vms(self) -> list[VmRef]:
        """The one VM behind the socket. Raises HypervisorError when it is gone."""
        return [self._sync(self._identify)]

    def lookup(self, ident: str) -> VmRef:
        """Match ``ident`` against the VM's name, UUID or socket path.

        Raises DomainNotFound.
        """
        ref = self._sync(self._identify)
        if ident in (ref.name, self.socket_path) or (
                ref.uuid != ZERO_UUID and ident.lower() == ref.uuid.lower()):
            return ref
        raise DomainNotFound(f"no VM {ident!r} at {self.socket_path} (it runs {ref.name!r})")

    def facts(self, vm: VmRef) -> VmFacts:
        """Pid (SO_PEERCRED, verified in /proc), RAM size, confidential-guest objects.

        Raises DomainNotFound (another VM behind the socket), ProcessGone,
        AccessDenied, HypervisorError, DeadlineExceeded.
        """
        async def work(session: _Session) -> VmFacts:
            ref = await self._identify(session)
            self._check_same(ref, vm)
            types = await session.execute("qom-list", {"path": "/objects"})
            confidential = isinstance(types, list) and any(
                isinstance(p, dict) and p.get("type") in
                {f"child<{t}>" for t in CONFIDENTIAL_TYPES} for p in types)
            size = await session.execute("query-memory-size-summary", None)
            memory = 0
            if isinstance(size, dict):
                memory = int(size.get("base-memory", 0)) + int(size.get("plugged-memory", 0))
            pid = verify_pid(session.peer_pid, ref.name,
                             ref.uuid if ref.uuid != ZERO_UUID else None,
                             socket_path=self.socket_path, proc_root=self.proc_root)
            return VmFacts(ref=ref, pid=pid, nosharepages=False,
                           launch_security=confidential, memory_bytes=memory)

        return self._sync(work)

    def ram_backends(self, vm: VmRef) -> list[RamBackend]:
        """query-memdev joined with qom-list /objects (+ mem-path/hugetlb).

        Raises DomainNotFound, MonitorError, HypervisorError, DeadlineExceeded.
        """
        async def work(session: _Session) -> list[RamBackend]:
            self._check_same(await self._identify(session), vm)
            return await self._ram_backends(session)

        return self._sync(work)

    async def _ram_backends(self, session: _Session) -> list[RamBackend]:
        memdevs = await session.execute("query-memdev", None)
        types = backend_types(await session.execute("qom-list", {"path": "/objects"}))
        props = {key: await session.execute(command, args)
                 for key, (command, args) in followup_queries(memdevs, types).items()}
        mounts = read_mounts(self.mounts_path) if props else []
        return build_ram_backends(memdevs, types, props, mounts)

    def set_merge(self, vm: VmRef, backend_id: str, merge: bool) -> None:
        """qom-set /objects/<backend_id> merge. Does not verify.

        Raises DomainNotFound, MonitorError (e.g. no such backend), DeadlineExceeded.
        """
        command, args = merge_set_call(backend_id, merge)

        async def work(session: _Session) -> None:
            self._check_same(await self._identify(session), vm)
            await session.execute(command, args)

        self._sync(work)

    def qmp(self, vm: VmRef, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises DomainNotFound, MonitorError, HypervisorError, DeadlineExceeded.
        """
        async def work(session: _Session) -> Any:
            self._check_same(await self._identify(session), vm)
            return await session.execute(command, arguments)

        return self._sync(work)

    def close(self) -> None:
        """Nothing to close for the sync facade; use ``aclose`` for the async session."""
        if self._session is not None:
            log.debug("close(): async session on %s left open; use aclose()",
                      self.socket_path)

    # -- async API (one long-lived session) --------------------------------------

    async def _ensure_session(self) -> _Session:
        session = self._session
        if session is not None and session.client.runstate == Runstate.RUNNING:
            return session
        if session is not None:
            await session.close()
        session = _Session(self.socket_path, self.deadline)
        self._session = None
        await session.open()
        self._session = session
        return session

    @property
    def peer_pid(self) -> int | None:
        """Pid of the QEMU that served the async session (unverified), if open."""
        return self._session.peer_pid if self._session is not None else None

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command on the long-lived session (connecting if needed).

        Raises MonitorError, HypervisorError, DeadlineExceeded, AccessDenied.
        """
        session = await self._ensure_session()
        return await session.execute(command, arguments)

    async def async_ram_backends(self) -> list[RamBackend]:
        """``ram_backends`` on the long-lived session. Same errors."""
        return await self._ram_backends(await self._ensure_session())

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """QMP events ({"event", "data", "timestamp"}) as QEMU sends them.

        Yields every event since the long-lived session connected (qemu.qmp's
        default listener buffers them), so none is lost between connecting
        and iterating; have one consumer. Ends by raising HypervisorError
        "QEMU monitor at PATH closed" when QEMU hangs up (quit, crash,
        migrated away).
        """
        session = await self._ensure_session()
        client = session.client
        listener = client.events
        while True:
            if client.runstate != Runstate.RUNNING and listener.empty():
                raise session.closed_error("")
            get = asyncio.ensure_future(listener.get())
            changed = asyncio.ensure_future(client.runstate_changed())
            try:
                done, _ = await asyncio.wait({get, changed},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                if not get.done():
                    get.cancel()
            if get in done:
                yield dict(get.result())

    async def aclose(self) -> None:
        """Close the long-lived session, if any."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> QmpHypervisor:
        await self._ensure_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# Checked by mypy: the adapter is a Hypervisor.
_AS_HYPERVISOR: type[Hypervisor] = QmpHypervisor
