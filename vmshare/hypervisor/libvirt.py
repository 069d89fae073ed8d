"""The libvirt adapter: the only module in vmshare that imports libvirt.

Every libvirt call runs in a worker thread joined with a deadline, so a hung
libvirtd or QEMU monitor is a DeadlineExceeded naming the domain and the
call, never a hang. libvirtError is mapped to vmshare.errors here and
nowhere else. QMP goes through ``libvirt_qemu.qemuMonitorCommand`` (libvirt
marks the domain tainted "custom-monitor" when it is used).

Over 400 lines by design: being the only module that imports libvirt, it holds
every libvirt call vmshare makes (domains, QMP pass-through, policy metadata,
persistent definitions); the pure parts live in ``common`` and ``metadata``.
"""
# size: the one module that imports libvirt holds every libvirt call (see above)

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from vmshare.config import VmPolicy
from vmshare.errors import (
    AccessDenied,
    DeadlineExceeded,
    DomainNotFound,
    DomainNotRunning,
    HypervisorError,
    MonitorError,
    PolicyError,
    ProcessGone,
)
from vmshare.hypervisor.base import (
    DEFAULT_DEADLINE,
    DefinitionStore,
    DomainLifecycle,
    Hypervisor,
    PolicyStore,
)
from vmshare.hypervisor.common import (
    MOUNTS_PATH,
    PROC_ROOT,
    backend_types,
    build_ram_backends,
    followup_queries,
    merge_set_call,
    parse_domain_xml,
    read_mounts,
    verify_pid,
)
from vmshare.model import Adoption, RamBackend, VmFacts, VmRef

log = logging.getLogger(__name__)

T = TypeVar("T")

_ACCESS_CODES = frozenset(
    getattr(libvirt, n) for n in (
        "VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED", "VIR_ERR_AUTH_UNAVAILABLE",
        "VIR_ERR_ACCESS_DENIED", "VIR_ERR_OPERATION_DENIED")
    if hasattr(libvirt, n))
_TIMEOUT_CODES = frozenset(
    getattr(libvirt, n) for n in ("VIR_ERR_OPERATION_TIMEOUT", "VIR_ERR_AGENT_UNRESPONSIVE")
    if hasattr(libvirt, n))

_silenced = False

# QMP commands that start a job libvirt must own: sent behind its back through
# qemuMonitorCommand, libvirt neither tracks nor cleans up the job, and libvirtd
# 9.0 was seen to segfault (libvirt_driver_qemu.so) on dump-guest-memory. Each
# maps to the libvirt API (and virsh command) that runs it properly.
LIBVIRT_OWNED_COMMANDS: dict[str, str] = {
    "dump-guest-memory": "virDomainCoreDumpWithFormat (virsh dump --memory-only)",
    "migrate": "virDomainMigrateToURI3 (virsh migrate)",
    "migrate-incoming": "virDomainMigrate3 on the source, which prepares the "
                        "destination (virsh migrate)",
    "snapshot-save": "virDomainSnapshotCreateXML (virsh snapshot-create)",
    "snapshot-load": "virDomainRevertToSnapshot (virsh snapshot-revert)",
    "drive-mirror": "virDomainBlockCopy (virsh blockcopy)",
    "blockdev-mirror": "virDomainBlockCopy (virsh blockcopy)",
    "drive-backup": "virDomainBackupBegin (virsh backup-begin)",
    "blockdev-backup": "virDomainBackupBegin (virsh backup-begin)",
}
# Their HMP spellings, for human-monitor-command (savevm/loadvm exist only in HMP).
_HMP_OWNED = {"dump-guest-memory": "dump-guest-memory", "migrate": "migrate",
              "migrate_incoming": "migrate-incoming", "savevm": "snapshot-save",
              "loadvm": "snapshot-load", "drive_mirror": "drive-mirror",
              "drive_backup": "drive-backup"}


