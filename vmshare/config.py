"""The host config file (/etc/vmshare/vmshare.toml): loaded, validated, defaulted.

A missing file means the shipped defaults. Unknown sections or keys, wrong
types and bad values are errors naming the file, the key and the problem.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from vmshare.errors import PolicyError

MergeSetting = Literal["on", "off", "inherit"]
MERGE_SETTINGS: tuple[str, ...] = ("on", "off", "inherit")
DEFAULT_GROUP = "default"


@dataclass(frozen=True)
class VmPolicy:
    """A VM's own policy (domain metadata or a config table)."""

    merge: MergeSetting = "inherit"
    group: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.merge not in MERGE_SETTINGS:
            raise PolicyError(f"merge must be one of {', '.join(MERGE_SETTINGS)}, "
                              f"not {self.merge!r}")
        if self.group is not None and not valid_group(self.group):
            raise PolicyError(f"bad trust group name {self.group!r}: use 1-64 letters, "
                              "digits, '.', '_' or '-'")


@dataclass(frozen=True)
class HostPolicy:
    """The host's policy: the off switch, defaults, and per-VM tables by name or UUID."""

    enabled: bool = True
    default_merge: Literal["on", "off"] = "off"
    default_group: str = DEFAULT_GROUP
    vms: Mapping[str, VmPolicy] = field(default_factory=dict)


def valid_group(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "._-" for c in name)



@dataclass(frozen=True)
class TunerPolicy:
    """The KSM tuner's settings: the ksmd CPU budget and memory thresholds."""

    cpu_budget_pct: float = 25.0          # of one core, measured over each interval
    tight_available: float = 0.15         # MemAvailable/MemTotal below this: tight
    ample_available: float = 0.35         # at or above this: ample
    converge_scans: int = 1               # complete full scans without new sharing
    epoch_min_scans: int = 3              # full scans needed before judging at all
    min_gain_pages: int = 64              # rises up to this (or the fraction) are noise
    min_gain_fraction: float = 0.002
    sleep_millisecs: int = 20             # ksmd's sleep while merging
    watch_sleep_millisecs: int = 200      # ksmd's sleep while watching
    watch_scan_seconds_tight: float = 20.0     # a full scan per this while watching, tight
    watch_scan_seconds: float = 120.0          # ... moderate
    min_pages_to_scan: int = 32
    max_pages_to_scan: int = 200_000
    assumed_ns_per_page: float = 2000.0   # cost prior until ksmd has been measured
    resume_drop_fraction: float = 0.05    # MemAvailable drop (of MemTotal) that resumes
    probe_seconds: float = 600.0          # re-check for new merges this often when idle
    churn_fraction: float = 0.05          # of the scanned set, per full scan
    churn_cooldown_seconds: float = 60.0  # first cooldown after a fruitless churn burst
    churn_cooldown_max_seconds: float = 1800.0
    budget_tolerance: float = 1.10        # measured/budget above this counts as over
    cost_memory: int = 8                  # measured intervals the planning cost remembers
    history: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.cpu_budget_pct <= 100:
            raise ValueError(f"cpu budget must be in (0, 100] percent of a core, "
                             f"got {self.cpu_budget_pct}")
        if not 0 <= self.tight_available <= self.ample_available <= 1:
            raise ValueError("need 0 <= tight_available <= ample_available <= 1")
        if self.converge_scans < 1 or self.epoch_min_scans < self.converge_scans:
            raise ValueError("need 1 <= converge_scans <= epoch_min_scans")
        if self.min_pages_to_scan < 1 or self.max_pages_to_scan < self.min_pages_to_scan:
            raise ValueError("need 1 <= min_pages_to_scan <= max_pages_to_scan")


DEFAULT_CONFIG = Path("/etc/vmshare/vmshare.toml")
CONFIG_ENV = "VMSHARE_CONFIG"


