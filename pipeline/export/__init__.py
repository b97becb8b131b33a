"""Getting the stored audit trail out: OpenTelemetry logs, syslog, Prometheus metrics.

The export stage (pipeline/stages/export.py) reads after its own cursors
(store.py), formats (otlp.py, syslog.py) and delivers with backoff
(delivery.py); metrics.py serves what `sluice status` shows.
"""
