"""Reliability (issue 14): nothing a user owns is overwritten or lost, nothing missing is silently
invented, bad input is one line with exit code 2, never a traceback. One section per class of
problem; each test covers several members of its class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import make_tiny_checkpoint as mtc  # noqa: E402

import benchmark_chatglm  # noqa: E402

FAST = ["--input_max_len", "24", "--max_new_tokens", "3", "--iters", "1", "--warmup", "0"]
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
