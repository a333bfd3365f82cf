"""benchmark_chatglm.py: runs on presets and checkpoints, reports, and refuses bad input in one line."""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark_chatglm  # noqa: E402

FAST = ["--preset", "tiny", "--input_max_len", "16", "--max_new_tokens", "4", "--iters", "1", "--warmup", "1"]


def run_main(capsys, *argv):
    code = benchmark_chatglm.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model_path):
    from make_tiny_checkpoint import make_tiny_checkpoint

    target = tmp_path_factory.mktemp("bench") / f"ckpt_{uuid.uuid4().hex[:8]}"
    return make_tiny_checkpoint(target, preset="tiny", seed=5, tokenizer_model=sp_model_path)


def test_preset_run_labels_random_weights_and_writes_json_and_plot(capsys, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = run_main(
        capsys, *FAST, "--batch_size", "1", "2", "--output", str(out_json), "--plot", str(out_png)
    )
    assert code == 0, err
    assert "RANDOM weights" in out
    assert "| batch | mode" in out and out.count("| eager ") == 2
    payload = json.loads(out_json.read_text())
    assert {"environment", "results", "parameter_bytes_per_rank"} <= set(payload)
    assert payload["environment"]["model"].startswith("preset tiny (RANDOM WEIGHTS")
    assert payload["environment"]["world_size"] == 1
    results = payload["results"]
    assert [r["batch_size"] for r in results] == [1, 2]
    for r in results:
        assert r["prefill_ms"] > 0 and r["decode_ms_mean"] > 0
        assert r["decode_ms_p50"] <= r["decode_ms_p90"] <= r["decode_ms_p99"]
        assert r["new_tokens"] == 4 and r["input_len"] == 16
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_runs_baseline_each_optimization_and_all(capsys):
    code, out, err = run_main(capsys, *FAST, "--ablation", "--graph_backend", "eager")
    assert code == 0, err
    table = out.split("ablation (speed-up vs baseline):")[1]
    for label in ("baseline", "+attention sdpa", "+rmsnorm fused", "+static cache", "+graph mode", "all"):
        assert f"| {label}" in table
    assert "| math      | math    | tuple  | eager" in table.replace("  ", "  ")


def test_both_modes_in_one_run(capsys):
    code, out, err = run_main(capsys, *FAST, "--execute_mode", "eager", "dynamo", "--graph_backend", "eager")
    assert code == 0, err
    assert "| eager " in out and "| dynamo " in out


def test_checkpoint_run_pads_prompts_and_prints_answers_once(capsys, checkpoint):
    code, out, err = run_main(
        capsys,
        "--model_path",
        str(checkpoint),
        "--batch_size",
        "2",
        "--input_max_len",
        "32",
        "--max_new_tokens",
        "3",
        "--iters",
        "1",
        "--prompt",
        "hello",
        "--prompt",
        "the quick brown fox",
    )
    assert code == 0, err
    answers = out.split("answers (greedy, batch 2, first 3 tokens):")[1].strip().splitlines()
    assert len(answers) == 2
    assert "RANDOM" not in out


def test_baseline_adds_the_original_implementation_row(capsys, checkpoint, tmp_path):
    directory = tmp_path / f"with_orig_{uuid.uuid4().hex[:8]}"
    shutil.copytree(checkpoint, directory)
    # Stand-in for the THUDM file the installer keeps: any drop-in with the original's interface.
    shutil.copy(REPO / "modeling_chatglm.py", directory / "modeling_chatglm_orig.py")
    code, out, err = run_main(
        capsys,
        "--model_path",
        str(directory),
        "--baseline",
        "--input_max_len",
        "64",
        "--max_new_tokens",
        "3",
        "--iters",
        "1",
    )
    assert code == 0, err
    assert "| eager (original)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_path", "/nonexistent/chatglm3-6b"], "does not exist"),
        (
            ["--preset", "tiny", "--input_max_len", "4000", "--max_new_tokens", "200"],
            "exceeds the model's context",
        ),
        (["--preset", "tiny", "--output", "/nonexistent/dir/r.json"], "does not exist; create it"),
        (["--preset", "tiny", "--plot", "/proc/r.png"], "not writable"),
        (["--preset", "tiny", "--baseline"], "--baseline needs --model_path"),
        (["--preset", "tiny", "--iters", "0"], "--iters must be at least 1"),
        (["--preset", "tiny", "--device", "npu"], "needs torch_npu"),
        (["--preset", "tiny", "--prompt", "hi"], "need --model_path"),
        (["--preset", "tiny", "--attention", "npu"], "needs torch_npu"),
        (["--preset", "tiny", "--rmsnorm", "npu"], "needs torch_npu"),
        (
            ["--preset", "tiny", "--execute_mode", "dynamo", "--graph_backend", "turbo"],
            "not a torch.compile backend",
        ),
        (
            ["--preset", "tiny", "--ablation", "--execute_mode", "dynamo", "--graph_backend", "torchair"],
            "needs torch_npu",
        ),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_checkpoint_dir_problems_are_named(capsys, tmp_path, checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main(capsys, "--model_path", str(empty))[2].count("has no config.json") == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "not 'chatglm'" in run_main(capsys, "--model_path", str(other))[2]
    no_tok = tmp_path / "no_tok"
    shutil.copytree(checkpoint, no_tok)
    (no_tok / "tokenizer.model").unlink()
    assert "no tokenizer.model" in run_main(capsys, "--model_path", str(no_tok))[2]


def test_prompt_problems_are_named(capsys, checkpoint, tmp_path):
    base = ["--model_path", str(checkpoint), "--max_new_tokens", "2", "--iters", "1", "--input_max_len", "64"]
    code, _, err = run_main(capsys, *base, "--batch_size", "3", "--prompt", "a", "--prompt", "b")
    assert code == 2 and "needs 3 prompts but 2 were given" in err
    code, _, err = run_main(capsys, *base, "--batch_size", "3", "--prompt", "a", "--repeat-prompts")
    assert code == 0, err
    code, _, err = run_main(
        capsys, *base[:-2], "--input_max_len", "4", "--prompt", "a rather long prompt for four tokens"
    )
    assert code == 2 and "more than --input_max_len 4" in err


def test_invalid_exe_mode_environment_variable(capsys, monkeypatch):
    monkeypatch.setenv("EXE_MODE", "graph")
    code, _, err = run_main(capsys, *FAST)
    assert code == 2 and "EXE_MODE='graph' is not valid; use one of: eager, dynamo" in err


def test_cli_usage_errors_from_a_real_process_are_one_line():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for argv, message in (
        (["--execute_mode", "graph"], "invalid choice: 'graph'"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--preset", "tiny", "--output", "/nonexistent/x.json"], "does not exist"),
    ):
        proc = subprocess.run(
            [sys.executable, str(REPO / "benchmark_chatglm.py"), *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_ablation_with_execute_mode_eager_leaves_graph_mode_out(capsys):
    code, out, err = run_main(capsys, *FAST, "--ablation", "--execute_mode", "eager")
    assert code == 0, err
    table = out.split("ablation (speed-up vs baseline):")[1]
    assert "+graph mode" not in table and "dynamo" not in table
    assert "| all " in table and "| sdpa      | fused   | static | eager" in table


def test_no_warmup_and_a_single_token_still_write_strict_json(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    code, _, err = run_main(
        capsys,
        "--preset",
        "tiny",
        "--input_max_len",
        "8",
        "--max_new_tokens",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--output",
        str(out_json),
    )
    assert code == 0, err
    text = out_json.read_text()
    assert "NaN" not in text
    (result,) = json.loads(text)["results"]
    assert result["decode_ms_mean"] is None and result["first_run_overhead_s"] is None
    assert result["prefill_ms"] > 0


def test_quantize_sweep_adds_int8_and_int4_rows_with_the_bytes_they_hold(capsys, tmp_path):
    out_json = tmp_path / "q.json"
    code, out, err = run_main(capsys, *FAST, "--quantize", "none", "8", "4", "--output", str(out_json))
    assert code == 0, err
    assert "| eager (int8)" in out and "| eager (int4)" in out and "floor ms" in out
    results = json.loads(out_json.read_text())["results"]
    assert [r["quantization"] for r in results] == ["none", "int8", "int4"]
    unquantized, int8, int4 = (r["decode_bytes_per_step"] for r in results)
    assert int8 < 0.5 * unquantized and int4 < 0.6 * unquantized  # float32 preset: 4 bytes/weight
    code, out, err = run_main(
        capsys, *FAST, "--quantize", "none", "8", "--ablation", "--graph_backend", "eager"
    )
    assert code == 0, err
    assert "| all + int8" in out.split("ablation (speed-up vs baseline):")[1]


def test_unusable_quant_kernel_is_one_line_with_exit_code_2(capsys, monkeypatch):
    monkeypatch.setenv("CHATGLM_QUANT_KERNEL", "npu")
    code, out, err = run_main(capsys, *FAST, "--quantize", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "CHATGLM_QUANT_KERNEL=math" in err
