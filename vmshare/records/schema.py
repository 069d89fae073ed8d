"""One schema layer for every JSON record vmshare reads from outside.

Valid JSON is not valid input. ``json.loads`` raises ValueError for an
integer of more than 4,300 digits (CPython's int max str digits) and
RecursionError for an array nested 100,000 deep, accepts ``NaN`` and
``Infinity``, and a field of the wrong type breaks wherever it is first
used. Every reader of an outside format (spool entries and wake-up
datagrams, the daemon's state file, audit and history lines) decodes with
:func:`decode` and takes its fields with the typed getters below, inside one
validator per format that sits beside the reader; the validator returns a
value of the right shape or raises that format's VmshareError subclass,
naming the file or entry and the problem.

Also :func:`printable`: text from guests and domains escaped before it
reaches a log line or a terminal.

Pure: no I/O. May import errors only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from vmshare.errors import VmshareError

__all__ = ["RecordError", "decode", "finite", "get_bool", "get_int", "get_map",
           "get_number", "get_opt_int", "get_opt_str", "get_str", "printable"]

E = TypeVar("E", bound=VmshareError)
# Deep enough for every record vmshare writes (they nest three or four levels),
# far below the interpreter's recursion limit.
MAX_DEPTH = 32


class RecordError(VmshareError):
    """An outside record is not of its format's shape (the base of each format's error)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth_ok(text: str, limit: int) -> bool:
    """True when no bracket nests deeper than ``limit`` (brackets in strings skipped).

    Checked before json.loads so that depth never reaches the parser's
    recursion, and a record that decodes is safe for recursive code after it.
    """
    if text.count("[") + text.count("{") <= limit:
        return True
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > limit:
            return False
    return True


def decode(data: bytes | str, error: type[E], what: str, *, max_bytes: int,
           max_depth: int = MAX_DEPTH) -> Any:
    """Decode one JSON document of at most ``max_bytes``, or raise ``error``.

    Rejects: more than ``max_bytes``, bytes that are not UTF-8, syntax errors,
    ``NaN``/``Infinity`` literals, integers json.loads refuses (too many
    digits), floats that overflow to infinity, and nesting deeper than
    ``max_depth``. The message starts with ``what`` (a file and line, a
    spool entry's name).

    Raises ``error``.
    """
    if len(data) > max_bytes:
        raise error(f"{what}: larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not _depth_ok(text, max_depth):
        raise error(f"{what}: nested deeper than {max_depth} levels")
    try:
        doc = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise error(f"{what}: not JSON ({exc.msg} at line {exc.lineno} column "
                    f"{exc.colno})") from exc
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: not acceptable JSON ({_short(exc)})") from exc
    return doc


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}... overflows a float")
    return value


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


def finite(value: float) -> bool:
    return math.isfinite(value)


def get_map(obj: Any, key: str, error: type[E], what: str, *,
            required: bool = True) -> dict[str, Any]:
    """``obj[key]`` as a JSON object ({} when absent and not required; null is not
    absent). Raises ``error``."""
    if not isinstance(obj, Mapping):
        raise error(f"{what}: not an object")
    if key not in obj and not required:
        return {}
    value = obj.get(key)
    if not isinstance(value, dict):
        raise error(f"{what}: {key!r} is {_kind(value)}, not an object")
    return value


def get_str(obj: Mapping[str, Any], key: str, error: type[E], what: str, *,
            max_len: int = 4096, default: str | None = None) -> str:
    """``obj[key]`` as a string of at most ``max_len`` characters. Raises ``error``."""
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise error(f"{what}: {key!r} is {_kind(value)}, not a string")
    if len(value) > max_len:
        raise error(f"{what}: {key!r} is longer than {max_len} characters")
    return value


def get_opt_str(obj: Mapping[str, Any], key: str, error: type[E], what: str, *,
                max_len: int = 4096) -> str | None:
    """``obj[key]`` as a string or None (absent or null). Raises ``error``."""
    if obj.get(key) is None:
        return None
    return get_str(obj, key, error, what, max_len=max_len)


def get_int(obj: Mapping[str, Any], key: str, error: type[E], what: str, *,
            minimum: int | None = None, maximum: int | None = None,
            default: int | None = None) -> int:
    """``obj[key]`` as an integer (not a bool) in [minimum, maximum]. Raises ``error``."""
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what}: {key!r} is {_kind(value)}, not an integer")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise error(f"{what}: {key!r} = {value} is out of range")
    return value


def get_opt_int(obj: Mapping[str, Any], key: str, error: type[E], what: str, *,
                minimum: int | None = None) -> int | None:
    """``obj[key]`` as an integer or None (absent or null). Raises ``error``."""
    if obj.get(key) is None:
        return None
    return get_int(obj, key, error, what, minimum=minimum)


def get_number(obj: Mapping[str, Any], key: str, error: type[E], what: str, *,
               minimum: float | None = None, default: float | None = None) -> float:
    """``obj[key]`` as a finite number (int or float, not a bool) >= minimum, as a float.

    Raises ``error`` (also for an integer too large for a float).
    """
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{what}: {key!r} is {_kind(value)}, not a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise error(f"{what}: {key!r} is too large") from exc
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        raise error(f"{what}: {key!r} = {number} is out of range")
    return number


def get_bool(obj: Mapping[str, Any], key: str, error: type[E], what: str) -> bool:
    """``obj[key]`` as a JSON boolean. Raises ``error``."""
    value = obj.get(key)
    if not isinstance(value, bool):
        raise error(f"{what}: {key!r} is {_kind(value)}, not true or false")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "missing or null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def printable(text: str, max_len: int = 200) -> str:
    """``text`` with control and other non-printable characters escaped (\\n, \\x1b,
    \\u2028), cut to ``max_len`` characters: a domain name cannot forge a log line
    or drive the terminal."""
    if text.isprintable() and len(text) <= max_len:
        return text
    escaped = "".join(ch if ch.isprintable() else
                      ch.encode("unicode_escape").decode("ascii") for ch in text[:max_len])
    return escaped + ("..." if len(text) > max_len else "")
