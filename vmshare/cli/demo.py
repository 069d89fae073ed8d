"""`vmshare demo`: the main job on a built-in example.

Builds the guest image, boots small TCG guests under libvirt, makes them
mergeable, runs kernel KSM with fast settings while showing progress, prints
the exact per-VM savings and the sharing matrix, then restores every KSM knob
and destroys the guests (unless --keep). ``--guest busybox`` (the default)
boots guests whose memory holds a known mix (identical across guests, unique,
zero-filled); ``--guest debian`` boots real Debian 12 guests (systemd, udev,
journald, ...) built from Debian's own packages. The guests are written
adopted (vmshare's ``<nosharepages/>``): only the RAM vmshare enables merges.
"""

from __future__ import annotations

from typing import Any

from vmshare.cli import argtypes
from vmshare.cli.context import Context, out
from vmshare.cli.shown import DEMO_GUESTS as GUESTS

#: each guest's RAM when --memory is not given
DEFAULT_MEMORY_MIB = {"busybox": 256, "debian": 512}


def cmd_demo(ctx: Context) -> int:
    from vmshare.cli.demorun import DemoOptions, run_demo
    a = ctx.args
    memory = a.memory if a.memory is not None else DEFAULT_MEMORY_MIB[a.guest]
    opts = DemoOptions(guests=a.guests, memory_mib=memory, guest=a.guest,
                       identical_mib=a.identical,
                       unique_mib=a.unique, zero_mib=a.zero, keep=a.keep,
                       timeout=a.timeout, uri=a.connect or "qemu:///system")
    return run_demo(opts, out=out)


def register(sub: Any) -> None:
    s = sub.add_parser("demo", help="boot small guests, merge them, show per-VM savings")
    s.add_argument("--guests", type=int, default=3,
                   help="how many guests, 2 to 8 (default %(default)s)")
    s.add_argument("--guest", choices=GUESTS, default="busybox",
                   help="busybox: guests filling memory with a known mix; debian: real "
                        "Debian 12 guests built from Debian's packages (default "
                        "%(default)s)")
    s.add_argument("--memory", type=int, default=None, metavar="MiB",
                   help="each guest's RAM (default 256, or 512 with --guest debian)")
    s.add_argument("--identical", type=int, default=96, metavar="MiB",
                   help="busybox: memory each guest fills the same as the others "
                        "(default %(default)s)")
    s.add_argument("--unique", type=int, default=32, metavar="MiB",
                   help="busybox: memory each guest fills with its own bytes "
                        "(default %(default)s)")
    s.add_argument("--zero", type=int, default=16, metavar="MiB",
                   help="busybox: memory each guest fills with zeros (default %(default)s)")
    s.add_argument("--timeout", type=argtypes.seconds(), default=300.0, metavar="SECONDS",
                   help="seconds to wait for each guest to boot, and for KSM to merge "
                        "(default %(default)g)")
    s.add_argument("--keep", action="store_true", help="leave the guests running")
    s.set_defaults(func=cmd_demo)
