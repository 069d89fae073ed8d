"""The fleet: many hosts' vmshare figures read back from Prometheus (``status``:
per host and per VM savings, top sharers, hosts to look at; ``history``:
savings over time; ``placement``: which host a VM would share most with, from
content sketches, and the moves that would gain most). Only through the
Prometheus HTTP API (``vmshare.promapi``), so it works against Prometheus,
Thanos, Mimir or VictoriaMetrics alike.

May import promapi, records (sketch files), engine.sampled (the estimator), model
and errors.
"""