def refuse_libvirt_owned(command: str, arguments: dict[str, Any] | None, name: str) -> None:
    """Raise MonitorError when ``command`` is a job libvirt must start itself."""
    owned = command
    if command == "human-monitor-command" and arguments:
        words = str(arguments.get("command-line", "")).split()
        owned = _HMP_OWNED.get(words[0], "") if words else ""
    api = LIBVIRT_OWNED_COMMANDS.get(owned)
    if api is not None:
        raise MonitorError(
            f"QMP {command} on domain {name} refused: {owned} starts a job that libvirt "
            f"must own (sent through qemuMonitorCommand it is invisible to libvirt, and "
            f"libvirtd 9.0 crashes on dump-guest-memory); use {api} instead",
            command=command, arguments=arguments)


def _silence_default_error_printer() -> None:
    # libvirt prints every error on stderr unless a handler is registered;
    # we map and raise them instead.
    global _silenced
    if not _silenced:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _silenced = True


def map_libvirt_error(exc: libvirt.libvirtError, what: str) -> HypervisorError | AccessDenied:
    """Translate a libvirtError raised while doing ``what`` into vmshare.errors."""
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    if code in (libvirt.VIR_ERR_NO_DOMAIN,):
        return DomainNotFound(f"{what}: no such domain ({message})")
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message:
        return DomainNotRunning(f"{what}: domain is not running")
    if code in _ACCESS_CODES or (code == libvirt.VIR_ERR_SYSTEM_ERROR
                                 and "ermission denied" in message):
        return AccessDenied(f"{what}: access denied ({message})")
    if code in _TIMEOUT_CODES:
        return DeadlineExceeded(f"{what}: {message}")
    return HypervisorError(f"{what}: {message}")


