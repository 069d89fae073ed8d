"""Pure helpers shared by the libvirt and QMP adapters. No hypervisor imports.

Reading RAM backends takes two rounds of QMP:

1. ``query-memdev`` (sizes, merge, share, ...) and ``qom-list /objects``
   (the QOM type of every ``child<memory-backend-...>``);
2. ``followup_queries`` names the ``qom-get`` calls round 1 calls for
   (``mem-path`` of file backends, ``hugetlb`` of memfd backends);

then ``build_ram_backends`` joins it all into ``model.RamBackend``. Both
adapters run the rounds with their own transport, so the parsing lives here
once and is tested with recorded replies.

The module also parses the few facts vmshare needs from libvirt domain XML
(bounded, no DTDs or entities) and checks that a pid still belongs to a
given QEMU (``/proc/<pid>/cmdline``, read through ``ProcFs``), so numbers
are never attributed to a reused pid.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmshare.errors import HypervisorError, ProcessGone
from vmshare.ksm.procfs import MOUNTS_PATH as MOUNTS_PATH  # the adapters' defaults
from vmshare.ksm.procfs import PROC_ROOT as PROC_ROOT
from vmshare.ksm.procfs import ProcFs, mount_table
from vmshare.model import RamBackend

log = logging.getLogger(__name__)

BACKEND_TYPE_PREFIX = "memory-backend-"
MAX_DOMAIN_XML_BYTES = 4 * 1024 * 1024

# (command, arguments) of one QMP call.
QmpCall = tuple[str, dict[str, Any]]
# The one QOM property each backend type needs beyond query-memdev.
_FOLLOWUP_PROPERTY = {"memory-backend-file": "mem-path", "memory-backend-memfd": "hugetlb"}


# --- RAM backends -----------------------------------------------------------

def _bad_reply(command: str, reply: object, why: str) -> HypervisorError:
    return HypervisorError(f"unexpected {command} reply ({why}): {str(reply)[:200]}")


def backend_types(qom_list_reply: Any) -> dict[str, str]:
    """Map backend id -> QOM type from ``qom-list /objects``.

    Only ``child<memory-backend-...>`` entries are kept; other objects
    (iothreads, secrets, rng backends, ...) are ignored.
    Raises HypervisorError when the reply is not a list of properties.
    """
    if not isinstance(qom_list_reply, list):
        raise _bad_reply("qom-list", qom_list_reply, "not a list")
    types: dict[str, str] = {}
    for prop in qom_list_reply:
        if not isinstance(prop, dict):
            raise _bad_reply("qom-list", qom_list_reply, "entry is not an object")
        name, ptype = prop.get("name"), prop.get("type")
        if not isinstance(name, str) or not isinstance(ptype, str):
            raise _bad_reply("qom-list", qom_list_reply, "entry without name/type")
        if ptype.startswith("child<") and ptype.endswith(">"):
            qom_type = ptype[len("child<"):-1]
            if qom_type.startswith(BACKEND_TYPE_PREFIX):
                types[name] = qom_type
    return types


def _memdev_entries(memdev_reply: Any) -> list[dict[str, Any]]:
    if not isinstance(memdev_reply, list):
        raise _bad_reply("query-memdev", memdev_reply, "not a list")
    entries: list[dict[str, Any]] = []
    for entry in memdev_reply:
        if not isinstance(entry, dict):
            raise _bad_reply("query-memdev", memdev_reply, "entry is not an object")
        entries.append(entry)
    return entries


def followup_queries(memdev_reply: Any,
                     types: Mapping[str, str]) -> dict[tuple[str, str], QmpCall]:
    """The ``qom-get`` calls needed to finish the backends of ``memdev_reply``,
    keyed by (backend id, property) as ``build_ram_backends`` wants the answers.

    File backends need ``mem-path`` (to tell hugetlbfs from other files);
    memfd backends need ``hugetlb``.
    """
    calls: dict[tuple[str, str], QmpCall] = {}
    for entry in _memdev_entries(memdev_reply):
        backend_id = entry.get("id")
        if not isinstance(backend_id, str):
            continue
        prop = _FOLLOWUP_PROPERTY.get(types.get(backend_id, ""))
        if prop is not None:
            calls[(backend_id, prop)] = (
                "qom-get", {"path": f"/objects/{backend_id}", "property": prop})
    return calls


def _flag(entry: Mapping[str, Any], key: str, default: bool, reply: object) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise _bad_reply("query-memdev", reply, f"{key!r} is not a boolean")
    return value


def build_ram_backends(memdev_reply: Any, types: Mapping[str, str],
                       properties: Mapping[tuple[str, str], Any],
                       mounts: Sequence[Mount]) -> list[RamBackend]:
    """Join ``query-memdev`` entries with their QOM types and extra properties.

    ``properties`` maps (backend id, property) to the ``qom-get`` result of
    each call ``followup_queries`` asked for. A memdev without an ``id``
    (optional in the QAPI schema, always set by QEMU for objects under
    /objects) cannot be addressed by ``qom-set`` and is skipped with a
    warning. A backend missing from ``qom-list /objects`` keeps the type
    "memory-backend-unknown", which ``RamBackend.ineligible_reason`` reports
    as not eligible rather than guessing.
    Raises HypervisorError on a malformed reply.
    """
    backends: list[RamBackend] = []
    for entry in _memdev_entries(memdev_reply):
        backend_id = entry.get("id")
        if not isinstance(backend_id, str) or not backend_id:
            log.warning("query-memdev entry without an id ignored: %s", entry)
            continue
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad_reply("query-memdev", memdev_reply, f"bad size for {backend_id!r}")
        qom_type = types.get(backend_id, "memory-backend-unknown")
        mem_path: str | None = None
        hugetlb = False
        if qom_type == "memory-backend-file":
            raw_path = properties.get((backend_id, "mem-path"))
            if not isinstance(raw_path, str):
                raise _bad_reply("qom-get", raw_path, f"mem-path of {backend_id!r}")
            mem_path = raw_path
            hugetlb = fstype_of(mem_path, mounts) == "hugetlbfs"
        elif qom_type == "memory-backend-memfd":
            raw_huge = properties.get((backend_id, "hugetlb"))
            if not isinstance(raw_huge, bool):
                raise _bad_reply("qom-get", raw_huge, f"hugetlb of {backend_id!r}")
            hugetlb = raw_huge
        backends.append(RamBackend(
            id=backend_id,
            size=size,
            merge=_flag(entry, "merge", False, memdev_reply),
            qom_type=qom_type,
            share=_flag(entry, "share", False, memdev_reply),
            mem_path=mem_path,
            hugetlb=hugetlb,
        ))
    backends.sort(key=lambda b: b.id)
    return backends


def merge_set_call(backend_id: str, merge: bool) -> QmpCall:
    """The ``qom-set`` that turns MADV_MERGEABLE on or off for one backend."""
    if not backend_id or "/" in backend_id:
        raise HypervisorError(f"invalid memory backend id {backend_id!r}")
    return ("qom-set", {"path": f"/objects/{backend_id}", "property": "merge",
                        "value": merge})


# --- mounts ---------------------------------------------------------------------

@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/mounts (or /proc/self/mounts) text."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(_unescape_mount_field(fields[1]), fields[2]))
    return mounts


def read_mounts(path: str = MOUNTS_PATH) -> list[Mount]:
    """Read (through ksm/'s procfs) and parse the mount table. Raises ProcfsError."""
    return parse_mounts(mount_table(path))


def fstype_of(path: str, mounts: Sequence[Mount]) -> str | None:
    """File system type of the mount holding ``path`` (longest prefix, last wins)."""
    path = os.path.normpath(path)
    best: Mount | None = None
    for mount in mounts:
        mp = os.path.normpath(mount.mount_point)
        inside = path == mp or path.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(os.path.normpath(best.mount_point))):
            best = mount
    return best.fstype if best else None


