"""What every command line here shares: one error type for bad input, an argument parser whose
errors are one line, atomic file replacement, and printing that survives a closed stdout."""

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Iterator, List, Tuple, Union


class UsageError(ValueError):
    """Bad input from the user: printed as one line by the CLI's main(), exit code 2."""


# Options that are meant to be repeated (each occurrence adds a value).
_REPEATABLE = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit code 2, like a UsageError.

    An option given twice (``--iters 1 ... --iters 5``, or under two of its names) is an error:
    argparse would silently keep the last value, and a benchmark run with a setting the user did
    not mean costs minutes. Options made for repeating (``--prompt``, ``--set``) still repeat."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        self._refuse_repeated_options(argv)
        return super().parse_known_args(argv, namespace)

    def _refuse_repeated_options(self, argv) -> None:
        first = {}
        for token in argv:
            if token == "--":
                break
            if not token.startswith("--"):
                continue
            name = token.split("=", 1)[0]
            action = self._option_action(name)
            if action is None or isinstance(action, _REPEATABLE):
                continue
            if action in first:
                if name == first[action]:
                    self.error(f"{name} given twice; give each option once")
                self.error(f"{first[action]} and {name} are the same option; give it once")
            first[action] = name

    def _option_action(self, name: str):
        if name in self._option_string_actions:
            return self._option_string_actions[name]
        if not self.allow_abbrev:
            return None
        # argparse accepts unambiguous prefixes (--iter for --iters): count those too.
        matches = {a for option, a in self._option_string_actions.items() if option.startswith(name)}
        return matches.pop() if len(matches) == 1 else None


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


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^.]*)?$")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(directory: Union[str, Path], prefixes: Tuple[str, ...] = ("",)) -> List[Path]:
    """Delete what :func:`replacing_file` leaves when its process is killed (SIGKILL, power loss):
    ``.<name>.<pid>.tmp<suffix>`` files in ``directory`` whose ``<name>`` starts with one of
    ``prefixes`` and whose process is gone (a live run's temporary is left alone). Returns them."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if not match or not match["name"].startswith(prefixes) or entry.is_dir():
            continue
        if (match["suffix"] or "") != Path(match["name"]).suffix or process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how a dtype is shown to users and written to JSON."""
    return str(dtype).replace("torch.", "")


def stdout_gone() -> None:
    """The reader of our stdout left (``| head -1``): send the rest to /dev/null and carry on, so
    the run still finishes and writes its files (the recipe in Python's signal docs)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def say(*parts, **kwargs) -> None:
    """print() that survives a closed pipe on stdout."""
    try:
        print(*parts, **kwargs, flush=True)
    except BrokenPipeError:
        stdout_gone()


def launch_rank() -> int:
    """The rank as the launcher set it, for deciding who reports an error (never raises)."""
    try:
        return int(os.environ.get("RANK", "0").strip() or 0)
    except ValueError:
        return 0
