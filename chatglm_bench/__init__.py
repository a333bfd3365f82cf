"""Support code of benchmark_chatglm.py: measure (timings), report (tables, JSON, plot) and
distributed (ranks, backends, tensor-parallel sharding), kept apart as the style guide asks."""


class UsageError(Exception):
    """Bad input from the user: printed as one line by benchmark_chatglm.main(), exit code 2."""