# --- domain XML -----------------------------------------------------------------

@dataclass(frozen=True)
class DomainXmlFacts:
    name: str
    uuid: str
    nosharepages: bool
    launch_security: bool
    memory_bytes: int


_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1024, "kib": 1024,
    "mb": 1000**2, "m": 1024**2, "mib": 1024**2,
    "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
    "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
    "pb": 1000**5, "p": 1024**5, "pib": 1024**5,
    "eb": 1000**6, "e": 1024**6, "eib": 1024**6,
}


def parse_domain_xml(xml: str) -> DomainXmlFacts:
    """Facts from a libvirt domain XML document (untrusted input).

    Bounded: documents over 4 MiB and any DOCTYPE/ENTITY declaration are
    rejected before parsing. Raises HypervisorError on malformed XML.
    """
    if len(xml) > MAX_DOMAIN_XML_BYTES:
        raise HypervisorError(f"domain XML too large ({len(xml)} bytes)")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise HypervisorError("domain XML with DOCTYPE/ENTITY declarations refused")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise HypervisorError(f"malformed domain XML: {exc}") from exc
    if root.tag != "domain":
        raise HypervisorError(f"not a domain XML document (root <{root.tag}>)")
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip().lower()
    memory_bytes = 0
    memory = root.find("memory")
    if memory is not None:
        unit = (memory.get("unit") or "KiB").lower()
        if unit not in _UNITS:
            raise HypervisorError(f"domain XML: unknown memory unit {unit!r}")
        try:
            memory_bytes = int((memory.text or "0").strip()) * _UNITS[unit]
        except ValueError as exc:
            raise HypervisorError(f"domain XML: bad <memory> {memory.text!r}") from exc
    return DomainXmlFacts(
        name=name,
        uuid=uuid,
        nosharepages=root.find("memoryBacking/nosharepages") is not None,
        launch_security=root.find("launchSecurity") is not None,
        memory_bytes=memory_bytes,
    )


