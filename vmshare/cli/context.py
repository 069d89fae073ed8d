"""What every command needs: the Context (adapters made on first use) and the
only writers to stdout (``out``, ``emit_json``) and stderr (``warn``)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # imported where used: start-up pays only for the command run
    from vmshare.hypervisor.base import Hypervisor
    from vmshare.ksm.procfs import ProcFs
    from vmshare.ksm.sysfs import KsmSysfs
    from vmshare.observe.host import Observer

EXIT_INTERNAL = 70


class Context:
    """What every command needs; adapters are created on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._hv: Hypervisor | None = None

    @functools.cached_property
    def sysfs(self) -> KsmSysfs:
        from vmshare.ksm.sysfs import DEFAULT_ROOT, KsmSysfs
        return KsmSysfs(Path(os.environ.get("VMSHARE_SYSFS_ROOT", str(DEFAULT_ROOT))))

    @functools.cached_property
    def procfs(self) -> ProcFs:
        from vmshare.ksm.procfs import PROC_ROOT, ProcFs
        return ProcFs(os.environ.get("VMSHARE_PROC_ROOT", PROC_ROOT))

    @property
    def hv(self) -> Hypervisor:
        if self._hv is None:
            from vmshare.hypervisor import connect
            self._hv = connect(self.args.connect, self.args.qmp, self.args.deadline)
        return self._hv

    def observer(self) -> Observer:
        from vmshare.observe.host import Observer
        return Observer(self.hv, self.sysfs, self.procfs)

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()


def out(text: str = "") -> None:
    print(text, flush=True)


def emit_json(obj: object, *, compact: bool = False) -> None:
    """Print ``obj`` as strict JSON, indented or (``compact``, for documents of
    megabytes: json's C encoder runs only without indent) on one line. Raises
    ValueError for a NaN or infinity (a bug upstream: outside numbers are
    checked finite where they are read)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False) if compact else \
        json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    print(text, flush=True)


def warn(text: str) -> None:
    """One warning line on stderr; domain names in it are shown escaped."""
    from vmshare.present.text import visible
    print(f"vmshare: warning: {visible(text)}", file=sys.stderr, flush=True)
