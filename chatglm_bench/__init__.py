"""Support code of benchmark_chatglm.py and scripts/: measure (timings), report (tables, JSON,
plot) and distributed (ranks, backends, tensor-parallel sharding), kept apart as the style guide
asks; this module holds what every command line shares."""

import argparse


class UsageError(ValueError):
    """Bad input from the user: printed as one line by the CLI's main(), exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit code 2, like a UsageError."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