# --- pid ownership --------------------------------------------------------------

def _qemu_name_option(value: str) -> str:
    """The guest name in a ``-name`` value (``guest=N,debug-threads=on`` or ``N``).

    QEMU option values escape a literal comma as ",,".
    """
    parts: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                parts.append(",")
                i += 2
                continue
            break
        parts.append(value[i])
        i += 1
    first = "".join(parts)
    return first[len("guest="):] if first.startswith("guest=") else first


def _option_paths(arg: str) -> list[str]:
    """Socket paths named in one QEMU option value (``unix:P,...``, ``path=P``)."""
    paths = []
    for part in arg.split(","):
        for prefix in ("unix:", "path="):
            if part.startswith(prefix) and len(part) > len(prefix):
                paths.append(part[len(prefix):])
    return paths


def cmdline_matches_vm(argv: Sequence[str], name: str | None, uuid: str | None,
                       socket_path: str | None = None, cwd: str | None = None) -> bool:
    """True when argv is a QEMU started for this VM.

    Matches ``-name [guest=]NAME``, ``-uuid UUID``, or (for a plain QEMU) the
    QMP socket path in a ``-qmp unix:P`` / ``-chardev socket,path=P`` value,
    relative paths resolved against the process's ``cwd``.
    """
    want = os.path.realpath(socket_path) if socket_path else None
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("-name", "--name") and nxt is not None and name \
                and _qemu_name_option(nxt) == name:
            return True
        if arg in ("-uuid", "--uuid") and nxt is not None and uuid \
                and nxt.lower() == uuid.lower():
            return True
        if want is not None and i > 0:
            for path in _option_paths(arg):
                full = os.path.join(cwd or "/", path)
                if os.path.normpath(full) == want or os.path.realpath(full) == want:
                    return True
    return False


def verify_pid(pid: int, name: str | None, uuid: str | None, *,
               socket_path: str | None = None, proc_root: str = PROC_ROOT) -> int:
    """Return ``pid`` if it still runs this VM's QEMU, else raise ProcessGone.

    Raises ProcessGone (gone or reused pid), AccessDenied, ProcfsError.
    """
    procfs = ProcFs(proc_root)
    argv = procfs.cmdline(pid)
    # Absolute socket paths match without it.
    cwd = procfs.cwd(pid) if socket_path is not None else None
    if not cmdline_matches_vm(argv, name, uuid, socket_path, cwd):
        who = name or uuid or socket_path
        raise ProcessGone(f"pid {pid} no longer belongs to the QEMU of {who} "
                          f"(pid reused: {argv[0]!r})")
    return pid
