"""Presentation, pure where possible: text tables (``text``), the HTML report
(``html``), the Prometheus exposition (``metrics``), a terminal progress bar
(``progress``).

May import observe, records, model and errors.
"""
