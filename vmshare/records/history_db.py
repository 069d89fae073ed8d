"""The savings history as an SQLite database (stdlib sqlite3, one file).

The daemon writes a raw sample every ``[daemon] history_interval`` seconds
(one transaction each) and, from time to time, runs :meth:`HistoryDb.maintain`:
it folds raw samples into 5-minute and hourly aggregates (the meaning of an
aggregate is in history_schema) and drops what is past its retention, in
small transactions so a reader or the next sample never waits long. Raw
samples are dropped only once both aggregates hold them.

WAL mode: ``vmshare history`` and ``vmshare report`` read while the daemon
writes, each reader seeing the last committed state; a writer that finds the
database busy waits up to BUSY_TIMEOUT_S. Readers open the file read-only
and never create it.

A query answers at one resolution: raw samples, 5-minute or hourly
aggregates. Buckets the daemon has not folded yet are computed from the raw
samples on the fly, so an answer runs up to the last sample at every
resolution. Errors: HistoryError (HistoryCorrupt for a damaged file,
HistoryTooNew for a newer schema), AccessDenied.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmshare.errors import AccessDenied
from vmshare.records import history_schema as hs
from vmshare.records.history import HistoryError

BUSY_TIMEOUT_S = 10.0
#: resolution names, as --resolution takes them, and their bucket seconds (raw: 0)
RESOLUTIONS = {"raw": 0, "5m": 300, "1h": 3600}
LABELS = {"raw": "raw samples", "5m": "5-minute aggregates", "1h": "hourly aggregates"}
#: between the keeper's retention runs once caught up (a query allows that much
#: lag in the aggregates before it calls a stretch a gap)
MAINTAIN_EVERY_S = 300.0
CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class HistoryCorrupt(HistoryError):
    """The history database is damaged or not a database at all."""


class HistoryTooNew(HistoryError):
    """The history database was written by a newer vmshare."""


@dataclass(frozen=True)
class Retention:
    """How long each resolution is kept, in seconds."""

    raw: float = 7 * 86400.0
    five_min: float = 90 * 86400.0
    hourly: float = 730 * 86400.0


def _mapped(path: Path, doing: str, exc: sqlite3.Error) -> HistoryError | AccessDenied:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in CORRUPT_CODES:
        return HistoryCorrupt(f"history database {path} is damaged ({exc})")
    if code in (sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY) or (
            code == sqlite3.SQLITE_CANTOPEN and not os.access(path, os.R_OK)):
        return AccessDenied(f"cannot {doing} {path}: permission denied")
    return HistoryError(f"cannot {doing} history database {path}: {exc}")


class HistoryDb:
    """One connection to the history database. Not shared between threads."""

    def __init__(self, path: Path, conn: sqlite3.Connection, writable: bool) -> None:
        self.path = path
        self.conn = conn
        self.writable = writable
        self._vm_ids: dict[str, int] = {}

    # ------------------------------------------------------------ opening
    @classmethod
    def open_writer(cls, path: Path, check: bool = True) -> HistoryDb:
        """Open (creating it 0600 in a 0700 directory) and migrate to the current schema.

        With ``check``, PRAGMA quick_check runs first. Raises HistoryCorrupt,
        HistoryTooNew, HistoryError, AccessDenied.
        """
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except PermissionError as exc:
            raise AccessDenied(f"cannot create {path}: permission denied") from exc
        except OSError as exc:
            raise HistoryError(f"cannot create {path}: {exc.strerror}") from exc
        db = cls(path, cls._connect(path, "rwc"), writable=True)
        try:
            db._prepare(check)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, check: bool) -> None:
        db, path = self, self.path
        with db._errors("open"):
            if check:
                problem = db.conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                if problem != "ok":
                    raise HistoryCorrupt(f"history database {path} is damaged ({problem})")
            db.conn.execute("PRAGMA journal_mode = WAL")
            db.conn.execute("PRAGMA synchronous = NORMAL")
            try:
                hs.migrate(db.conn)
            except hs.SchemaTooNew as exc:
                raise HistoryTooNew(f"history database {path} has {exc}") from exc

    @classmethod
    def open_reader(cls, path: Path) -> HistoryDb:
        """Open read-only (never creating the file). Raises FileNotFoundError,
        HistoryCorrupt, HistoryTooNew, HistoryError, AccessDenied."""
        path = Path(path)
        try:
            os.stat(path)      # FileNotFoundError passes: no history yet
        except PermissionError as exc:
            raise AccessDenied(f"cannot read {path}: permission denied") from exc
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise HistoryError(f"cannot read {path}: {exc.strerror}") from exc
        db = cls(path, cls._connect(path, "ro"), writable=False)
        try:
            with db._errors("read"):
                version = hs.schema_version(db.conn)
        except BaseException:
            db.close()
            raise
        if version != hs.SCHEMA_VERSION:
            db.close()
            if version > hs.SCHEMA_VERSION:
                raise HistoryTooNew(f"history database {path} has schema version {version}, "
                                    f"newer than this vmshare's {hs.SCHEMA_VERSION}")
            raise HistoryError(f"history database {path} has schema version {version}; "
                               "the daemon migrates it when it starts")
        return db

    @staticmethod
    def _connect(path: Path, mode: str) -> sqlite3.Connection:
        uri = f"{path.absolute().as_uri()}?mode={mode}"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _mapped(path, "open", exc) from exc
        return conn

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise _mapped(self.path, doing, exc) from exc

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: every query inside sees the same committed state
        (a fold or a drop committed between two of them would tear a sample)."""
        with self._errors("read"):
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                self.conn.execute("COMMIT")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._errors("write"):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                self._vm_ids.clear()        # ids of VM rows the rollback took back
                raise
            self.conn.execute("COMMIT")

    # ------------------------------------------------------------ writing
    def append(self, sample: dict[str, Any]) -> None:
        """One sample (the format vmshare.records.history.parse_sample reads), one
        transaction. Raises HistoryCorrupt, HistoryError, AccessDenied."""
        self.append_many([sample])

    def append_many(self, samples: Iterable[dict[str, Any]]) -> int:
        """Samples in one transaction; a sample whose time is already stored is
        left as it is (so an import can run again). Returns how many were new."""
        host_sql = (f"INSERT OR IGNORE INTO host_raw (time, {', '.join(hs.HOST_FIELDS)}) "
                    f"VALUES ({', '.join('?' * (1 + len(hs.HOST_FIELDS)))})")
        vm_sql = (f"INSERT OR IGNORE INTO vm_raw (time, vm, {', '.join(hs.VM_GAUGES)}) "
                  f"VALUES ({', '.join('?' * (2 + len(hs.VM_GAUGES)))})")
        added = 0
        try:
            with self._transaction() as conn:
                for s in samples:
                    t = float(s["time"])
                    host = s.get("host", {})
                    cur = conn.execute(host_sql, (t, *[host.get(f) for f in hs.HOST_FIELDS]))
                    if cur.rowcount != 1:
                        continue
                    added += 1
                    conn.executemany(vm_sql, [
                        (t, self._vm_id(name), *[fig.get(f) for f in hs.VM_GAUGES])
                        for name, fig in s.get("vms", {}).items()])
        except (OverflowError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # a figure past 64 bits or of the wrong type: the whole batch is refused
            raise HistoryError(f"cannot store a sample in {self.path}: {exc!r}") from exc
        return added

    def _vm_id(self, name: str) -> int:
        if name not in self._vm_ids:
            self.conn.execute("INSERT OR IGNORE INTO vm (name) VALUES (?)", (name,))
            row = self.conn.execute("SELECT id FROM vm WHERE name = ?", (name,)).fetchone()
            self._vm_ids[name] = int(row[0])
        return self._vm_ids[name]

    def meta(self, key: str) -> str | None:
        with self._errors("read"):
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def folded(self, res: int) -> float:
        """Raw samples before this time are in the ``res``-second aggregates."""
        return float(self.meta(f"folded:{res}") or 0.0)

    def refold_from(self, t: float) -> None:
        """Samples from ``t`` on were added late (an import): fold them again."""
        with self._transaction() as conn:
            for res in hs.RESOLUTIONS:
                if self.folded(res) > t:
                    self.set_meta(conn, f"folded:{res}", repr(float(int(t // res) * res)))

    # ------------------------------------------------------------ retention
    def maintain(self, now: float, keep: Retention, budget_s: float = 0.5,
                 chunk_s: float = 3600.0) -> bool:
        """Fold complete buckets, then drop what is past its retention, one
        ``chunk_s`` span per transaction, for at most about ``budget_s``.

        Returns True when work remains (call again soon). Raises HistoryCorrupt,
        HistoryError, AccessDenied.
        """
        deadline = time.monotonic() + budget_s
        for step in self._steps(now, keep, chunk_s):
            with self._transaction() as conn:
                step(conn)
            if time.monotonic() > deadline:
                return True
        return False

    def _steps(self, now: float, keep: Retention, chunk_s: float) -> Iterator[Any]:
        """Each step is one transaction's work. A generator: each bound is read
        after the step before has committed, and empty spans are skipped (one
        stray old sample must not mean a step per empty hour since)."""
        for res in hs.RESOLUTIONS:
            complete = float(int(now // res) * res)
            done = self.folded(res)
            while done < complete:
                nxt = self._first_raw(done)
                a = complete if nxt is None else max(done, float(int(nxt // res) * res))
                b = min(complete, a + max(res, int(chunk_s // res) * res))

                def fold(conn: sqlite3.Connection, res: int = res, a: float = a,
                         b: float = b) -> None:
                    if a < b:
                        hs.insert_aggregates(conn, res, a, b)
                    self.set_meta(conn, f"folded:{res}", repr(b))
                yield fold
                done = b
        raw_until = min([now - keep.raw, *[self.folded(r) for r in hs.RESOLUTIONS]])
        yield from self._drops(("host_raw", "vm_raw"), "time", raw_until, chunk_s, "")
        for res, kept in ((300, keep.five_min), (3600, keep.hourly)):
            yield from self._drops(("host_agg", "vm_agg"), "bucket", now - kept, chunk_s * 24,
                                   f" AND res = {res:d}")

    def _drops(self, tables: tuple[str, str], col: str, until: float, chunk_s: float,
               where: str) -> Iterator[Any]:
        """Delete rows older than ``until`` from the host table and its VM table,
        ``chunk_s`` of them per step, starting from the oldest row left."""
        host = tables[0]
        while True:
            with self._errors("read"):
                oldest = self.conn.execute(f"SELECT min({col}) FROM {host} WHERE 1{where}"
                                           ).fetchone()[0]
            if oldest is None or oldest >= until:
                return
            b = min(until, oldest + chunk_s)

            def drop(conn: sqlite3.Connection, b: float = b) -> None:
                for table in tables:
                    conn.execute(f"DELETE FROM {table} WHERE {col} < ?{where}", (b,))
            yield drop

    def _first_raw(self, after: float = 0.0) -> float | None:
        """The first raw sample at or after ``after``."""
        with self._errors("read"):
            row = self.conn.execute("SELECT min(time) FROM host_raw WHERE time >= ?",
                                    (after,)).fetchone()
        return None if row[0] is None else float(row[0])


    def _first_agg(self, res: int) -> float | None:
        with self._errors("read"):
            row = self.conn.execute("SELECT min(bucket) FROM host_agg WHERE res = ?",
                                    (res,)).fetchone()
        return None if row[0] is None else float(row[0])

    # ------------------------------------------------------------ reading
    def starts(self) -> dict[str, float | None]:
        """Where each resolution's history starts (None: nothing at all)."""
        raw = self._first_raw()
        out: dict[str, float | None] = {"raw": raw}
        for name, res in (("5m", 300), ("1h", 3600)):
            firsts = [t for t in (self._first_agg(res),
                                  None if raw is None else float(int(raw // res) * res))
                      if t is not None]
            out[name] = min(firsts, default=None)
        return out

    def count_raw(self, since: float) -> int:
        with self._errors("read"):
            return int(self.conn.execute("SELECT count(*) FROM host_raw WHERE time > ?",
                                         (since,)).fetchone()[0])

    def samples(self, resolution: str, since: float) -> list[dict[str, Any]]:
        """Samples newer than ``since`` at ``resolution`` ("raw", "5m", "1h"),
        oldest first. Raises HistoryCorrupt, HistoryError."""
        with self._errors("read"):
            if self.conn.in_transaction:
                return self._samples(resolution, since)
            with self.snapshot():
                return self._samples(resolution, since)

    def _samples(self, resolution: str, since: float) -> list[dict[str, Any]]:
        if resolution == "raw":
            return self._raw(since)
        return self._aggregates(RESOLUTIONS[resolution], since)

    def _raw(self, since: float) -> list[dict[str, Any]]:
        by_time: dict[float, dict[str, Any]] = {}
        cur = self.conn.execute(f"SELECT time, {', '.join(hs.HOST_FIELDS)} FROM host_raw "
                                "WHERE time > ? ORDER BY time", (since,))
        for t, *values in cur:
            by_time[t] = {"time": t, "host": hs.present(hs.HOST_FIELDS, values), "vms": {}}
        figures = ", ".join("r." + f for f in hs.VM_GAUGES)
        cur = self.conn.execute(f"SELECT r.time, v.name, {figures} FROM vm_raw r "
                                "JOIN vm v ON v.id = r.vm WHERE r.time > ?", (since,))
        for t, name, *values in cur:
            if t in by_time:
                by_time[t]["vms"][name] = hs.present(hs.VM_GAUGES, values)
        return list(by_time.values())

    def _aggregates(self, res: int, since: float) -> list[dict[str, Any]]:
        start = float(int(since // res) * res)
        folded = self.folded(res)
        stored = {"res": res, "a": start, "b": folded}
        live = {"res": res, "a": max(start, folded), "b": float("inf")}
        by_bucket: dict[int, dict[str, Any]] = {}
        for sql, args in ((hs.stored_host_aggs(), stored), (hs.host_agg_select(), live)):
            for bucket, n, *cols in self.conn.execute(sql, args):
                by_bucket[bucket] = {"time": float(bucket), "span": res, "n": n,
                                     **hs.aggregate_row(hs.HOST_GAUGES, hs.HOST_COUNTERS, n, cols),
                                     "vms": {}, "vms_min": {}, "vms_max": {}}
        for sql, args in ((hs.stored_vm_aggs(), stored), (hs.vm_agg_select(True), live)):
            for bucket, n, name, *cols in self.conn.execute(sql, args):
                rec = by_bucket.get(bucket)
                if rec is not None:
                    agg = hs.aggregate_row(hs.VM_GAUGES, (), n, cols)
                    for part in ("", "_min", "_max"):
                        rec["vms" + part][name] = agg["host" + part]
        return list(by_bucket.values())
