"""The audit log: every change vmshare makes, as JSON lines, append-only.

One record per change: time, who (user, pid, program part), what (VM,
backend or knob), before, after, reason, and the event that caused it.
Records are appended with O_APPEND in a single write() and fsync'd, so a
crash leaves at most one torn final line, which the reader skips and reports.
The file is created 0600: it names VMs and their sharing, operator data.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmshare.errors import AccessDenied
from vmshare.records.jsonlines import read_lines
from vmshare.records.schema import RecordError, decode, get_int, get_number, get_opt_str, get_str

DEFAULT_AUDIT_LOG = Path("/var/log/vmshare/audit.jsonl")
AUDIT_ENV = "VMSHARE_AUDIT_LOG"
_MAX_LINE = 64 * 1024


class AuditError(RecordError):
    """The audit log cannot be written or read."""


@dataclass(frozen=True)
class AuditRecord:
    time: float
    actor: str          # "cli", "daemon", "hook"
    user: str
    pid: int
    action: str         # "merge", "knob", "policy"
    target: str         # "VM/backend", "knob NAME", "VM"
    before: Any
    after: Any
    reason: str
    event: str | None = None
    vm: str | None = None
    id: str | None = None    # idempotency key: the same change is never logged twice
    # Keys this version does not know (a newer writer's), kept as read and written back.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """One line of JSON. Raises ValueError for a non-finite number."""
        doc = asdict(self)
        doc.pop("extra")
        doc.update((k, v) for k, v in self.extra.items() if k not in doc)
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


_REQUIRED_STR = ("actor", "user", "action", "target", "reason")
KNOWN_FIELDS = frozenset(("time", "pid", "before", "after", "event", "vm", "id",
                          *_REQUIRED_STR))


def parse_record(raw: bytes, what: str) -> AuditRecord:
    """Validate one audit line. Keys a newer writer added go to ``extra``.

    Raises AuditError naming ``what`` (file:line) and the problem.
    """
    doc = decode(raw, AuditError, what, max_bytes=_MAX_LINE)
    if not isinstance(doc, dict):
        raise AuditError(f"{what}: not a JSON object")
    for key in ("before", "after"):
        if key not in doc:
            raise AuditError(f"{what}: {key!r} is missing")
    text = {k: get_str(doc, k, AuditError, what) for k in _REQUIRED_STR}
    return AuditRecord(
        time=get_number(doc, "time", AuditError, what),
        actor=text["actor"], user=text["user"],
        pid=get_int(doc, "pid", AuditError, what, minimum=0),
        action=text["action"], target=text["target"],
        before=doc["before"], after=doc["after"], reason=text["reason"],
        event=get_opt_str(doc, "event", AuditError, what),
        vm=get_opt_str(doc, "vm", AuditError, what),
        id=get_opt_str(doc, "id", AuditError, what),
        extra={k: v for k, v in doc.items() if k not in KNOWN_FIELDS})


def audit_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(AUDIT_ENV, str(DEFAULT_AUDIT_LOG)))


def append_line(path: Path, line: bytes, *, fsync: bool = False,
                rotate_over: int | None = None) -> None:
    """Append one newline-terminated record to a JSON-lines file, as one write().

    The file is created 0600 (its directory 0700). Writers take turns under an
    exclusive flock, and a torn last line (a crash mid-write) is ended first so
    this record starts on a line of its own. With ``rotate_over``, a non-empty
    file this line would take past that many bytes is first renamed to
    ``<path>.1`` (replacing an older one). With ``fsync``, the data is on disk
    before this returns. The audit log and the savings history share this.

    Raises OSError (PermissionError when denied; strerror "short write" when
    the kernel took only part of the line).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if rotate_over is not None and size and size + len(line) > rotate_over:
            os.replace(path, path.with_name(path.name + ".1"))
            os.close(fd)
            fd = -1
            fd = os.open(path, flags, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size   # another writer may have begun the new file
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        if os.write(fd, line) != len(line):
            raise OSError(errno.EIO, "short write")
        if fsync:
            os.fsync(fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class AuditLog:
    """Append-only JSON-lines log. Errors: AuditError, AccessDenied."""

    def __init__(self, path: Path | None = None, actor: str = "cli") -> None:
        self.path = audit_path(path)
        self.actor = actor

    def record(self, action: str, target: str, before: Any, after: Any, reason: str, *,
               event: str | None = None, vm: str | None = None,
               id: str | None = None) -> AuditRecord:
        rec = AuditRecord(time=time.time(), actor=self.actor, user=_user(), pid=os.getpid(),
                          action=action, target=target, before=before, after=after,
                          reason=reason, event=event, vm=vm, id=id)
        self.append(rec)
        return rec

    def append(self, rec: AuditRecord) -> None:
        try:
            line = (rec.to_json() + "\n").encode()
        except ValueError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc}") from exc
        if len(line) > _MAX_LINE:
            raise AuditError(f"audit record too large ({len(line)} bytes)")
        try:
            append_line(self.path, line, fsync=True)
        except PermissionError as exc:
            raise AccessDenied(f"cannot write the audit log {self.path}: permission "
                               "denied") from exc
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror}") from exc

    def read(self) -> Iterator[AuditRecord | str]:
        """Records in order; a line that is not a valid record is yielded as a
        string describing the problem (a torn last line after a crash).

        Raises AccessDenied or AuditError (the file cannot be read)."""
        for item in read_lines(self.path, parse_record, AuditError,
                               f"the audit log {self.path}"):
            yield item if isinstance(item, AuditRecord) else f"{item} (record skipped)"

    def ids(self) -> set[str]:
        return {r.id for r in self.read() if isinstance(r, AuditRecord) and r.id}
