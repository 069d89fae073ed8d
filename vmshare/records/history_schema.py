"""The history database's schema: its versions, in order, and the SQL that reads
and aggregates samples. No I/O of its own: functions take a sqlite3 connection.

``PRAGMA user_version`` holds the schema version. Each migration takes a
database from version N-1 to N inside one transaction (DDL is transactional
in SQLite), so an interrupted migration leaves version N-1 as it was.

Version 1 (the first cut): raw samples only, the VM's name in every row.
Version 2: VM names in a table of their own (a raw row shrinks from a name
to a small integer), 5-minute and hourly aggregates, and ``meta`` for the
downsampling progress and the imports done.

What an aggregate means, per bucket of ``res`` seconds starting at ``bucket``:
``n`` samples were in it (per VM: the samples the VM was running in); for a
gauge (every VM figure; the host's page counts, ksm_zero_pages and
general_profit) the sum, min and max of the samples, so the mean is sum / n;
for a counter (the host's full_scans, which only grows) the last value.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

# Frozen as of version 2: a new field is a new migration.
HOST_GAUGES = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
               "ksm_zero_pages", "general_profit")
HOST_COUNTERS = ("full_scans",)
VM_GAUGES = ("saved_bytes", "ksm_pages", "ram_bytes", "zero_pages")
HOST_FIELDS = (*HOST_GAUGES, *HOST_COUNTERS)

RESOLUTIONS = (300, 3600)          # the aggregates kept, in seconds per bucket


def _cols(names: tuple[str, ...]) -> str:
    return ", ".join(f"{n} INTEGER" for n in names)


def _agg_cols(gauges: tuple[str, ...], counters: tuple[str, ...]) -> tuple[str, ...]:
    return (*[f"{g}_{part}" for g in gauges for part in ("sum", "min", "max")],
            *[f"{c}_last" for c in counters])


HOST_AGG_COLS = _agg_cols(HOST_GAUGES, HOST_COUNTERS)
VM_AGG_COLS = _agg_cols(VM_GAUGES, ())

_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    f"CREATE TABLE host_raw (time REAL PRIMARY KEY, {_cols(HOST_FIELDS)}) WITHOUT ROWID",
    f"CREATE TABLE vm_raw (time REAL NOT NULL, name TEXT NOT NULL, {_cols(VM_GAUGES)}, "
    "PRIMARY KEY (time, name)) WITHOUT ROWID",
)
_V2 = (
    "CREATE TABLE vm (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "INSERT INTO vm (name) SELECT DISTINCT name FROM vm_raw ORDER BY name",
    f"CREATE TABLE vm_raw2 (time REAL NOT NULL, vm INTEGER NOT NULL, {_cols(VM_GAUGES)}, "
    "PRIMARY KEY (time, vm)) WITHOUT ROWID",
    f"INSERT INTO vm_raw2 SELECT r.time, v.id, {', '.join('r.' + g for g in VM_GAUGES)} "
    "FROM vm_raw r JOIN vm v ON v.name = r.name",
    "DROP TABLE vm_raw",
    "ALTER TABLE vm_raw2 RENAME TO vm_raw",
    f"CREATE TABLE host_agg (res INTEGER NOT NULL, bucket INTEGER NOT NULL, "
    f"n INTEGER NOT NULL, {_cols(HOST_AGG_COLS)}, PRIMARY KEY (res, bucket)) WITHOUT ROWID",
    f"CREATE TABLE vm_agg (res INTEGER NOT NULL, bucket INTEGER NOT NULL, "
    f"vm INTEGER NOT NULL, n INTEGER NOT NULL, {_cols(VM_AGG_COLS)}, "
    "PRIMARY KEY (res, bucket, vm)) WITHOUT ROWID",
)
#: version N is reached by running MIGRATIONS[N - 1]
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was written by a newer vmshare (a version this one does not know)."""


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, upto: int = SCHEMA_VERSION,
            on_step: Callable[[int], None] | None = None) -> int:
    """Bring the database to version ``upto``, one transaction per version.

    Returns the version found. Raises SchemaTooNew, sqlite3.Error.
    ``conn`` must be in autocommit mode (isolation_level None).
    """
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(f"schema version {found}, newer than this vmshare's "
                           f"{SCHEMA_VERSION}")
    for version in range(found + 1, upto + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) >= version:     # another process got there first
                conn.execute("ROLLBACK")
                continue
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if on_step is not None:
            on_step(version)
    return found


