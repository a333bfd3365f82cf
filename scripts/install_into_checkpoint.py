"""Install this repository's ChatGLM files into a downloaded checkpoint, keeping the originals.

    python scripts/install_into_checkpoint.py CHECKPOINT_DIR            # install (idempotent)
    python scripts/install_into_checkpoint.py CHECKPOINT_DIR --check    # exit 0 only when all are ours
    python scripts/install_into_checkpoint.py CHECKPOINT_DIR --restore  # put the originals back

Install copies ``modeling_chatglm.py``, ``configuration_chatglm.py`` and ``tokenization_chatglm.py``
into the directory. Before a file is replaced, the checkpoint's own copy is kept next to it as
``<name>_orig.py`` (``modeling_chatglm_orig.py`` ...). An existing backup is never overwritten:
it is the true original from the first install, so installing again (for instance after updating
this repository) only refreshes our files. A file already byte-identical to ours gets no backup,
which also means that when a backup is absent the file in place equals the original.
``--restore`` copies each backup back and deletes the backup only once the copy is verified; a
file edited since the install is kept as ``<name>_bak-<timestamp>.py`` first, and one of our
files without a usable backup (removed, a directory, a dangling link) stops it before any change.
Checkpoints of other architectures sharing ``model_type: chatglm`` (chatglm-6b v1, GLM-4) are
refused, and a killed run's hidden temporary is removed by the next one.
A file that is neither ours nor the kept original (the user edited it) is never lost: it is kept
as ``<name>_bak-<timestamp>.py`` first. Either every file is installed or, after an error
part-way, every file is put back as it was. Symlinks (an HF-cache snapshot) are replaced by
regular files, never written through into the shared ``blobs/``.

The baseline. ``benchmark_chatglm.py --baseline`` times the ORIGINAL model from the same
directory: it loads ``modeling_chatglm_orig.py``, not the installed file. That file does
``from .configuration_chatglm import ChatGLMConfig`` (and ``from .quantization import ...``), so
the benchmark copies it into a temporary package as ``modeling_chatglm.py``, beside
``configuration_chatglm_orig.py`` saved as ``configuration_chatglm.py`` (or our
``configuration_chatglm.py`` when there is no backup, i.e. the original was identical to ours)
and the checkpoint's untouched ``quantization.py``; the relative imports then resolve as they
do in the checkpoint, unchanged. That is why the original configuration is backed up like the
other files even though our ``configuration_chatglm.py`` reads the same ``config.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from chatglm_bench.checkpoint import architecture_problem  # noqa: E402
from chatglm_bench.cli import (  # noqa: E402  (needs the path set-up above)
    OneLineArgumentParser,
    UsageError,
    remove_stale_temporaries,
    replacing_file,
)

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
            text += " (neither ours nor the kept original; install keeps a timestamped copy)"
        if self.backup:
            text += f" (original kept as {self.backup})"
        return text


def backup_name(name: str) -> str:
    """``modeling_chatglm.py`` -> ``modeling_chatglm_orig.py``."""
    stem, suffix = os.path.splitext(name)
    return f"{stem}_orig{suffix}"


def _check_dir(checkpoint_dir: Union[str, Path], *, writable: bool) -> Path:
    # Standard library only: loading modeling_chatglm.check_checkpoint_dir would import torch and
    # transformers (seconds, and their import-time warnings) into a file-copying script.
    directory = Path(checkpoint_dir)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} is a file, not a directory; pass the checkpoint folder that holds it")
    if not directory.is_dir():
        raise UsageError(
            f"checkpoint directory {directory} does not exist; pass the downloaded chatglm3 folder"
        )
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{directory} has no config.json; pass the chatglm3 checkpoint folder that holds it")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        model_type = config.get("model_type")
    except (ValueError, OSError, AttributeError) as error:
        raise UsageError(f"{config_file} is not a valid config ({error})") from None
    if model_type != "chatglm":
        raise UsageError(f"{config_file} has model_type={model_type!r}, not 'chatglm'; refusing to touch it")
    problem = architecture_problem(config, directory)
    if problem:
        raise UsageError(f"{directory} {problem}; refusing to touch it")
    if writable and not os.access(directory, os.W_OK):
        raise UsageError(f"{directory} is not writable; fix its permissions or copy the checkpoint first")
    if writable:
        # A run killed part-way (SIGKILL) leaves the hidden temporary of its last copy.
        remove_stale_temporaries(directory, tuple(os.path.splitext(name)[0] for name in OUR_FILES))
    return directory


def _sources(source_dir: Path) -> List[Path]:
    found = [source_dir / name for name in OUR_FILES if (source_dir / name).is_file()]
    if not found:
        raise UsageError(f"none of {', '.join(OUR_FILES)} found in {source_dir}")
    return found


def _same_bytes(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def _copy_atomically(src: Path, dst: Path) -> None:
    # Copy next to the target and rename: an interrupted copy never leaves a half file, and a
    # symlink at dst (an HF-cache snapshot) is replaced, never written through into its blob.
    with replacing_file(dst) as tmp:
        shutil.copy2(src, tmp)


class _Journal:
    """What each touched path held before, so that a failure part-way puts everything back:
    a directory gets all of our files or none."""

    def __init__(self):
        self._before: List[tuple] = []

    def save(self, path: Path) -> None:
        if path.is_symlink():
            self._before.append((path, "link", os.readlink(path)))
        elif path.is_file():
            self._before.append((path, "file", path.read_bytes()))
        elif not path.exists():
            self._before.append((path, "absent", None))

    def roll_back(self) -> None:
        for path, kind, payload in reversed(self._before):
            with contextlib.suppress(OSError):
                if kind == "absent":
                    if path.is_symlink() or path.is_file():
                        path.unlink()
                elif kind == "link":
                    if path.is_symlink() or path.is_file():
                        path.unlink()
                    path.symlink_to(payload)
                else:
                    with replacing_file(path) as tmp:
                        tmp.write_bytes(payload)


def _failed(action: str, directory: Path, error: OSError) -> UsageError:
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    return UsageError(
        f"could not {action} {directory}: {error.strerror or error}{where}; nothing was changed "
        "(every file put back as it was); fix that file or its permissions and run again"
    )


def user_copy_name(name: str, stamp: str) -> str:
    """``modeling_chatglm.py`` -> ``modeling_chatglm_bak-20261125-120501.py``."""
    stem, suffix = os.path.splitext(name)
    return f"{stem}_bak-{stamp}{suffix}"


def _user_copy(directory: Path, name: str, stamp: str) -> Path:
    """A new name for the copy of a user's file: the stamp, then -2, -3... when it is taken."""
    keep = directory / user_copy_name(name, stamp)
    count = 1
    while keep.exists() or keep.is_symlink():
        count += 1
        keep = directory / user_copy_name(name, f"{stamp}-{count}")
    return keep


