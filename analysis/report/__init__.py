"""The report of a run: ``report.json`` (every number with its uncertainty, n and provenance, the setup, the paper's
value and a verdict where the run's data is the paper's), the report's own plots, and one self-contained HTML page
rendered from ``templates/`` with autoescape (``html.py``)."""
