"""The fleet: many hosts' vmshare figures read back from Prometheus (``status``:
per host and per VM savings, top sharers, hosts to look at; ``history``:
savings over time). Only through the Prometheus HTTP API (``vmshare.promapi``),
so it works against Prometheus, Thanos, Mimir or VictoriaMetrics alike.

May import promapi, model and errors.
"""
