"""Application accounting: one record per program image, from the kernel's exec events.

See docs/applications.md. :mod:`elsa.apps.record` is the record and its
table, :mod:`elsa.apps.recorder` the daemon side, :mod:`elsa.apps.report` the
``elsa apps`` reports.
"""