@dataclass(frozen=True)
class DaemonSettings:
    spool_dir: Path = Path("/run/vmshare/spool")
    socket: Path = Path("/run/vmshare/wakeup.sock")
    audit_log: Path = Path("/var/log/vmshare/audit.jsonl")
    state_file: Path = Path("/var/lib/vmshare/state.json")
    qmp_sockets: tuple[str, ...] = ()          # globs, for hosts without libvirt
    reconnect_max_seconds: float = 30.0
    history_db: Path = Path("/var/lib/vmshare/history.sqlite")
    history_interval: float = 60.0             # seconds between samples; 0: none
    history_raw_days: float = 7.0              # raw samples kept this long
    history_5min_days: float = 90.0            # 5-minute aggregates kept this long
    history_hourly_days: float = 730.0         # hourly aggregates kept this long
    # The JSON-lines history of earlier versions: imported into history_db once.
    history_file: Path = Path("/var/lib/vmshare/history.jsonl")
    tune: bool = False                         # run the KSM tuner (vmshare.tuner.decide) too
    tune_interval: float = 5.0                 # seconds between the tuner's decisions
    tune_cpu_budget: float = TunerPolicy.cpu_budget_pct   # ksmd CPU budget, % of one core
    metrics_listen: str = ""                   # HOST:PORT to serve /metrics; "": off
    metrics_interval: float = 30.0             # seconds between metrics snapshots
    metrics_cpu_budget: float = 1.0            # snapshot CPU, % of one core


@dataclass(frozen=True)
class SketchSettings:
    """Content sketches (vmshare sketch, place): the fleet key and where they are kept."""
    key_file: Path = Path("/etc/vmshare/sketch.key")   # the fleet secret, 0600
    dir: Path = Path("/var/lib/vmshare/sketches")      # 0700, root's
    interval: float = 0.0        # the daemon re-sketches each VM this often (s); 0: never
    cpu_budget: float = 5.0      # the daemon's sketching CPU, % of one core
    rate: float = 1 / 16         # the daemon's sampling rate (prediction.sketch.DEFAULT_RATE)
    max_entries: int = 1 << 20   # samples per VM at most (DEFAULT_MAX_ENTRIES)
    listen: str = ""             # HOST:PORT to serve this host's sketch at /sketch; "": off
    token_file: Path = Path("/etc/vmshare/sketch.token")   # /sketch's bearer token, 0600


@dataclass(frozen=True)
class Config:
    path: Path | None
    host: HostPolicy = field(default_factory=HostPolicy)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    sketch: SketchSettings = field(default_factory=SketchSettings)


# The known keys are the settings types' fields: no second list to keep in step.
_HOST_KEYS = {f.name for f in fields(HostPolicy)} - {"vms"}
_DAEMON_KEYS = {f.name for f in fields(DaemonSettings)}
_VM_KEYS = {f.name for f in fields(VmPolicy)}
_SKETCH_KEYS = {f.name for f in fields(SketchSettings)}


def config_path(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(CONFIG_ENV, str(DEFAULT_CONFIG)))


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate the config; a missing default file gives the defaults.

    Raises PolicyError naming the file and key for anything malformed, and
    for an explicitly named file that does not exist.
    """
    p = config_path(path)
    try:
        raw = _read_bounded(p)
    except FileNotFoundError as exc:
        if path is not None:
            raise PolicyError(f"config file {p} does not exist") from exc
        return Config(path=None)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{p}: not valid TOML: {exc}") from exc
    return parse_config(doc, p)


MAX_CONFIG_BYTES = 1 << 20


def _read_bounded(p: Path) -> bytes:
    """The file's bytes, refusing what is not a regular file (a FIFO would block
    the open, /dev/zero would never end) or is over MAX_CONFIG_BYTES.

    Raises FileNotFoundError and PolicyError.
    """
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise PolicyError(f"cannot read config file {p}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise PolicyError(f"cannot read config file {p}: it is {kind}")
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise PolicyError(f"cannot read config file {p}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise PolicyError(f"config file {p} is larger than {MAX_CONFIG_BYTES} bytes")
    return b"".join(chunks)


def _check_keys(where: str, table: Any, allowed: set[str], origin: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise PolicyError(f"{origin}: [{where}] must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise PolicyError(f"{origin}: unknown key(s) in [{where}]: "
                          f"{', '.join(_with_hint(k, allowed) for k in unknown)} "
                          f"(known: {', '.join(sorted(allowed))})")
    return table


def _with_hint(name: str, known: set[str]) -> str:
    """``name``, with the nearest known name when one is close (a typo)."""
    near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"{name} (did you mean {near[0]}?)" if near else name


def _typed(origin: Path, where: str, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise PolicyError(f"{origin}: [{where}] {key} must be a {kind.__name__}, "
                          f"not {value!r}")
    return value


# [daemon] numbers: (lowest, highest, whether the lowest is allowed, the rule in words).
# Every number is finite: TOML has nan and inf literals.
_DAEMON_NUMBERS: dict[str, tuple[float, float, bool, str]] = {
    "history_interval": (0.0, 86400.0, True, "0 (no history) or seconds up to 86400"),
    "history_raw_days": (0.0, 366.0, False, "days in (0, 366]"),
    "history_5min_days": (0.0, 3660.0, False, "days in (0, 3660]"),
    "history_hourly_days": (0.0, 36600.0, False, "days in (0, 36600]"),
    "reconnect_max_seconds": (0.0, 3600.0, False, "seconds in (0, 3600]"),
    "tune_interval": (0.0, 3600.0, False, "seconds in (0, 3600]"),
    "tune_cpu_budget": (0.0, 100.0, False, "a percentage of one core in (0, 100]"),
    "metrics_interval": (0.0, 86400.0, False, "seconds in (0, 86400]"),
    "metrics_cpu_budget": (0.0, 100.0, False, "a percentage of one core in (0, 100]"),
}
# [sketch] numbers, the same way
_SKETCH_NUMBERS: dict[str, tuple[float, float, bool, str]] = {
    "interval": (0.0, 7 * 86400.0, True, "0 (no sketches) or seconds up to 604800"),
    "cpu_budget": (0.0, 100.0, False, "a percentage of one core in (0, 100]"),
}


def parse_rate(value: object) -> float:
    """A sampling rate in (0, 1]: a number, "0.0625" or "1/16". Raises ValueError."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        if isinstance(value, str) and "/" in value:
            num, den = value.split("/", 1)
            rate = float(num) / float(den)
        else:
            rate = float(value)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"not a rate: {value!r} (e.g. 1/16 or 0.0625)") from exc
    if not (math.isfinite(rate) and 0 < rate <= 1):
        raise ValueError(f"a rate must be in (0, 1], not {value!r}")
    return rate


