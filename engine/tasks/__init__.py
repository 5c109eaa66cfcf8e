"""The tasks that plug into the platform: one module each, a ``Task`` subclass and its root config.

A task imports the platform (``engine.*``), evaluation (``engine.eval``), ``datasets`` and ``models``, never
another task: what two tasks share lives below them.
"""
