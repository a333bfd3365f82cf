"""Install this repository's ChatGLM files into a downloaded checkpoint, keeping the originals.

    python scripts/install_into_checkpoint.py CHECKPOINT_DIR            # install (idempotent)
    python scripts/install_into_checkpoint.py CHECKPOINT_DIR --check    # ours / original / missing
    python scripts/install_into_checkpoint.py CHECKPOINT_DIR --restore  # put the originals back

Install copies ``modeling_chatglm.py``, ``configuration_chatglm.py`` and ``tokenization_chatglm.py``
into the directory. Before a file is replaced, the checkpoint's own copy is kept next to it as
``<name>_orig.py`` (``modeling_chatglm_orig.py`` ...). An existing backup is never overwritten:
it is the true original from the first install, so installing again (for instance after updating
this repository) only refreshes our files. A file already byte-identical to ours gets no backup,
which also means that when a backup is absent the file in place equals the original.
``--restore`` copies each backup back and deletes the backup only once the copy is verified.

The baseline. ``benchmark_chatglm.py --baseline`` times the ORIGINAL model from the same
directory: it loads ``modeling_chatglm_orig.py``, not the installed file. That file does
``from .configuration_chatglm import ChatGLMConfig`` (and ``from .quantization import ...``), so
the benchmark copies it into a temporary package together with ``configuration_chatglm_orig.py``
(or ``configuration_chatglm.py`` when there is no backup, i.e. the original was identical to
ours) and the checkpoint's untouched ``quantization.py``, rewriting that one relative import to
``.configuration_chatglm_orig``. That is why the original configuration is backed up like the
other files even though our ``configuration_chatglm.py`` reads the same ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from chatglm_bench import OneLineArgumentParser, UsageError  # noqa: E402  (needs the path set-up above)

OUR_FILES = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py")


@dataclass(frozen=True)
class FileState:
    """Where one of our files stands in a checkpoint directory."""

    name: str
    state: str  # "ours" | "original" | "other" | "missing"
    backup: Optional[str]  # name of the kept original, if there is one

    def describe(self) -> str:
        text = f"{self.name}: {self.state}"
        if self.state == "other":
            text += " (neither ours nor the kept original; install replaces it)"
        if self.backup:
            text += f" (original kept as {self.backup})"
        return text


def backup_name(name: str) -> str:
    """``modeling_chatglm.py`` -> ``modeling_chatglm_orig.py``."""
    stem, suffix = os.path.splitext(name)
    return f"{stem}_orig{suffix}"


def _check_dir(checkpoint_dir: Union[str, Path], *, writable: bool) -> Path:
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise UsageError(
            f"checkpoint directory {directory} does not exist; pass the downloaded chatglm3 folder"
        )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{directory} has no config.json; pass the chatglm3 checkpoint folder that holds it")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError) as error:
        raise UsageError(f"{config_file} is not a valid config ({error})") from None
    if model_type != "chatglm":
        raise UsageError(f"{config_file} has model_type={model_type!r}, not 'chatglm'; refusing to touch it")
    if writable and not os.access(directory, os.W_OK):
        raise UsageError(f"{directory} is not writable; fix its permissions or copy the checkpoint first")
    return directory


def _sources(source_dir: Path) -> List[Path]:
    found = [source_dir / name for name in OUR_FILES if (source_dir / name).is_file()]
    if not found:
        raise UsageError(f"none of {', '.join(OUR_FILES)} found in {source_dir}")
    return found


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def _copy_atomically(src: Path, dst: Path) -> None:
    # Copy next to the target and rename, so an interrupted copy never leaves a half file.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def install(checkpoint_dir: Union[str, Path], *, source_dir: Union[str, Path] = REPO_ROOT) -> List[str]:
    """Copy our files into ``checkpoint_dir``, keeping each replaced original as ``<name>_orig.py``.

    Returns one line per file saying what was done. Running it again is harmless.
    """
    directory = _check_dir(checkpoint_dir, writable=True)
    report = []
    for src in _sources(Path(source_dir)):
        dst, backup = directory / src.name, directory / backup_name(src.name)
        if _same_bytes(src, dst):
            report.append(f"{src.name}: already ours")
            continue
        if backup.exists():
            action = f"installed ours (kept the existing {backup.name})"
        elif dst.exists():
            _copy_atomically(dst, backup)
            if not _same_bytes(dst, backup):
                raise OSError(f"could not back up {dst} to {backup}; nothing replaced")
            action = f"installed ours (original kept as {backup.name})"
        else:
            action = "installed ours (there was no original)"
        _copy_atomically(src, dst)
        report.append(f"{src.name}: {action}")
    return report


def restore(checkpoint_dir: Union[str, Path]) -> List[str]:
    """Put every ``<name>_orig.py`` back as ``<name>.py``; a backup is deleted only after a verified copy."""
    directory = _check_dir(checkpoint_dir, writable=True)
    report = []
    for name in OUR_FILES:
        dst, backup = directory / name, directory / backup_name(name)
        if not backup.is_file():
            if dst.exists():
                report.append(f"{name}: left as is (no {backup.name} to restore)")
            continue
        _copy_atomically(backup, dst)
        if not _same_bytes(backup, dst):
            raise OSError(f"restoring {dst} from {backup} did not produce the same bytes; backup kept")
        backup.unlink()
        report.append(f"{name}: original restored from {backup.name}")
    return report


def check(checkpoint_dir: Union[str, Path], *, source_dir: Union[str, Path] = REPO_ROOT) -> List[FileState]:
    """Which of our files are installed in ``checkpoint_dir``, which are originals, which are missing."""
    directory = _check_dir(checkpoint_dir, writable=False)
    states = []
    for name in OUR_FILES:
        dst, backup = directory / name, directory / backup_name(name)
        ours = Path(source_dir) / name
        kept = backup.name if backup.is_file() else None
        if not dst.is_file():
            state = "missing"
        elif _same_bytes(dst, ours):
            state = "ours"
        elif kept is None or _same_bytes(dst, backup):
            state = "original"
        else:
            state = "other"
        states.append(FileState(name, state, kept))
    return states


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="install_into_checkpoint.py",
        description="Install our modeling/configuration/tokenization files into a chatglm3 checkpoint, "
        "keeping the originals as *_orig.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "checkpoint_dir", metavar="CHECKPOINT_DIR", help="downloaded chatglm3 checkpoint folder"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        action="store_true",
        default=False,
        help="report per file: ours / original / other / missing",
    )
    mode.add_argument(
        "--restore", action="store_true", default=False, help="put the *_orig.py originals back"
    )
    return parser


def main(argv: Optional[list] = None) -> int:
    """CLI entry point: returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            lines = [state.describe() for state in check(args.checkpoint_dir)]
        elif args.restore:
            lines = restore(args.checkpoint_dir) or ["nothing to restore"]
        else:
            lines = install(args.checkpoint_dir)
    except UsageError as error:
        print(f"install_into_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