# ---------------------------------------------------------------- aggregate SQL
def _gauge_exprs(gauges: tuple[str, ...]) -> list[str]:
    return [f"{fn}({g})" for g in gauges for fn in ("sum", "min", "max")]


def host_agg_select() -> str:
    """(bucket, n, host aggregate columns...) of raw samples in [:a, :b), per :res."""
    inner = ", ".join(["CAST(time / :res AS INTEGER) * :res AS bucket", "count(*) AS n",
                       "max(time) AS t_last", *[f"{e} AS c{i}" for i, e in
                                                enumerate(_gauge_exprs(HOST_GAUGES))]])
    outer = ["g.bucket", "g.n", *[f"g.c{i}" for i in range(3 * len(HOST_GAUGES))],
             *[f"(SELECT {c} FROM host_raw WHERE time = g.t_last)" for c in HOST_COUNTERS]]
    return (f"SELECT {', '.join(outer)} FROM (SELECT {inner} FROM host_raw "
            "WHERE time >= :a AND time < :b GROUP BY bucket) AS g ORDER BY g.bucket")


def vm_agg_select(names: bool) -> str:
    """(bucket, n, vm id or name, VM aggregate columns...) of raw samples in [:a, :b)."""
    who = "v.name" if names else "r.vm"
    join = " JOIN vm v ON v.id = r.vm" if names else ""
    cols = ", ".join(["CAST(r.time / :res AS INTEGER) * :res AS bucket", "count(*)", who,
                      *[e.replace("(", "(r.") for e in _gauge_exprs(VM_GAUGES)]])
    return (f"SELECT {cols} FROM vm_raw r{join} WHERE r.time >= :a AND r.time < :b "
            f"GROUP BY bucket, r.vm ORDER BY bucket")


def insert_aggregates(conn: sqlite3.Connection, res: int, a: float, b: float) -> None:
    """Aggregate raw samples in [a, b) into ``res``-second buckets (replacing any)."""
    args = {"res": res, "a": a, "b": b}
    host = ", ".join(("res", "bucket", "n", *HOST_AGG_COLS))
    conn.execute(f"INSERT OR REPLACE INTO host_agg ({host}) "
                 f"SELECT :res, * FROM ({host_agg_select()})", args)
    vm = ", ".join(("res", "bucket", "n", "vm", *VM_AGG_COLS))
    conn.execute(f"INSERT OR REPLACE INTO vm_agg ({vm}) "
                 f"SELECT :res, * FROM ({vm_agg_select(names=False)})", args)


def stored_host_aggs() -> str:
    return (f"SELECT bucket, n, {', '.join(HOST_AGG_COLS)} FROM host_agg "
            "WHERE res = :res AND bucket >= :a AND bucket < :b ORDER BY bucket")


def stored_vm_aggs() -> str:
    cols = ", ".join("g." + c for c in VM_AGG_COLS)
    return (f"SELECT g.bucket, g.n, v.name, {cols} FROM vm_agg g JOIN vm v ON v.id = g.vm "
            "WHERE g.res = :res AND g.bucket >= :a AND g.bucket < :b ORDER BY g.bucket")


# ---------------------------------------------------------------- rows to samples
def present(names: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    return {n: v for n, v in zip(names, values, strict=True) if v is not None}


def aggregate_row(gauges: Sequence[str], counters: Sequence[str], n: int,
               cols: Sequence[Any]) -> dict[str, dict[str, int]]:
    """Mean (rounded to a whole page or byte), min and max of each gauge, the
    last value of each counter, from one aggregate row's columns."""
    mean: dict[str, int] = {}
    low: dict[str, int] = {}
    high: dict[str, int] = {}
    n_per = len(gauges)
    for i, g in enumerate(gauges):
        total, lo, hi = cols[3 * i: 3 * i + 3]
        if total is not None:
            mean[g], low[g], high[g] = round(total / n), lo, hi
    for j, c in enumerate(counters):
        if cols[3 * n_per + j] is not None:
            mean[c] = cols[3 * n_per + j]
    return {"host": mean, "host_min": low, "host_max": high}