def _sketch_settings(origin: Path, doc: dict[str, Any]) -> SketchSettings:
    k = _check_keys("sketch", doc.get("sketch", {}), _SKETCH_KEYS, origin)
    sk = SketchSettings()
    try:
        rate = parse_rate(k.get("rate", sk.rate))
    except ValueError as exc:
        raise PolicyError(f"{origin}: [sketch] rate: {exc}") from exc
    entries = _typed(origin, "sketch", "max_entries", k.get("max_entries", sk.max_entries), int)
    if not 1 << 10 <= entries <= 1 << 26:     # 12 KiB to 768 MiB of samples per VM
        raise PolicyError(f"{origin}: [sketch] max_entries must be in [1024, 67108864], "
                          f"not {entries!r}")
    listen = _typed(origin, "sketch", "listen", k.get("listen", sk.listen), str)
    token = _path(origin, k, "token_file", sk.token_file, "sketch")
    return SketchSettings(key_file=_path(origin, k, "key_file", sk.key_file, "sketch"),
                          dir=_path(origin, k, "dir", sk.dir, "sketch"),
                          interval=_number(origin, k, "interval", sk.interval, "sketch"),
                          cpu_budget=_number(origin, k, "cpu_budget", sk.cpu_budget, "sketch"),
                          rate=rate, max_entries=entries, listen=listen, token_file=token)


def _number(origin: Path, table: dict[str, Any], key: str, default: float,
            section: str = "daemon") -> float:
    value: float = _typed(origin, section, key, table.get(key, default), float)
    rules = _DAEMON_NUMBERS if section == "daemon" else _SKETCH_NUMBERS
    low, high, low_ok, rule = rules[key]
    if not math.isfinite(value) or value > high or value < low or (value == low and not low_ok):
        raise PolicyError(f"{origin}: [{section}] {key} must be {rule}, not {value!r}")
    return value


def _path(origin: Path, table: dict[str, Any], key: str, default: Path,
          section: str = "daemon") -> Path:
    """An absolute path without NUL: an empty string would mean the current directory."""
    text: str = _typed(origin, section, key, table.get(key, str(default)), str)
    if not text.startswith("/") or "\0" in text:
        raise PolicyError(f"{origin}: [{section}] {key} must be an absolute path, not {text!r}")
    return Path(text)


def _check_retention(origin: Path, d: DaemonSettings) -> None:
    """Each coarser resolution is kept at least as long as the finer one."""
    steps = (("history_raw_days", d.history_raw_days), ("history_5min_days", d.history_5min_days),
             ("history_hourly_days", d.history_hourly_days))
    for (fine, fine_days), (coarse, coarse_days) in itertools.pairwise(steps):
        if coarse_days < fine_days:
            raise PolicyError(f"{origin}: [daemon] {coarse} must be at least {fine} "
                              f"({fine_days:g}), not {coarse_days:g}")


