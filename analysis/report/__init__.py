"""The report of a run: ``report.json`` (every number with its standard error, n and provenance, next to the
paper's value and a verdict), its plots, and one self-contained HTML page (``html.py``)."""
