"""contrib/vmshare.toml, the /etc/vmshare/vmshare.toml the Debian package ships.

It must load as shipped (all commented: the defaults), and uncommented it must
name every setting with its true default, so the file cannot drift from
vmshare/config.py when a setting is added or a default changes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from vmshare.config import DaemonSettings, HostPolicy, SketchSettings, load_config

SHIPPED = Path(__file__).resolve().parents[1] / "contrib" / "vmshare.toml"
# "# [section]" and "# key = value" at the start of a line; prose and the
# indented [vm."NAME"] example do not match
SETTING_LINE = re.compile(r"^# (\[[a-z]+\]|[a-z][a-z0-9_]* = .*)$")


def uncommented(text: str) -> str:
    return "\n".join(m.group(1) if (m := SETTING_LINE.match(line)) else line
                     for line in text.splitlines()) + "\n"


def test_shipped_file_loads_as_the_defaults() -> None:
    cfg = load_config(SHIPPED)
    assert cfg.path == SHIPPED
    assert cfg.host == HostPolicy() and cfg.daemon == DaemonSettings()


def test_every_setting_is_shown_with_its_default(tmp_path: Path) -> None:
    active = tmp_path / "vmshare.toml"
    active.write_text(uncommented(SHIPPED.read_text()))
    cfg = load_config(active)
    assert cfg.host == HostPolicy() and cfg.daemon == DaemonSettings()
    assert cfg.sketch == SketchSettings()
    shown = {m.group(1).split(" = ")[0]
             for line in SHIPPED.read_text().splitlines() if (m := SETTING_LINE.match(line))}
    wanted = ({f.name for f in dataclasses.fields(DaemonSettings)}
              | {f.name for f in dataclasses.fields(HostPolicy)} - {"vms"}
              | {f.name for f in dataclasses.fields(SketchSettings)})
    assert wanted - shown == set(), "settings missing from contrib/vmshare.toml"


def test_uncommenting_finds_a_changed_default(tmp_path: Path) -> None:
    # the check above sees a wrong default: a shipped line that lies fails it
    lying = SHIPPED.read_text().replace("# history_interval = 60.0", "# history_interval = 61.0")
    assert lying != SHIPPED.read_text()
    active = tmp_path / "vmshare.toml"
    active.write_text(uncommented(lying))
    assert load_config(active).daemon != DaemonSettings()