def _with_deadline(fn: Callable[[], T], deadline: float, what: str) -> T:
    """Run ``fn`` in a daemon thread; raise DeadlineExceeded after ``deadline`` s.

    A call that never returns leaves its thread blocked inside libvirt; it
    is a daemon thread, so it cannot keep the process alive.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=run, name=f"libvirt: {what}", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise DeadlineExceeded(f"{what}: no answer within {deadline:g} s")
    if error:
        exc = error[0]
        if isinstance(exc, libvirt.libvirtError):
            raise map_libvirt_error(exc, what) from exc
        raise exc
    return result[0]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


class LibvirtHypervisor:
    """``Hypervisor`` over a libvirt connection.

    ``run_dir`` holds libvirt's ``<name>.pid`` files, ``proc_root`` and
    ``mounts_path`` are injectable for tests. Call ``enable_keepalive`` only
    after registering a libvirt event loop (the daemon does; the CLI does not).
    Raises HypervisorError/AccessDenied (naming the URI) when the connection
    cannot be opened, DeadlineExceeded when libvirtd does not answer.
    """

    def __init__(self, uri: str = "qemu:///system", deadline: float = DEFAULT_DEADLINE, *,
                 run_dir: str = "/run/libvirt/qemu", proc_root: str = PROC_ROOT,
                 mounts_path: str = MOUNTS_PATH) -> None:
        _silence_default_error_printer()
        self.uri = uri
        self.deadline = deadline
        self.run_dir = run_dir
        self.proc_root = proc_root
        self.mounts_path = mounts_path
        try:
            self._conn: Any = _with_deadline(lambda: libvirt.open(uri), deadline,
                                             f"connect to libvirt at {uri}")
        except AccessDenied as exc:
            raise AccessDenied(f"libvirt at {uri}: {exc}") from exc
        except HypervisorError as exc:
            if isinstance(exc, DeadlineExceeded):
                raise
            raise HypervisorError(f"cannot connect to libvirt at {uri}: {exc}") from exc
        if self._conn is None:   # old bindings returned None instead of raising
            raise HypervisorError(f"cannot connect to libvirt at {uri}")

    # -- plumbing ------------------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return _with_deadline(fn, self.deadline, what)

    def enable_keepalive(self, interval: int = 5, count: int = 5) -> bool:
        """Ask libvirtd for keepalives; needs a registered libvirt event loop.

        Returns False when the driver does not support keepalive (test://,
        local drivers). Raises HypervisorError on other failures.
        """
        try:
            self._call(lambda: self._conn.setKeepAlive(interval, count),
                       f"setKeepAlive on {self.uri}")
        except HypervisorError as exc:
            if "not supported" in str(exc):
                log.debug("keepalive unsupported on %s: %s", self.uri, exc)
                return False
            raise
        return True

    def _ref(self, dom: Any) -> VmRef:
        def read() -> VmRef:
            running = bool(dom.isActive())
            domain_id = dom.ID() if running else None
            return VmRef(name=dom.name(), uuid=dom.UUIDString(),
                         domain_id=domain_id if domain_id is not None and domain_id >= 0
                         else None, running=running)
        return self._call(read, f"read state of domain {dom.name()}")

    def _domain(self, vm: VmRef) -> Any:
        # UUID first: it survives renames; names are unique per host too.
        what = f"look up domain {vm.name}"
        if vm.uuid:
            return self._call(lambda: self._conn.lookupByUUIDString(vm.uuid), what)
        return self._call(lambda: self._conn.lookupByName(vm.name), what)

    # -- Hypervisor ------------------------------------------------------------

    def list_vms(self) -> list[VmRef]:
        """Every domain (running or not), sorted by name. Raises HypervisorError."""
        doms = self._call(lambda: self._conn.listAllDomains(0),
                          f"list domains on {self.uri}")
        refs = []
        for dom in doms:
            try:
                refs.append(self._ref(dom))
            except DomainNotFound:
                continue   # undefined while we listed
        return sorted(refs, key=lambda r: r.name)

    def lookup(self, ident: str) -> VmRef:
        """Find a domain by name, then UUID, then numeric id. Raises DomainNotFound."""
        attempts: list[tuple[str, Callable[[], Any]]] = [
            ("name", lambda: self._conn.lookupByName(ident))]
        if _is_uuid(ident):
            attempts.append(("uuid", lambda: self._conn.lookupByUUIDString(ident)))
        if ident.isdigit():
            attempts.append(("id", lambda: self._conn.lookupByID(int(ident))))
        for kind, fn in attempts:
            try:
                dom = self._call(fn, f"look up domain {kind} {ident!r} on {self.uri}")
            except DomainNotFound:
                continue
            return self._ref(dom)
        raise DomainNotFound(f"no domain named {ident!r} (name, UUID or id) on {self.uri}")

    def facts(self, vm: VmRef) -> VmFacts:
        """Domain XML facts and the QEMU pid, verified to still be this domain's.

        Raises DomainNotFound, DomainNotRunning (running but no pid file),
        ProcessGone (pid gone or reused), AccessDenied, DeadlineExceeded.
        """
        dom = self._domain(vm)
        xml = self._call(lambda: dom.XMLDesc(0), f"read XML of domain {vm.name}")
        facts = parse_domain_xml(xml)
        owner = self._owner(xml, vm.name) if facts.nosharepages else None
        ref = self._ref(dom)
        pid = self._pid(ref) if ref.running else None
        return VmFacts(ref=ref, pid=pid, nosharepages=facts.nosharepages,
                       launch_security=facts.launch_security,
                       memory_bytes=facts.memory_bytes, nosharepages_owner=owner)

    @staticmethod
    def _owner(xml: str, name: str) -> str | None:
        """Whose <nosharepages/> it is; a malformed record counts as the operator's
        (never merged), with a warning, rather than failing every command."""
        from vmshare.hypervisor.metadata import owner_from_domain_xml
        try:
            return owner_from_domain_xml(xml)
        except PolicyError as exc:
            log.warning("%s: %s", name, exc)
            return None

    def _pid(self, ref: VmRef) -> int:
        path = os.path.join(self.run_dir, f"{ref.name}.pid")
        try:
            with open(path, encoding="ascii") as f:
                text = f.read(64).strip()
        except FileNotFoundError as exc:
            raise DomainNotRunning(f"domain {ref.name}: no pid file {path}") from exc
        except PermissionError as exc:
            raise AccessDenied(f"cannot read {path}: permission denied") from exc
        except OSError as exc:
            raise HypervisorError(f"cannot read {path}: {exc.strerror}") from exc
        if not text.isdigit() or int(text) <= 0:
            raise HypervisorError(f"domain {ref.name}: bad pid file {path}: {text!r}")
        try:
            return verify_pid(int(text), ref.name, ref.uuid, proc_root=self.proc_root)
        except ProcessGone as exc:
            raise ProcessGone(f"domain {ref.name}: {exc}") from exc

    def qmp(self, vm: VmRef, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command through libvirt and return its ``return`` value.

        Commands that start a job libvirt must own (LIBVIRT_OWNED_COMMANDS:
        dump-guest-memory, migrate, snapshots, block copies and backups) are
        refused with a MonitorError naming the libvirt API to use instead.

        Raises MonitorError (QMP error, keeps command/arguments/response),
        DomainNotRunning, DomainNotFound, DeadlineExceeded, HypervisorError.
        """
        refuse_libvirt_owned(command, arguments, vm.name)
        dom = self._domain(vm)
        return self._qmp_dom(dom, vm.name, command, arguments)

    def _qmp_dom(self, dom: Any, name: str, command: str,
                 arguments: dict[str, Any] | None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        text = json.dumps(msg)
        raw = self._call(lambda: libvirt_qemu.qemuMonitorCommand(dom, text, 0),
                         f"QMP {command} on domain {name}")
        try:
            reply = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise MonitorError(f"QMP {command} on domain {name}: unparsable reply",
                               command=command, arguments=arguments,
                               response=raw) from exc
        if not isinstance(reply, dict):
            raise MonitorError(f"QMP {command} on domain {name}: reply is not an object",
                               command=command, arguments=arguments, response=reply)
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise MonitorError(
                f"QMP {command} on domain {name} failed: "
                f"{err.get('class', 'Error')}: {err.get('desc', reply['error'])}",
                command=command, arguments=arguments, response=reply)
        if "return" not in reply:
            raise MonitorError(f"QMP {command} on domain {name}: reply without 'return'",
                               command=command, arguments=arguments, response=reply)
        return reply["return"]

    def ram_backends(self, vm: VmRef) -> list[RamBackend]:
        """query-memdev joined with qom-list /objects (+ mem-path/hugetlb).

        Raises DomainNotRunning, MonitorError, DeadlineExceeded, HypervisorError.
        """
        dom = self._domain(vm)
        memdevs = self._qmp_dom(dom, vm.name, "query-memdev", None)
        types = backend_types(self._qmp_dom(dom, vm.name, "qom-list", {"path": "/objects"}))
        props = {key: self._qmp_dom(dom, vm.name, command, args)
                 for key, (command, args) in followup_queries(memdevs, types).items()}
        mounts = read_mounts(self.mounts_path) if props else []
        return build_ram_backends(memdevs, types, props, mounts)

    def set_merge(self, vm: VmRef, backend_id: str, merge: bool) -> None:
        """qom-set /objects/<backend_id> merge. Does not verify.

        Raises MonitorError (e.g. no such backend), DomainNotRunning, DeadlineExceeded.
        """
        command, args = merge_set_call(backend_id, merge)
        self.qmp(vm, command, args)

    # -- persistent definitions (DefinitionStore) ----------------------------------

    def adopt(self, vm: VmRef) -> Adoption:
        """Bring the domain's persistent definition to ``<nosharepages/>``, recording
        whose it is in vmshare's metadata (vmshare.hypervisor.metadata.adopt_domain_xml).

        The running QEMU keeps its options until it is started again. Raises
        DomainNotFound, PolicyError (hostile or malformed XML), DeadlineExceeded,
        HypervisorError.
        """
        from vmshare.hypervisor.metadata import adopt_domain_xml
        dom = self._domain(vm)
        ref = self._ref(dom)
        persistent = self._call(dom.isPersistent, f"read persistence of domain {vm.name}")
        if not persistent:
            return self._transient_adoption(dom, ref)
        # SECURE: a definition written back without its secrets (graphics
        # passwords) would lose them.
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        xml = self._call(lambda: dom.XMLDesc(flags),
                         f"read persistent XML of domain {vm.name}")
        if parse_domain_xml(xml).launch_security:
            return Adoption(ref.name, "confidential", running=ref.running)
        new, owner = adopt_domain_xml(xml)
        if new is not None:
            self._call(lambda: self._conn.defineXML(new),
                       f"define domain {vm.name} with <nosharepages/>")
        outcome = "operator" if owner == "operator" else ("adopted" if new else "already")
        return Adoption(ref.name, outcome, changed=new is not None, running=ref.running)

    def _transient_adoption(self, dom: Any, ref: VmRef) -> Adoption:
        """A transient domain cannot be changed, but may have been written adopted."""
        from vmshare.hypervisor.metadata import owner_from_domain_xml
        xml = self._call(lambda: dom.XMLDesc(0), f"read XML of domain {ref.name}")
        if parse_domain_xml(xml).nosharepages:
            owner = owner_from_domain_xml(xml)
            return Adoption(ref.name, "already" if owner == "vmshare" else "operator",
                            running=ref.running)
        return Adoption(ref.name, "transient", running=ref.running)

    # -- lifecycle (DomainLifecycle: the demo and tests) ----------------------

    def create_transient(self, xml: str) -> VmRef:
        """Start a transient domain from XML. Raises HypervisorError naming the cause."""
        dom = self._call(lambda: self._conn.createXML(xml, 0), f"start a domain on {self.uri}")
        return self._ref(dom)

    def destroy(self, vm: VmRef) -> None:
        """Power a domain off at once. A domain already gone is not an error."""
        try:
            dom = self._domain(vm)
            self._call(dom.destroy, f"destroy domain {vm.name}")
        except (DomainNotFound, DomainNotRunning):
            return

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                _with_deadline(conn.close, self.deadline, f"close {self.uri}")
            except HypervisorError as exc:
                log.debug("closing %s: %s", self.uri, exc)

    # -- per-domain policy metadata (vmshare.hypervisor.metadata) -------------------------

    def get_policy(self, vm: VmRef, *, config: bool = False) -> VmPolicy | None:
        """The domain's vmshare policy element, or None when it has none.

        Reads the live definition of a running domain (the persistent one with
        ``config``). Raises PolicyError (malformed element), DomainNotFound,
        DeadlineExceeded, HypervisorError.
        """
        from vmshare.hypervisor.metadata import element_from_xml
        text = self._element(self._domain(vm), vm.name, config=config)
        if text is None:
            return None
        return element_from_xml(text, what=f"{vm.name}: vmshare policy metadata")[0]

    def _element(self, dom: Any, name: str, *, config: bool) -> str | None:
        """vmshare's metadata element as libvirt hands it over, or None."""
        from vmshare.hypervisor.metadata import NAMESPACE
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0
        try:
            text: str = self._call(
                lambda: dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, flags),
                f"read vmshare metadata of domain {name}")
        except HypervisorError as exc:
            cause = exc.__cause__
            if (isinstance(cause, libvirt.libvirtError)
                    and cause.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA):
                return None
            raise
        return text

    def set_policy(self, vm: VmRef, policy: VmPolicy | None, *, live: bool,
                   config: bool) -> None:
        """Write (or, with None, remove) the domain's vmshare policy element.

        ``live`` changes the running domain, ``config`` its persistent
        definition; at least one is needed. The record of whose
        ``<nosharepages/>`` it is (read from the persistent definition when
        ``config``, else the live one) is kept. Raises UsageError,
        DomainNotFound, DomainNotRunning, DeadlineExceeded, HypervisorError,
        PolicyError (a malformed record).
        """
        from vmshare.errors import UsageError
        from vmshare.hypervisor.metadata import NAMESPACE, PREFIX, element_from_xml, policy_to_xml
        if not (live or config):
            raise UsageError("set_policy needs live and/or config")
        flags = ((libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
                 | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0))
        dom = self._domain(vm)
        current = self._element(dom, vm.name, config=config)
        owner = None
        if current is not None:
            try:
                owner = element_from_xml(current)[1]
            except PolicyError:
                owner = None   # a malformed element is replaced whole
        text = policy_to_xml(policy, owner) if policy is not None or owner else None
        key = PREFIX if text is not None else None
        self._call(lambda: dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, key,
                                           NAMESPACE, flags),
                   f"write vmshare metadata of domain {vm.name}")


# Checked by mypy: the adapter and the optional abilities it offers.
_AS_HYPERVISOR: type[Hypervisor] = LibvirtHypervisor
_AS_POLICY_STORE: type[PolicyStore] = LibvirtHypervisor
_AS_DEFINITIONS: type[DefinitionStore] = LibvirtHypervisor
_AS_LIFECYCLE: type[DomainLifecycle] = LibvirtHypervisor
