"""The daemon's side of the history database: open it, import the JSON-lines
history earlier versions wrote, record samples, run retention, and recover
from a damaged file.

Import (the first start after an upgrade): ``<legacy>.1`` then ``<legacy>``
are read into the database in batches, each its own transaction; a sample
already stored (same time) is left alone, so an import cut short runs again
from the top at the next start and adds only what is missing. Once a file is
in, the database notes it (by inode, size and mtime) and the file is renamed
to ``<name>.imported`` beside it: kept, never deleted.

A damaged database (not a database, or a malformed page found by the check
at open or by any later statement) is renamed aside as
``<name>.corrupt-YYYYmmddTHHMMSS`` (with its -wal and -shm), logged and
audited, and a new one is started; the daemon keeps running. A database
written by a newer vmshare (or one that cannot be opened) is left alone and
tried again REOPEN_AFTER_S later: history is off until it is dealt with.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmshare.config import DaemonSettings
from vmshare.errors import VmshareError
from vmshare.records.audit import AuditLog
from vmshare.records.history import HistoryError, LegacyHistory
from vmshare.records.history_db import MAINTAIN_EVERY_S, HistoryCorrupt, HistoryDb, Retention

log = logging.getLogger("vmshare.history")
IMPORT_BATCH = 500              # samples per transaction
REOPEN_AFTER_S = 300.0          # a database that cannot be opened is tried again after
SIDECARS = ("-wal", "-shm")


def retention(d: DaemonSettings) -> Retention:
    """The [daemon] history_*_days settings, in seconds."""
    return Retention(raw=d.history_raw_days * 86400, five_min=d.history_5min_days * 86400,
                     hourly=d.history_hourly_days * 86400)


def _aside_name(path: Path, tag: str, now: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    candidate = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{tag}-{stamp}.{n}")
    return candidate


def move_aside(path: Path, now: float) -> Path:
    """Rename a damaged database (and its -wal, -shm) to ``<name>.corrupt-STAMP``.

    Only a regular file is moved. Raises HistoryError when it cannot be.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise HistoryError(f"cannot move {path} aside: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise HistoryError(f"cannot move {path} aside: it is not a regular file")
    target = _aside_name(path, "corrupt", now)
    try:
        for suffix in SIDECARS:       # first, so a new database never meets an old WAL
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.rename(side, target.with_name(target.name + suffix))
        os.rename(path, target)
    except OSError as exc:
        raise HistoryError(f"cannot move {path} aside: {exc.strerror}") from exc
    return target


def _identity(path: Path) -> str:
    st = os.stat(path)
    return f"imported:{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def import_legacy(db: HistoryDb, legacy: Path, now: float) -> int:
    """Import ``legacy`` (and its .1) into ``db``; rename each file imported to
    ``<name>.imported``. Returns the samples added. Raises HistoryError,
    HistoryCorrupt, AccessDenied."""
    source = LegacyHistory(legacy)
    added, first = 0, None
    for path in source.files():
        if not path.is_file() or path.resolve() == db.path.resolve():
            continue
        key = _identity(path)
        if db.meta(key) is None:
            for batch in _batches(source.read(path), IMPORT_BATCH):
                added += db.append_many(batch)
                first = min(first or batch[0]["time"], *(s["time"] for s in batch))
            if first is not None:
                db.refold_from(first)
            with db._transaction() as conn:
                db.set_meta(conn, key, repr(now))
        target = path.with_name(path.name + ".imported")
        if target.exists():
            target = _aside_name(path, "imported", now)
        try:
            os.rename(path, target)
        except OSError as exc:
            raise HistoryError(f"imported {path} but cannot rename it: {exc.strerror}") from exc
        log.info("imported the JSON-lines history %s into %s (%d lines skipped); kept it "
                 "as %s", path, db.path, source.skipped, target)
    return added


def _batches(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class HistoryKeeper:
    """Owns the daemon's history database. Call :meth:`record` from one thread."""

    def __init__(self, path: Path, legacy: Path | None, keep: Retention, audit: AuditLog,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.legacy = legacy
        self.keep = keep
        self.audit = audit
        self.clock = clock
        self.db: HistoryDb | None = None
        self._next_maintain = 0.0
        self._reopen_at = 0.0
        self.dropped = 0                # samples not recorded while waiting to reopen

    def record(self, sample: dict[str, Any]) -> None:
        """Store one sample and run retention when due. A damaged database is
        moved aside and replaced (then the sample goes to the new one).

        Raises HistoryError or AccessDenied for what cannot be recovered here
        (the caller logs it). A database that cannot be opened (a newer schema,
        permissions) is tried again only REOPEN_AFTER_S later, so the log gets
        a line per attempt, not per sample; the samples in between are dropped.
        """
        if self.db is None and self.clock() < self._reopen_at:
            self.dropped += 1
            return
        try:
            self._record(sample)
        except HistoryCorrupt as exc:
            self._replace(exc)
            self._record(sample)

    def _record(self, sample: dict[str, Any]) -> None:
        db = self._open()
        db.append(sample)
        now = self.clock()
        if now >= self._next_maintain:
            more = db.maintain(now, self.keep)
            self._next_maintain = now + (0.0 if more else MAINTAIN_EVERY_S)

    def _open(self) -> HistoryDb:
        if self.db is None:
            try:
                db = HistoryDb.open_writer(self.path)
            except HistoryCorrupt:
                raise
            except VmshareError as exc:
                self._reopen_at = self.clock() + REOPEN_AFTER_S
                raise HistoryError(f"{exc}; trying again in {REOPEN_AFTER_S:g} s") from exc
            try:
                if self.legacy is not None:
                    import_legacy(db, self.legacy, self.clock())
            except VmshareError:
                db.close()
                raise
            self.db = db
        return self.db

    def _replace(self, exc: HistoryCorrupt) -> None:
        self.close()
        target = move_aside(self.path, self.clock())
        log.error("%s: moved it aside as %s and started a new one", exc, target)
        self.audit.record("history", str(self.path), str(self.path), str(target),
                          f"{exc}: moved aside, a new database started")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
