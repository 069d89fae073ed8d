"""vmshare.config: defaults, and every malformed case names the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmshare.config import CONFIG_ENV, DaemonSettings, HostPolicy, VmPolicy, load_config
from vmshare.errors import PolicyError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vmshare.toml"
    p.write_text(text)
    return p


def test_missing_default_file_gives_defaults(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.toml"))
    cfg = load_config()
    assert cfg.path is None and cfg.host == HostPolicy() and cfg.daemon == DaemonSettings()
    assert cfg.host.default_merge == "off" and cfg.host.enabled


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"absent\.toml does not exist"):
        load_config(tmp_path / "absent.toml")


def test_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, "[host]\nenabled = false\n")
    monkeypatch.setenv(CONFIG_ENV, str(p))
    cfg = load_config()
    assert cfg.path == p and not cfg.host.enabled


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.host == HostPolicy() and cfg.daemon == DaemonSettings()


def test_full_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[host]
enabled = true
default_merge = "on"
default_group = "blue"
[daemon]
spool_dir = "/tmp/s"
qmp_sockets = ["/run/q/*.sock"]
reconnect_max_seconds = 5
tune = true
tune_interval = 2
tune_cpu_budget = 12.5
[vm."web-1"]
merge = "off"
[vm."6695eb01-f6a4-8304-79aa-97f2502e193f"]
group = "red"
force = true
"""))
    assert cfg.host.default_merge == "on" and cfg.host.default_group == "blue"
    assert cfg.host.vms["web-1"] == VmPolicy("off")
    assert cfg.host.vms["6695eb01-f6a4-8304-79aa-97f2502e193f"] == VmPolicy("inherit", "red",
                                                                           True)
    assert cfg.daemon.spool_dir == Path("/tmp/s")
    assert cfg.daemon.qmp_sockets == ("/run/q/*.sock",)
    assert cfg.daemon.reconnect_max_seconds == 5.0
    assert (cfg.daemon.tune, cfg.daemon.tune_interval, cfg.daemon.tune_cpu_budget) == (
        True, 2.0, 12.5)


