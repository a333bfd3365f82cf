"""Reliability (issue 14): nothing a user owns is overwritten or lost, nothing missing is silently
invented, bad input is one line with exit code 2, never a traceback. One section per class of
problem; each test covers several members of its class."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import install_into_checkpoint as inst  # noqa: E402
import make_tiny_checkpoint as mtc  # noqa: E402

import benchmark_chatglm  # noqa: E402

FAST = ["--input_max_len", "64", "--max_new_tokens", "3", "--iters", "1", "--warmup", "0"]
TIMEOUT = 180


def run_main(capsys, *argv):
    try:
        code = benchmark_chatglm.main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv) -> str:
    code, _, err = run_main(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def run_process(argv, tmp_path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=str(tmp_path),
        **kwargs,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model_path) -> Path:
    target = tmp_path_factory.mktemp("rel") / f"ckpt_{uuid.uuid4().hex[:8]}"
    return mtc.make_tiny_checkpoint(target, preset="tiny", seed=3, tokenizer_model=sp_model_path)


def copy_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / f"ckpt_{uuid.uuid4().hex[:8]}"
    shutil.copytree(checkpoint, target)
    return target


# --- 1. An output path that is one of the run's inputs -------------------------------------------


def test_output_that_is_an_input_of_the_run_is_refused_and_left_intact(capsys, checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n", encoding="utf-8")
    link = tmp_path / "link.json"
    link.symlink_to(checkpoint / "config.json")
    hard = tmp_path / "hard.json"
    os.link(checkpoint / "model.safetensors", hard)
    before = {p: p.read_bytes() for p in (checkpoint / "config.json", prompts, REPO / "modeling_chatglm.py")}
    base = ["--model_path", checkpoint, "--prompts-file", prompts, *FAST]
    cases = [
        (["--output", checkpoint / "config.json"], "inside the checkpoint directory"),
        (["--output", checkpoint / "results.json"], "inside the checkpoint directory"),
        (["--plot", checkpoint / "plot.png"], "inside the checkpoint directory"),
        (["--output", link], "inside the checkpoint directory"),
        (["--output", hard], "is the checkpoint's model.safetensors"),
        (["--output", prompts], "is the run's --prompts-file"),
        (["--plot", prompts], "is the run's --prompts-file"),
        (["--output", REPO / "modeling_chatglm.py"], "is the run's code file"),
    ]
    for extra, message in cases:
        line = one_line_error(capsys, *base, *extra)
        assert message in line, (extra, line)
    for path, data in before.items():
        assert path.read_bytes() == data
    assert not (checkpoint / "results.json").exists() and not (checkpoint / "plot.png").exists()


# --- 8. Edges of the command line: repeated options, a BOM, DeepSpeed's start-up warning ----------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "1", "--iters", "2"], "--iters given twice"),
        (["--output", "a.json", "--output=b.json"], "--output given twice"),
        (
            ["--execute_mode", "eager", "--exe_mode", "dynamo"],
            "--execute_mode and --exe_mode are the same option",
        ),
        (["--iter", "1", "--iters", "2"], "--iter and --iters are the same option"),
        (["--prompts-file", "a", "--prompts_file", "b"], "are the same option"),
    ],
)
def test_an_option_given_twice_is_refused(capsys, argv, message):
    assert message in one_line_error(capsys, *argv)


def test_repeatable_options_still_repeat(capsys, checkpoint):
    code, out, err = run_main(capsys, "--model_path", checkpoint, "--prompt", "a b", "--prompt", "c d", *FAST)
    assert code == 0, err
    args = mtc.build_parser().parse_args(["out", "--set", "rope_ratio=2", "--set", "pre_seq_len=2"])
    assert args.overrides == ["rope_ratio=2", "pre_seq_len=2"]


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from chatglm_bench.inputs import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff你好\nsecond\n".encode("utf-8"))
    assert read_prompts(None, str(path), False).texts == ["你好", "second"]
    path.write_bytes("\ufeff\n\nonly\n".encode("utf-8"))  # a BOM alone on a line is no prompt
    assert read_prompts(None, str(path), False).texts == ["only"]


def test_a_one_rank_run_prints_no_deepspeed_warning(tmp_path):
    pytest.importorskip("deepspeed")
    result = run_process(
        [REPO / "benchmark_chatglm.py", "--preset", "tiny", *FAST, "--output", tmp_path / "r.json"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "Setting accelerator" not in result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout + result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["environment"]["versions"]["deepspeed"]


# --- 2. --restore never loses an edit, and says when there is nothing it can restore -----------

ORIGINALS = {name: f"# the checkpoint's original {name}\n".encode() for name in inst.OUR_FILES}


@pytest.fixture
def source_dir(tmp_path) -> Path:
    src = tmp_path / "ours"
    src.mkdir()
    for name in inst.OUR_FILES:
        (src / name).write_bytes(f"# our fast {name}\n".encode())
    return src


@pytest.fixture
def plain_checkpoint(tmp_path) -> Path:
    ckpt = tmp_path / "chatglm3-6b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "chatglm", "padded_vocab_size": 65024}))
    for name, data in ORIGINALS.items():
        (ckpt / name).write_bytes(data)
    return ckpt


def snapshot(directory: Path) -> dict:
    return {
        p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir")
        for p in directory.iterdir()
    }


def test_restore_keeps_a_copy_of_every_file_edited_since_the_install(plain_checkpoint, source_dir):
    inst.install(plain_checkpoint, source_dir=source_dir)
    edits = {
        "modeling_chatglm.py": b"# my edit of the installed file\n",
        "tokenization_chatglm.py": b"# another edit\n",
    }
    for name, data in edits.items():
        (plain_checkpoint / name).write_bytes(data)
    report = inst.restore(plain_checkpoint, source_dir=source_dir)
    for name, original in ORIGINALS.items():
        assert (plain_checkpoint / name).read_bytes() == original
    for name, data in edits.items():
        stem = name[: -len(".py")]
        copies = sorted(plain_checkpoint.glob(f"{stem}_bak-*.py"))
        assert [c.read_bytes() for c in copies] == [data]
        assert copies[0].name in " ".join(report)
    assert not list(plain_checkpoint.glob("configuration_chatglm_bak-*"))  # ours, unedited: no copy


@pytest.mark.parametrize("problem", ["removed", "directory", "dangling_link"])
def test_restore_without_a_usable_backup_fails_and_changes_nothing(
    tmp_path, plain_checkpoint, source_dir, problem
):
    inst.install(plain_checkpoint, source_dir=source_dir)
    backup = plain_checkpoint / inst.backup_name("configuration_chatglm.py")
    backup.unlink()
    if problem == "directory":
        backup.mkdir()
    elif problem == "dangling_link":
        backup.symlink_to(tmp_path / "gone.py")
    before = snapshot(plain_checkpoint)
    with pytest.raises(inst.UsageError, match="nothing was changed") as error:
        inst.restore(plain_checkpoint, source_dir=source_dir)
    assert backup.name in str(error.value)
    assert snapshot(plain_checkpoint) == before


def test_restore_cli_exits_2_on_one_line_when_the_backups_are_gone(tmp_path, plain_checkpoint):
    script = REPO / "scripts" / "install_into_checkpoint.py"
    assert run_process([script, plain_checkpoint], tmp_path).returncode == 0
    for name in inst.OUR_FILES:
        (plain_checkpoint / inst.backup_name(name)).unlink()
    result = run_process([script, plain_checkpoint, "--restore"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no modeling_chatglm_orig.py to restore" in result.stderr


# --- 5. The installer refuses other architectures and a file given for the directory -----------


@pytest.mark.parametrize(
    "config, tokenizer_config, message",
    [
        ({"position_encoding_2d": True, "vocab_size": 130528}, None, "chatglm-6b (v1)"),
        ({"inner_hidden_size": 16384, "vocab_size": 130528}, None, "chatglm-6b (v1)"),
        ({"padded_vocab_size": 151552, "multi_query_group_num": 2}, None, "GLM-4"),
        ({"padded_vocab_size": 65024}, {"tokenizer_class": "ChatGLM4Tokenizer"}, "GLM-4"),
    ],
)
@pytest.mark.parametrize("action", ["install", "restore", "check"])
def test_installer_refuses_other_chatglm_architectures(
    plain_checkpoint, source_dir, config, tokenizer_config, message, action
):
    (plain_checkpoint / "config.json").write_text(json.dumps({"model_type": "chatglm", **config}))
    if tokenizer_config:
        (plain_checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    before = snapshot(plain_checkpoint)
    with pytest.raises(inst.UsageError, match=re.escape(message)):
        if action == "check":
            inst.check(plain_checkpoint, source_dir=source_dir)
        else:
            getattr(inst, action)(plain_checkpoint, source_dir=source_dir)
    assert snapshot(plain_checkpoint) == before


def test_installer_given_a_file_says_it_is_a_file(tmp_path, plain_checkpoint):
    script = REPO / "scripts" / "install_into_checkpoint.py"
    for target in (plain_checkpoint / "config.json", plain_checkpoint / "modeling_chatglm.py"):
        result = run_process([script, target], tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "is a file, not a directory" in result.stderr


def test_benchmark_refuses_a_chatglm_v1_checkpoint_in_one_line(capsys, checkpoint, tmp_path):
    v1 = copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(json.dumps({**config, "position_encoding_2d": True}))
    assert "chatglm-6b (v1)" in one_line_error(capsys, "--model_path", v1, *FAST)


# --- 9. Leftovers of a killed run are cleaned up, or never visible ------------------------------

KILL_DURING = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {scripts!r}]
import {module} as target
real = {patched}

def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

{assign} = write_then_die
target.main({argv!r})
"""


