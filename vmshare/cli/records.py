"""``vmshare history`` and ``vmshare report``: savings over time, as the daemon
recorded them, and the self-contained HTML report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmshare.cli.context import Context, emit_json, out, warn
from vmshare.cli.shown import HISTORY_AUTO_MAX_SAMPLES as AUTO_MAX_SAMPLES
from vmshare.cli.shown import HISTORY_RESOLUTIONS as RESOLUTION_CHOICES
from vmshare.errors import UsageError

if TYPE_CHECKING:
    from vmshare.records.history_query import Answer

MAX_ROWS = 10_000


def _history(config: str | None, since: float, resolution: str = "auto",
             ) -> tuple[Path, Answer | None, str]:
    """The history database's answer for ``since`` (None: no database yet), and
    the note to print when there is none. Raises VmshareError (one line)."""
    from vmshare.config import load_config
    from vmshare.records.history_db import HistoryCorrupt, HistoryDb
    from vmshare.records.history_query import answer
    d = load_config(config).daemon
    try:
        db = HistoryDb.open_reader(d.history_db)
    except FileNotFoundError:
        note = f"no history in {d.history_db} (the daemon records it every " \
               "[daemon] history_interval seconds)"
        if os.path.lexists(d.history_file):       # False, not an error, when unreadable
            note += f"; it imports {d.history_file} when it starts"
        return d.history_db, None, note
    except HistoryCorrupt as exc:
        raise HistoryCorrupt(f"{exc}: the daemon moves it aside and starts a new one at "
                             "its next sample") from exc
    try:
        return d.history_db, answer(db, since, resolution=resolution,
                                    raw_step=d.history_interval or 60.0), ""
    except HistoryCorrupt as exc:
        raise HistoryCorrupt(f"{exc}: the daemon moves it aside and starts a new one at "
                             "its next sample") from exc
    finally:
        db.close()


def cmd_history(ctx: Context) -> int:
    import time

    from vmshare.present.text import mib, table
    from vmshare.records import history
    a = ctx.args
    if not 1 <= a.rows <= MAX_ROWS:
        raise UsageError(f"--rows must be between 1 and {MAX_ROWS}, not {a.rows}")
    try:
        since = time.time() - history.parse_duration(a.since) if a.since else 0.0
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from exc
    path, ans, note = _history(a.config, since, a.resolution)
    if ans is not None and ans.lacks:
        warn(ans.lacks)
    if ans is not None and ans.gaps:
        warn(ans.gaps_note())
    if a.json:
        emit_json(ans.to_json() if ans is not None else
                  {"file": str(path), "resolution": None, "samples": [], "lacks": note},
                  compact=True)
        return 0
    samples = [] if ans is None else ans.samples
    if ans is None or not samples:
        out(note or f"no history in {path} since {a.since}")
        return 0
    names = sorted({n for s in samples for n in s.get("vms", {})})
    if a.domain:
        if a.domain not in names:
            raise UsageError(f"no history for {a.domain!r} in {path}")
        names = [a.domain]
    span = samples[-1]["time"] - samples[0]["time"]
    out(f"{len(samples)} samples over {span / 3600:.1f} h from {path} ({ans.label}"
        f"{'' if ans.resolution == 'raw' else ': means'})")
    for label, vm in [("host", None), *[(n, n) for n in names[:8]]]:
        s = history.summary(samples, vm)
        out(f"  {label:<20} {history.sparkline(history.downsample(s['series'], 40))}  "
            f"now {mib(s['last'])}, min {mib(s['min'])}, max {mib(s['max'])}")
    rows = []
    shown = names[:6]
    for rec in history.downsample(samples, a.rows):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["time"]))
        rows.append([when, mib(history.host_saved_bytes(rec)),
                     *[mib(history.vm_saved_bytes(rec, n)) for n in shown]])
    out()
    out(table(["TIME", "HOST SAVED", *[f"{n} SAVED" for n in shown]], rows,
              right=tuple(range(1, 2 + len(shown)))))
    return 0


def cmd_report(ctx: Context) -> int:
    import socket
    import time

    from vmshare.present import html as report_html
    from vmshare.records import history
    a = ctx.args
    host = ctx.observer().host()
    try:
        since = time.time() - history.parse_duration(a.since)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from exc
    _, ans, _ = _history(a.config, since)
    if ans is not None and ans.lacks:
        warn(ans.lacks)
    if ans is not None and ans.gaps:
        warn(ans.gaps_note())
    page = report_html.render(host, [] if ans is None else ans.samples,
                              hostname=socket.gethostname()).encode("utf-8")
    target = Path(a.html)
    # Operator data: 0600, written whole or not at all; a device or FIFO is
    # refused (see vmshare.records.atomic for why not write through it).
    from vmshare.records.atomic import AtomicWriteError, write_atomic
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {target}: no directory {target.parent}")
    try:
        write_atomic(target, page)
    except AtomicWriteError as exc:
        raise UsageError(str(exc)) from exc
    out(f"wrote {target} ({len(page):,} bytes)")
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("history", help="savings over time, as recorded by the daemon")
    s.add_argument("domain", nargs="?", metavar="DOMAIN", help="only this VM")
    s.add_argument("--since", metavar="DURATION", help="e.g. 30m, 6h, 2d (default: all)")
    s.add_argument("--rows", type=int, default=20,
                   help=f"table rows, 1 to {MAX_ROWS} (default 20)")
    s.add_argument("--config", metavar="PATH", help="host config naming the history file")
    s.add_argument("--resolution", choices=RESOLUTION_CHOICES, default="auto",
                   help="raw samples, 5-minute or hourly aggregates (default: auto, the "
                        "finest that holds the window in at most "
                        f"{AUTO_MAX_SAMPLES:,} samples)")
    s.add_argument("--json", action="store_true",
                   help="every sample at the resolution used, and what the history lacks")
    s.set_defaults(func=cmd_history)

    s = sub.add_parser("report", help="a self-contained HTML report (charts, matrix, history)")
    s.add_argument("--html", required=True, metavar="FILE", help="where to write it (0600)")
    s.add_argument("--since", default="24h", metavar="DURATION",
                   help="history shown (default 24h)")
    s.add_argument("--config", metavar="PATH", help="host config naming the history file")
    s.set_defaults(func=cmd_report)
