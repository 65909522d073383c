"""clipfuse.core: what every layer shares and that imports nothing of clipfuse.

errors (the one exception type a user can cause), iospec (graph names, shapes and the
tolerance per precision, defined once), log (the `clipfuse` logger and its progress steps).
"""
