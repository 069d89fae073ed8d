"""The shipped systemd unit passes `systemd-analyze verify` (the real one, from
Debian's systemd package; integration/setup.sh installs it) and asks for what
the daemon speaks: Type=notify, NotifyAccess=main, a WatchdogSec= longer than
the daemon's slowest step.

verify needs no running systemd, but it checks that ExecStart= names an
executable, so it runs on a copy whose ExecStart= is this checkout's
command; everything else is the unit as shipped. It exits 0 even for a
key it ignores, so any output is a failure too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from integration.daemon_helpers import systemd_verify
from vmshare.control.lock import DEFAULT_WAIT
from vmshare.hypervisor.base import DEFAULT_DEADLINE

pytestmark = pytest.mark.integration
UNIT = Path(__file__).resolve().parent.parent / "contrib" / "vmshare.service"


def settings(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^(\w+)=(.*)$", text, re.M)}


def test_the_shipped_unit_verifies(tmp_path: Path) -> None:
    assert systemd_verify(UNIT.read_text(), tmp_path) == ""


@pytest.mark.parametrize(("line", "broken"), [
    ("Type=notify", "Type=notfy"),
    ("WatchdogSec=3min", "WatchdogSec=soon"),
    ("NotifyAccess=main", "NotifyAcess=main"),
])
def test_verify_catches_a_broken_line(tmp_path: Path, line: str, broken: str) -> None:
    text = UNIT.read_text()
    assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    out = systemd_verify(text.replace(line, broken), tmp_path)
    assert broken.split("=")[1] in out or broken.split("=")[0] in out, out


def test_the_unit_asks_for_notify_and_a_watchdog_longer_than_one_vm_can_take() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    watchdog = re.fullmatch(r"(\d+)min", unit["WatchdogSec"])
    assert watchdog, unit["WatchdogSec"]
    # one VM's worst case: the control lock's whole wait and ~6 calls at their deadline
    one_vm = DEFAULT_WAIT + 6 * DEFAULT_DEADLINE
    assert int(watchdog.group(1)) * 60 >= 2 * one_vm