def install(checkpoint_dir: Union[str, Path], *, source_dir: Union[str, Path] = REPO_ROOT) -> List[str]:
    """Copy our files into ``checkpoint_dir``, keeping each replaced original as ``<name>_orig.py``.

    A file that is neither ours nor the kept original (edited by the user, or an older version
    of ours) is first kept as ``<name>_bak-<timestamp>.py``. All files or none: on an error
    part-way every file is put back. Returns one line per file saying what was done. Running it
    again is harmless.
    """
    directory = _check_dir(checkpoint_dir, writable=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    journal = _Journal()
    report = []
    try:
        for src in _sources(Path(source_dir)):
            dst, backup = directory / src.name, directory / backup_name(src.name)
            if _same_bytes(src, dst):
                report.append(f"{src.name}: already ours")
                continue
            keep = None
            if backup.exists() or backup.is_symlink():
                action = f"installed ours (kept the existing {backup.name})"
                if (dst.exists() or dst.is_symlink()) and not _same_bytes(dst, backup):
                    keep = _user_copy(directory, src.name, stamp)
                    action = f"installed ours (the file there was neither ours nor the original: kept as {keep.name})"
            elif dst.exists() or dst.is_symlink():
                keep = backup
                action = f"installed ours (original kept as {backup.name})"
            else:
                action = "installed ours (there was no original)"
            if keep is not None:
                if keep.exists() or keep.is_symlink():
                    raise FileExistsError(errno.EEXIST, "a backup of that name already exists", str(keep))
                journal.save(keep)
                _copy_atomically(dst, keep)
                if not _same_bytes(dst, keep):
                    raise OSError(errno.EIO, "the backup copy differs from the file", str(keep))
            journal.save(dst)
            _copy_atomically(src, dst)
            report.append(f"{src.name}: {action}")
    except OSError as error:
        journal.roll_back()
        raise _failed("install into", directory, error) from None
    return report


def _usable_backup(backup: Path) -> bool:
    """True for a backup to restore from, False when there is none; a backup that cannot be
    one (a directory, a symlink to nothing) is an error, before anything changes."""
    if backup.is_symlink() and not backup.exists():
        raise UsageError(
            f"{backup} is a symlink to a missing file, so the original is gone; nothing was changed "
            "(copy the original back by hand, e.g. from a fresh download, or delete the link)"
        )
    if backup.exists() and not backup.is_file():
        raise UsageError(f"{backup} is not a file; nothing was changed (move it away and run again)")
    return backup.is_file()


def restore(checkpoint_dir: Union[str, Path], *, source_dir: Union[str, Path] = REPO_ROOT) -> List[str]:
    """Put every ``<name>_orig.py`` back as ``<name>.py``; a backup is deleted only after a verified
    copy. A file edited since the install (neither ours nor the original) is first kept as
    ``<name>_bak-<timestamp>.py``, as install does. A backup that cannot be one (a directory, a
    dangling link), or no backup at all while one of our files is in place (removed backups),
    is an error before anything changes. Ours without a backup next to restored files is left
    and said so (install keeps no backup of an original identical to ours). All files or none,
    like :func:`install`."""
    directory = _check_dir(checkpoint_dir, writable=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan = [(name, directory / name, directory / backup_name(name)) for name in OUR_FILES]
    plan = [(name, dst, backup, _usable_backup(backup)) for name, dst, backup in plan]
    ours = [name for name, dst, _, has in plan if not has and _same_bytes(dst, Path(source_dir) / name)]
    if ours and not any(has for *_, has in plan):
        verb = "is" if len(ours) == 1 else "are"
        raise UsageError(
            f"nothing to restore in {directory}: {', '.join(ours)} {verb} ours but there is no "
            f"{backup_name(ours[0])} (removed, or the original was identical to ours); nothing was changed"
        )
    journal = _Journal()
    report = []
    try:
        for name, dst, backup, has_backup in plan:
            if not has_backup:
                if name in ours:
                    report.append(
                        f"{name}: left as is (ours, and no {backup.name}: the original was identical "
                        "to ours, or its backup was removed)"
                    )
                elif dst.exists():
                    report.append(
                        f"{name}: left as is (not ours, no {backup.name}: the original is in place)"
                    )
                continue
            action = f"original restored from {backup.name}"
            if (
                dst.is_file()
                and not _same_bytes(dst, backup)
                and not _same_bytes(dst, Path(source_dir) / name)
            ):
                keep = _user_copy(directory, name, stamp)
                journal.save(keep)
                _copy_atomically(dst, keep)
                if not _same_bytes(dst, keep):
                    raise OSError(errno.EIO, "the backup copy differs from the file", str(keep))
                action += f" (the file there was edited since the install: kept as {keep.name})"
            journal.save(dst)
            _copy_atomically(backup, dst)
            if not _same_bytes(backup, dst):
                raise OSError(errno.EIO, "the restored file differs from the backup", str(dst))
            journal.save(backup)
            backup.unlink()
            report.append(f"{name}: {action}")
    except OSError as error:
        journal.roll_back()
        raise _failed("restore", directory, error) from None
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
            states = check(args.checkpoint_dir)
            lines = [state.describe() for state in states]
            if any(state.state != "ours" for state in states):
                # Scripts can test it: non-zero unless every file is ours.
                print("\n".join(lines + ["not fully installed: run without --check to install"]))
                return 1
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
