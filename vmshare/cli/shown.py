"""The defaults and choices the parser shows that live in heavy modules, here so
that building the parser imports none of them (start-up pays only for the
command that runs). Most are copies: tests/test_cli_startup.py checks that each
copy equals its source (SOURCES), so a change there fails the tests until it is
made here too.
"""

from __future__ import annotations

#: the kinds of `vmshare demo` guest (vmshare.cli.demo's parser, demorun's check)
DEMO_GUESTS = ("busybox", "debian")

#: vmshare.daemon.metrics_http.DEFAULT_LISTEN
METRICS_LISTEN = "127.0.0.1:9731"
#: vmshare.fleet.status.DEFAULT_JOB
FLEET_JOB = "vmshare"
#: vmshare.promapi.client.DEFAULT_TIMEOUT
PROM_TIMEOUT = 10.0
#: vmshare.prediction.sketch.DEFAULT_MAX_ENTRIES
SKETCH_MAX_ENTRIES = 1 << 20
#: vmshare.hook.install.HOOKS_DIR
HOOKS_DIR = "/etc/libvirt/hooks"
#: vmshare.records.history.RESOLUTION_CHOICES and AUTO_MAX_SAMPLES
HISTORY_RESOLUTIONS = ("auto", "raw", "5m", "1h")
HISTORY_AUTO_MAX_SAMPLES = 1500
#: vmshare.config.MERGE_SETTINGS
MERGE_SETTINGS = ("on", "off", "inherit")
#: vmshare.config.TunerPolicy's cpu_budget_pct, tight_available, ample_available
TUNE_CPU_BUDGET_PCT = 25.0
TUNE_TIGHT_AVAILABLE = 0.15
TUNE_AMPLE_AVAILABLE = 0.35

#: (this module's name, the source module, the source's name) for each copy
SOURCES = (
    ("METRICS_LISTEN", "vmshare.daemon.metrics_http", "DEFAULT_LISTEN"),
    ("FLEET_JOB", "vmshare.fleet.status", "DEFAULT_JOB"),
    ("PROM_TIMEOUT", "vmshare.promapi.client", "DEFAULT_TIMEOUT"),
    ("SKETCH_MAX_ENTRIES", "vmshare.prediction.sketch", "DEFAULT_MAX_ENTRIES"),
    ("HOOKS_DIR", "vmshare.hook.install", "HOOKS_DIR"),
    ("HISTORY_RESOLUTIONS", "vmshare.records.history", "RESOLUTION_CHOICES"),
    ("HISTORY_AUTO_MAX_SAMPLES", "vmshare.records.history", "AUTO_MAX_SAMPLES"),
    ("MERGE_SETTINGS", "vmshare.config", "MERGE_SETTINGS"),
    ("TUNE_CPU_BUDGET_PCT", "vmshare.config", "TunerPolicy.cpu_budget_pct"),
    ("TUNE_TIGHT_AVAILABLE", "vmshare.config", "TunerPolicy.tight_available"),
    ("TUNE_AMPLE_AVAILABLE", "vmshare.config", "TunerPolicy.ample_available"),
)