def run_killed(tmp_path, module: str, patched: str, argv) -> None:
    code = KILL_DURING.format(
        repo=str(REPO),
        scripts=str(REPO / "scripts"),
        module=module,
        patched=patched,
        assign=patched,
        argv=[str(a) for a in argv],
    )
    result = run_process(["-c", code], tmp_path)
    assert result.returncode == -9, result.stderr


def hidden(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_installer_killed_mid_copy_leaves_nothing_after_the_next_run(tmp_path, plain_checkpoint, source_dir):
    run_killed(tmp_path, "install_into_checkpoint", "target.shutil.copy2", [plain_checkpoint])
    leftovers = hidden(plain_checkpoint)
    assert leftovers and all(name.endswith(".tmp.py") for name in leftovers)
    assert snapshot(plain_checkpoint)["modeling_chatglm.py"] == ORIGINALS["modeling_chatglm.py"]
    live = plain_checkpoint / ".modeling_chatglm.py.1.tmp.py"  # pid 1 is alive: another run's
    live.write_bytes(b"another run's copy in progress")
    inst.install(plain_checkpoint, source_dir=source_dir)
    assert hidden(plain_checkpoint) == [live.name]
    live.unlink()
    inst.restore(plain_checkpoint, source_dir=source_dir)
    assert hidden(plain_checkpoint) == []


def test_make_tiny_killed_while_writing_leaves_no_half_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    run_killed(tmp_path, "make_tiny_checkpoint", "target.shutil.copyfile", [out])
    assert not out.exists()  # nothing half-written where the checkpoint goes
    assert hidden(tmp_path)  # the staging directory of the killed run
    assert mtc.main([str(out)]) == 0
    assert hidden(tmp_path) == [] and hidden(out) == []
    before = snapshot(out)
    # --force over an existing checkpoint, killed after the weights were written: the old one
    # stays whole, and the next run removes the staging directory (the weights' size).
    run_killed(tmp_path, "make_tiny_checkpoint", "target.shutil.copyfile", [out, "--force", "--seed", "1"])
    assert snapshot(out) == before and hidden(tmp_path)
    stale = out / ".model.safetensors.999999999.tmp.safetensors"  # an older version's leftover
    stale.write_bytes(b"half of the weights")
    assert mtc.main([str(out), "--force", "--seed", "1"]) == 0
    assert hidden(tmp_path) == [] and hidden(out) == []
    assert snapshot(out)["model.safetensors"] != before["model.safetensors"]
