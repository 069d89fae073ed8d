"""Measure, never change: the host and per-VM view (``host``), exact fair-share
attribution of KSM pages (``attribution``) and re-merge progress after a
lifecycle event (``remerge``).

May import the adapters (hypervisor seam, ksm), model and errors.
"""
