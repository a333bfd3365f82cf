"""Support code of benchmark_chatglm.py and scripts/: measure (timings), report (tables, JSON,
plot) and distributed (ranks, backends, tensor-parallel sharding), kept apart as the style guide
asks; this module holds what every command line shares."""

import argparse
import contextlib
import os
from pathlib import Path
from typing import Iterator, Union


class UsageError(ValueError):
    """Bad input from the user: printed as one line by the CLI's main(), exit code 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit code 2, like a UsageError."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@contextlib.contextmanager
def replacing_file(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; when the block succeeds, rename it over
    ``path``. Readers never see a half-written file, a failure (a full disk) leaves the previous
    file as it was and no temporary behind, and a symlink at ``path`` (an HF-cache snapshot) is
    replaced by the new file, never written through into the blob it points to."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
