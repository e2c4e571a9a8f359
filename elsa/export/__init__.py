"""Exports to the tools sites use: Prometheus (served by elsad), APEL job
messages, OGF Usage Records and JSON lines (``elsa export``). See docs/export.md."""
