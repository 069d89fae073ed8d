"""Fuzzing every parser of outside input: the formats, the generators, the oracle.

Shared by tests/test_fuzz_inputs.py (bounded examples in the normal run) and
benchmarks/fuzz_inputs.py (a longer run that keeps every failing case under
tests/data/bad_inputs/<format>/).

The oracle, for one format and one input: the parser answers within
TIME_BOUND seconds with either a value that the code after it can use (each
format's ``use`` step: write it back, sum it, print it as strict JSON) or
that format's VmshareError subclass. Any other exception, or a slower
answer, is a failure.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from vmshare.config import load_config
from vmshare.daemon import spool
from vmshare.errors import PolicyError, VmshareError
from vmshare.observe.remerge import StateFileError, parse_state
from vmshare.records import history
from vmshare.records.audit import AuditError, parse_record

TIME_BOUND = 2.0
BAD_INPUTS = Path(__file__).resolve().parent / "data" / "bad_inputs"


def _use_spool(data: bytes, entry: str) -> None:
    event = spool.parse_event(data, entry=entry)
    assert isinstance(event.domain, str) and event.domain
    assert isinstance(event.seq, int) and isinstance(event.time, float)
    spool._order([event, event])   # the ordering the drain applies
    json.dumps(event.__dict__, allow_nan=False)


def _use_state(data: bytes) -> None:
    doc = parse_state(data, "state.json")
    from vmshare.daemon.state import StateStore
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.json"
        path.write_bytes(data)
        store = StateStore(path)
        assert store.doc["vms"].keys() == doc["vms"].keys()
        for name in store.names():
            store.observe(name, "u", 1, 1, now=1e9)
        store.prune(now=2e9)
        store.pendings()
        store.save()


def _use_audit(data: bytes) -> None:
    rec = parse_record(data, "audit.jsonl:1")
    json.loads(rec.to_json())


def _use_history(data: bytes) -> None:
    rec = history.parse_sample(data, "history.jsonl:1")
    for vm in [None, *rec.get("vms", {})]:
        s = history.summary([rec, rec], vm)
        history.sparkline(s["series"])
    json.dumps(rec, allow_nan=False)


def _use_config(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vmshare.toml"
        path.write_bytes(data)
        cfg = load_config(path)
        assert cfg.daemon.spool_dir.is_absolute()


@dataclass(frozen=True)
class Format:
    name: str
    use: Callable[[bytes], None]
    error: type[VmshareError]


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("spool", lambda d: _use_spool(d, "1-1-x.json"), spool.SpoolEntryError),
    Format("datagram", lambda d: _use_spool(d, ""), spool.SpoolEntryError),
    Format("state", _use_state, StateFileError),
    Format("audit", _use_audit, AuditError),
    Format("history", _use_history, history.HistoryError),
    Format("config", _use_config, PolicyError),
)}


def check(fmt: str, data: bytes) -> str | None:
    """None when ``data`` is handled well; otherwise what went wrong (one line)."""
    spec = FORMATS[fmt]
    started = time.monotonic()
    try:
        spec.use(data)
    except spec.error:
        pass
    except Exception as exc:   # the point: anything else escaping is the bug
        return f"{type(exc).__name__} escaped: {str(exc)[:200]}"
    took = time.monotonic() - started
    if took > TIME_BOUND:
        return f"took {took:.2f} s (bound {TIME_BOUND} s)"
    return None


# -- generators ------------------------------------------------------------------

POISON_NUMBERS = ["1" * 5000, "-" + "9" * 4301, "1e999", "-1e999", "NaN", "Infinity",
                  "-Infinity", "1e308", "-0", "0.0", "1E400", str(2**64), "-1"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                    allow_infinity=False), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)


def _valid(fmt: str) -> dict[str, Any]:
    """One valid record of ``fmt``, the seed the mutations start from."""
    if fmt in ("spool", "datagram"):
        return {"v": 1, "domain": "vm1", "uuid": None, "operation": "started",
                "sub_operation": "begin", "extra": "-", "time": 1.7e9, "seq": 5,
                "boot_id": "b", "pid": 1, "xml": "ok", "entry": None}
    if fmt == "state":
        return {"version": 1, "vms": {"vm1": {
            "uuid": "u", "pid": 4, "ksm_pages": 10, "observed": 1.7e9,
            "remerge": {"event": "reset", "time": 1.7e9, "previous_ksm_pages": 3, "pid": 4},
            "pending": {"id": "k", "merge": True, "event": "e", "reason": "r",
                        "before": {"pc.ram": False}, "ident": "u", "time": 1.0}}}}
    if fmt == "audit":
        return {"time": 1.0, "actor": "cli", "user": "root", "pid": 1, "action": "merge",
                "target": "vm/pc.ram", "before": False, "after": True, "reason": "r",
                "event": None, "vm": "vm", "id": None}
    if fmt == "history":
        return {"time": 1.0, "host": {"pages_sharing": 4},
                "vms": {"vm": {"saved_bytes": 4096, "ksm_pages": 1, "ram_bytes": 8,
                               "zero_pages": 0}}}
    raise KeyError(fmt)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    return found


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(doc)
    copy[path[0]] = _replace(doc[path[0]], path[1:], value)
    return copy


@st.composite
def mutated(draw: st.DrawFn, fmt: str) -> bytes:
    """A valid record with one field replaced (any JSON value, a poison number
    spliced in as text, or a deep nest), or raw bytes, or a cut-off record."""
    seed = _valid(fmt)
    how = draw(st.sampled_from(["value", "poison", "deep", "bytes", "cut", "drop", "extra"]))
    paths = _paths(seed)
    path = draw(st.sampled_from(paths))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "cut":
        whole = json.dumps(seed).encode()
        return whole[:draw(st.integers(0, len(whole)))]
    if how == "drop" and path:
        holder = seed
        for key in path[:-1]:
            holder = holder[key]
        smaller = {k: v for k, v in holder.items() if k != path[-1]}
        return json.dumps(_replace(seed, path[:-1], smaller)).encode()
    if how == "extra":
        return json.dumps({**seed, draw(st.text(max_size=8)): draw(json_values)}).encode()
    marker = "\u0000MARK\u0000"
    if how == "poison":
        text = json.dumps(_replace(seed, path, marker))
        return text.replace(json.dumps(marker), draw(st.sampled_from(POISON_NUMBERS))).encode()
    if how == "deep":
        depth = draw(st.integers(30, 200_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        text = json.dumps(_replace(seed, path, marker))
        return text.replace(json.dumps(marker), opener * depth + "1" + closer * depth).encode()
    return json.dumps(_replace(seed, path, draw(json_values))).encode()


TOML_KEYS = ["spool_dir", "socket", "audit_log", "state_file", "history_file",
             "history_interval", "history_db", "history_raw_days", "history_5min_days",
             "history_hourly_days", "reconnect_max_seconds", "tune", "tune_interval",
             "tune_cpu_budget", "qmp_sockets", "spool", "enabled", "default_merge",
             "default_group", "merge", "group", "force"]
TOML_VALUES = ["nan", "inf", "-inf", "-5", "0", "1e308", "1" * 30, '""', '"/x"', '"rel"',
               '"/a\\u0000b"', "true", "[]", '[""]', '["/g*"]', "{}", '"on"', '"off"', "150",
               "0.5", '"a b"', "3"]


@st.composite
def toml_configs(draw: st.DrawFn) -> bytes:
    """TOML documents built from the config's own vocabulary, with bad values."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=200))
    lines: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["[host]", "[daemon]", '[vm."web"]', "[demon]", "[vm]"]))
        lines.append(section)
        for key in draw(st.lists(st.sampled_from(TOML_KEYS), max_size=4, unique=True)):
            lines.append(f"{key} = {draw(st.sampled_from(TOML_VALUES))}")
    return ("\n".join(lines) + "\n").encode()


def inputs(fmt: str) -> st.SearchStrategy[bytes]:
    return toml_configs() if fmt == "config" else mutated(fmt)


def regression_files() -> list[tuple[str, Path]]:
    """(format, file) for every kept case under tests/data/bad_inputs/."""
    return sorted((d.name, f) for d in BAD_INPUTS.iterdir() if d.is_dir()
                  for f in d.iterdir() if f.is_file())
