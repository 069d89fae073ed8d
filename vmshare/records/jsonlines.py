"""One reader for vmshare's JSON-lines files (the audit log, the history kept
before the database): each line parsed by its format's validator, a bad line
handed back as its error so the caller decides (skip and count, or show).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from vmshare.errors import AccessDenied, VmshareError

T = TypeVar("T")
E = TypeVar("E", bound=VmshareError)


def read_lines(path: Path, parse: Callable[[bytes, str], T], error: type[E],
               label: str) -> Iterator[T | E]:
    """Each line of ``path`` in order, as ``parse(raw, "path:line")`` gives it,
    or the ``error`` it raised for that line. A missing file has no lines.

    Raises AccessDenied, or ``error`` when the file cannot be opened or read
    (``label`` names it in the message, e.g. "the audit log /var/log/...").
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below (a generator)
    except FileNotFoundError:
        return
    except PermissionError as exc:
        raise AccessDenied(f"cannot read {label}: permission denied") from exc
    except OSError as exc:
        raise error(f"cannot read {label}: {exc.strerror}") from exc
    with f:
        try:
            for number, raw in enumerate(f, 1):
                try:
                    yield parse(raw, f"{path}:{number}")
                except error as exc:
                    yield exc
        except OSError as exc:                 # an I/O error mid-file
            raise error(f"cannot read {label}: {exc.strerror}") from exc
