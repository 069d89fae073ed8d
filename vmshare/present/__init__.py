"""Presentation, pure where possible: text tables (``text``), the HTML report
(``html``), the Prometheus exposition (``metrics``), a terminal progress bar
(``progress``), and the CPU-budget pacing of background work (``pacing``: the
exporter's snapshots, the daemon's sketches).

May import observe, records, model and errors.
"""
