"""Support code of benchmark_chatglm.py and scripts/: presets (random-weight architectures and
models), plan (what to time), measure (timings), report (tables, JSON, plot) and distributed
(ranks, backends, tensor-parallel sharding), kept apart as the style guide asks; ``cli`` holds
what every command line shares."""

from .cli import OneLineArgumentParser, UsageError, replacing_file

__all__ = ["OneLineArgumentParser", "UsageError", "replacing_file"]