def parse_config(doc: dict[str, Any], origin: Path) -> Config:
    sections = {"host", "daemon", "vm", "sketch"}
    unknown = sorted(set(doc) - sections)
    if unknown:
        raise PolicyError(f"{origin}: unknown section(s) "
                          f"{', '.join(_with_hint(k, sections) for k in unknown)} "
                          "(known: host, daemon, vm, sketch)")
    host_t = _check_keys("host", doc.get("host", {}), _HOST_KEYS, origin)
    enabled = _typed(origin, "host", "enabled", host_t.get("enabled", True), bool)
    default_merge = _typed(origin, "host", "default_merge",
                           host_t.get("default_merge", "off"), str)
    if default_merge not in ("on", "off"):
        raise PolicyError(f"{origin}: [host] default_merge must be 'on' or 'off', "
                          f"not {default_merge!r}")
    default_group = _typed(origin, "host", "default_group",
                           host_t.get("default_group", DEFAULT_GROUP), str)
    if not valid_group(default_group):
        raise PolicyError(f"{origin}: [host] default_group {default_group!r} is not a "
                          "valid trust group name")

    vms: dict[str, VmPolicy] = {}
    vm_tables = doc.get("vm", {})
    if not isinstance(vm_tables, dict):
        raise PolicyError(f"{origin}: [vm] must hold tables like [vm.\"NAME\"]")
    for name, table in vm_tables.items():
        where = f'vm."{name}"'
        t = _check_keys(where, table, _VM_KEYS, origin)
        merge = _typed(origin, where, "merge", t.get("merge", "inherit"), str)
        group = t.get("group")
        if group is not None:
            group = _typed(origin, where, "group", group, str)
        force = _typed(origin, where, "force", t.get("force", False), bool)
        try:   # VmPolicy checks merge and the group name
            vms[name] = VmPolicy(merge=merge, group=group, force=force)
        except PolicyError as exc:
            raise PolicyError(f"{origin}: [{where}] {exc}") from exc

    d = _check_keys("daemon", doc.get("daemon", {}), _DAEMON_KEYS, origin)
    defaults = DaemonSettings()
    globs = d.get("qmp_sockets", [])
    if not isinstance(globs, list) or not all(isinstance(g, str) and g and "\0" not in g
                                              for g in globs):
        raise PolicyError(f"{origin}: [daemon] qmp_sockets must be a list of path globs")
    daemon = DaemonSettings(
        spool_dir=_path(origin, d, "spool_dir", defaults.spool_dir),
        socket=_path(origin, d, "socket", defaults.socket),
        audit_log=_path(origin, d, "audit_log", defaults.audit_log),
        state_file=_path(origin, d, "state_file", defaults.state_file),
        qmp_sockets=tuple(globs),
        history_file=_path(origin, d, "history_file", defaults.history_file),
        history_db=_path(origin, d, "history_db", defaults.history_db),
        history_interval=_number(origin, d, "history_interval", defaults.history_interval),
        history_raw_days=_number(origin, d, "history_raw_days", defaults.history_raw_days),
        history_5min_days=_number(origin, d, "history_5min_days", defaults.history_5min_days),
        history_hourly_days=_number(origin, d, "history_hourly_days",
                                    defaults.history_hourly_days),
        reconnect_max_seconds=_number(origin, d, "reconnect_max_seconds",
                                      defaults.reconnect_max_seconds),
        tune=_typed(origin, "daemon", "tune", d.get("tune", defaults.tune), bool),
        tune_interval=_number(origin, d, "tune_interval", defaults.tune_interval),
        tune_cpu_budget=_number(origin, d, "tune_cpu_budget", defaults.tune_cpu_budget),
        metrics_listen=_typed(origin, "daemon", "metrics_listen",
                              d.get("metrics_listen", defaults.metrics_listen), str),
        metrics_interval=_number(origin, d, "metrics_interval", defaults.metrics_interval),
        metrics_cpu_budget=_number(origin, d, "metrics_cpu_budget",
                                   defaults.metrics_cpu_budget),
    )
    _check_retention(origin, daemon)
    sketch = _sketch_settings(origin, doc)
    return Config(path=origin,
                  host=HostPolicy(enabled=enabled, default_merge=default_merge,
                                  default_group=default_group, vms=vms),
                  daemon=daemon, sketch=sketch)
