"""Benchmarks: `python -m benchmarks.run [topics]` (see run.py)."""


class Skipped(Exception):
    """Raised by a topic that needs another environment (TransformerLens 3.x): the run leaves
    that topic's rows as they were."""
