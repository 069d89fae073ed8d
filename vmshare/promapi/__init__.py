"""The adapter to Prometheus's HTTP API (``/api/v1/query``, ``/api/v1/query_range``):
the only code in vmshare that queries Prometheus, so it works unchanged against
anything that speaks that API (Prometheus, Thanos, Mimir, VictoriaMetrics).

Every request has a timeout; every reply is validated (a Prometheus envelope,
the result type asked for, finite sample values) and every failure becomes a
PrometheusError naming the URL and the problem. ``transport`` is the seam: a
scripted fake and the real HTTP transport are interchangeable in tests.

May import model and errors only.
"""

from vmshare.promapi.client import PromClient, Sample, Series, Transport, UrllibTransport

__all__ = ["PromClient", "Sample", "Series", "Transport", "UrllibTransport"]