@pytest.mark.parametrize(("text", "needle"), [
    ("[host\n", "not valid TOML"),
    ("[hots]\n", "unknown section(s) hots"),
    ("[host]\nenable = true\n", "unknown key(s) in [host]: enable"),
    ("[host]\nenabled = \"yes\"\n", "[host] enabled must be a bool"),
    ("[host]\nenabled = 1\n", "[host] enabled must be a bool"),
    ("[host]\ndefault_merge = \"inherit\"\n", "[host] default_merge must be 'on' or 'off'"),
    ("[host]\ndefault_merge = true\n", "[host] default_merge must be a str"),
    ("[host]\ndefault_group = \"a b\"\n", "[host] default_group 'a b' is not a valid"),
    ("host = 3\n", "[host] must be a table"),
    ("vm = 3\n", "[vm] must hold tables"),
    ("[vm.web]\nmerge = \"maybe\"\n", "[vm.\"web\"] merge must be one of"),
    ("[vm.web]\nmerge = true\n", "[vm.\"web\"] merge must be a str"),
    ("[vm.web]\nforce = \"yes\"\n", "[vm.\"web\"] force must be a bool"),
    ("[vm.web]\ngroup = 7\n", "[vm.\"web\"] group must be a str"),
    ("[vm.web]\ngroup = \"bad/group\"\n", "[vm.\"web\"] bad trust group name"),
    ("[vm.web]\nshare = true\n", "unknown key(s) in [vm.\"web\"]: share"),
    ("[daemon]\nspool = \"/x\"\n", "unknown key(s) in [daemon]: spool"),
    ("[daemon]\nqmp_sockets = \"/x\"\n", "[daemon] qmp_sockets must be a list"),
    ("[daemon]\nreconnect_max_seconds = \"5\"\n", "[daemon] reconnect_max_seconds must be a"),
    ("[daemon]\naudit_log = 3\n", "[daemon] audit_log must be a str"),
    ("[daemon]\ntune = 1\n", "[daemon] tune must be a bool"),
    ("[daemon]\ntune_interval = 0\n", "[daemon] tune_interval must be seconds in (0, 3600]"),
    ("[daemon]\ntune_cpu_budget = 150\n", "[daemon] tune_cpu_budget must be a percentage"),
    ("[daemon]\nhistory_interval = -5\n",
     "[daemon] history_interval must be 0 (no history) or seconds up to 86400, not -5.0"),
    ("[daemon]\nhistory_interval = nan\n", "[daemon] history_interval must be 0 (no history)"),
    ("[daemon]\nhistory_interval = inf\n", "not inf"),
    ("[daemon]\nhistory_interval = 1e308\n", "[daemon] history_interval must be"),
    ("[daemon]\nreconnect_max_seconds = -inf\n", "[daemon] reconnect_max_seconds must be"),
    ("[daemon]\nreconnect_max_seconds = 0\n", "seconds in (0, 3600], not 0.0"),
    ("[daemon]\ntune_interval = nan\n", "[daemon] tune_interval must be seconds"),
    ("[daemon]\ntune_cpu_budget = -0.0\n", "[daemon] tune_cpu_budget must be a percentage"),
    ("[daemon]\ntune_cpu_budget = nan\n", "[daemon] tune_cpu_budget must be a percentage"),
    ("[daemon]\nspool_dir = \"\"\n", "[daemon] spool_dir must be an absolute path, not ''"),
    ("[daemon]\nstate_file = \"state.json\"\n", "[daemon] state_file must be an absolute"),
    ("[daemon]\nsocket = \"/run/a\\u0000b\"\n", "[daemon] socket must be an absolute path"),
    ("[daemon]\nqmp_sockets = [\"\"]\n", "[daemon] qmp_sockets must be a list"),
    ("[sketch]\ninterval = -1\n", "[sketch] interval must be 0 (no sketches) or seconds"),
    ("[sketch]\ninterval = nan\n", "[sketch] interval must be 0 (no sketches)"),
    ("[sketch]\ninterval = 1e9\n", "seconds up to 604800, not 1000000000.0"),
    ("[sketch]\ninterval = \"60\"\n", "[sketch] interval must be a float"),
    ("[sketch]\ncpu_budget = 0\n", "[sketch] cpu_budget must be a percentage of one core"),
    ("[sketch]\ncpu_budget = 101\n", "[sketch] cpu_budget must be a percentage"),
    ("[sketch]\nrate = \"1/0\"\n", "[sketch] rate: not a rate: '1/0' (e.g. 1/16"),
    ("[sketch]\nrate = \"x\"\n", "[sketch] rate: not a rate: 'x'"),
    ("[sketch]\nrate = 2\n", "[sketch] rate: a rate must be in (0, 1], not 2"),
    ("[sketch]\nrate = \"-1/16\"\n", "[sketch] rate: a rate must be in (0, 1]"),
    ("[sketch]\nrate = nan\n", "[sketch] rate: a rate must be in (0, 1], not nan"),
    ("[sketch]\nrate = true\n", "[sketch] rate: not a rate: True"),
    ("[sketch]\nmax_entries = 100\n", "[sketch] max_entries must be in [1024, 67108864], not 100"),
    ("[sketch]\nmax_entries = 1e6\n", "[sketch] max_entries must be a int, not 1000000.0"),
    ("[sketch]\nmax_entries = 134217728\n", "[sketch] max_entries must be in [1024,"),
    ("[sketch]\nlisten = 9732\n", "[sketch] listen must be a str"),
    ("[sketch]\nlisten = \":1\"\ntoken_file = \"token\"\n",
     "[sketch] token_file must be an absolute path, not 'token'"),
    ("[daemon]\nhistory_raw_days = 0\n", "[daemon] history_raw_days must be days in (0, 366]"),
    ("[daemon]\nhistory_5min_days = nan\n", "[daemon] history_5min_days must be days in"),
    ("[daemon]\nhistory_hourly_days = 1e9\n", "[daemon] history_hourly_days must be days"),
    ("[daemon]\nhistory_raw_days = 30\nhistory_5min_days = 20\n",
     "[daemon] history_5min_days must be at least history_raw_days (30), not 20"),
    ("[daemon]\nhistory_hourly_days = 60\n",
     "[daemon] history_hourly_days must be at least history_5min_days (90), not 60"),
    ("[daemon]\nhistory_db = \"history.sqlite\"\n", "[daemon] history_db must be an absolute"),
    ("[daemon]\nhistory_intervall = 5\n",
     "unknown key(s) in [daemon]: history_intervall (did you mean history_interval?)"),
    ("[demon]\ntune = true\n", "unknown section(s) demon (did you mean daemon?)"),
])
def test_malformed_names_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_config(p)
    msg = str(err.value)
    assert needle in msg and str(p) in msg, msg
    assert "\n" not in msg


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "vmshare.toml"
    p.write_bytes(b"[host]\n# \xff\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_config(p)


def test_unreadable_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"cannot read config file .*: it is a directory"):
        load_config(tmp_path)   # a directory


def test_fifo_and_endless_files_are_refused_at_once(tmp_path: Path) -> None:
    import os
    import time
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(PolicyError, match=f"cannot read config file {path}: it is not a "
                           "regular file"):
            load_config(path)
    assert time.monotonic() - started < 2.0
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(PolicyError, match="larger than 1048576 bytes"):
        load_config(big)


def test_sketch_interval_and_budget(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[sketch]\ninterval = 300\ncpu_budget = 2.5\n"))
    assert (cfg.sketch.interval, cfg.sketch.cpu_budget) == (300.0, 2.5)
    off = load_config(write(tmp_path, "[sketch]\ndir = \"/x\"\n"))
    assert (off.sketch.interval, off.sketch.cpu_budget) == (0.0, 5.0)


def test_sketch_rate_cap_and_endpoint(tmp_path: Path) -> None:
    from vmshare.prediction.sketch import DEFAULT_MAX_ENTRIES, DEFAULT_RATE
    defaults = load_config(write(tmp_path, ""))
    assert (defaults.sketch.rate, defaults.sketch.max_entries) == (DEFAULT_RATE,
                                                                    DEFAULT_MAX_ENTRIES)
    assert defaults.sketch.listen == ""                                # off
    cfg = load_config(write(tmp_path, '[sketch]\nrate = "1/32"\nmax_entries = 4096\n'
                                      'listen = "127.0.0.1:9732"\ntoken_file = "/etc/t"\n'))
    assert (cfg.sketch.rate, cfg.sketch.max_entries) == (1 / 32, 4096)
    assert (cfg.sketch.listen, cfg.sketch.token_file) == ("127.0.0.1:9732", Path("/etc/t"))
    for text, rate in (("0.125", 0.125), ("1", 1.0)):
        assert load_config(write(tmp_path, f'[sketch]\nrate = "{text}"\n')).sketch.rate == rate
    assert load_config(write(tmp_path, "[sketch]\nrate = 0.25\n")).sketch.rate == 0.25
