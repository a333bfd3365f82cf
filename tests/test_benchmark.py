"""benchmark_chatglm.py: runs on presets and checkpoints, reports, and refuses bad input in one line."""

import json
import mmap
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch
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
    assert "| batch | prompt | mode" in out and out.count("| eager ") == 2
    payload = json.loads(out_json.read_text())
    assert {"environment", "results", "parameter_bytes_per_rank"} <= set(payload)
    assert payload["environment"]["model"].startswith("preset tiny (RANDOM WEIGHTS")
    assert payload["environment"]["world_size"] == 1
    results = payload["results"]
    assert [r["batch_size"] for r in results] == [1, 2]
    for r in results:
        # The derived figures follow from the measured ones (3 decode steps after the prefill).
        assert r["prefill_ms"] > 0 and r["ttft_ms"] == r["prefill_ms"]
        per_s = r["batch_size"] * 1e3 / r["decode_ms_mean"]
        assert r["decode_tokens_per_s"] == pytest.approx(per_s, rel=1e-3)
        assert r["e2e_ms"] == pytest.approx(r["prefill_ms"] + 3 * r["decode_ms_mean"], rel=1e-3)
        assert r["decode_ms_p50"] <= r["decode_ms_p90"] <= r["decode_ms_p99"]
        assert r["new_tokens"] == 4 and r["input_len"] == 16
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # On a CPU the yardstick was read again after each of the two rows, and the best read is the
    # bandwidth every row's "% BW" is set against.
    reference = payload["environment"]["hardware_reference"]
    assert "the best of 3 reads, at the start and after each row" in reference["source"], reference
    low, high = (float(v) for v in reference["source"].rsplit(": ", 1)[1].split(" GB/s")[0].split("-"))
    assert low <= high and reference["bandwidth_gbs"] == pytest.approx(high, abs=0.06)
    assert f"{reference['bandwidth_gbs']:.1f} GB/s" in out.split("hardware reference")[1].splitlines()[0]


def test_ablation_runs_baseline_each_optimization_and_all(capsys):
    code, out, err = run_main(capsys, *FAST, "--ablation", "--graph_backend", "eager")
    assert code == 0, err
    table = out.split("ablation (speed-up vs baseline):")[1]
    for label in ("baseline", "+attention sdpa", "+rmsnorm fused", "+static cache", "+graph mode", "all"):
        assert f"| {label}" in table
    rows = {
        line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:9]]
        for line in table.splitlines()[3:]
    }
    # weights, attention, rmsnorm, linear, cache, mode: the baseline is the original's plain path.
    assert rows["baseline"] == ["none", "math", "math", "aten", "tuple", "eager"], rows
    # The gemv projection is an ablation step exactly where auto picks it (bf16 on this CPU).
    import modeling_chatglm

    dtype = torch.bfloat16 if "bfloat16" in out else torch.float32
    auto = modeling_chatglm.resolve_backends(modeling_chatglm.RuntimeOptions(), "cpu", dtype).linear
    assert ("+linear gemv" in rows) == (auto == "gemv") and rows["all"][3] == auto, (rows, auto)


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


def one_line_error_from_a_real_process(argv, env, timeout) -> str:
    """Run the benchmark as users do; it must exit 2 with one line on stderr, returned."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmark_chatglm.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_cli_usage_errors_from_a_real_process_are_one_line():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for argv, message in (
        (["--execute_mode", "graph"], "invalid choice: 'graph'"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--preset", "tiny", "--output", "/nonexistent/x.json"], "does not exist"),
    ):
        line = one_line_error_from_a_real_process(argv, env, timeout=300)
        assert message in line, line


def test_ablation_with_execute_mode_eager_leaves_graph_mode_out(capsys):
    code, out, err = run_main(capsys, *FAST, "--ablation", "--execute_mode", "eager")
    assert code == 0, err
    table = out.split("ablation (speed-up vs baseline):")[1]
    assert "+graph mode" not in table and "dynamo" not in table
    all_row = next(line for line in table.splitlines() if line.startswith("| 1     | all "))
    cells = [c.strip() for c in all_row.split("|")[4:9]]
    assert cells[:2] == ["sdpa", "fused"] and cells[3:] == ["static", "eager"], all_row


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


# ---- a user's checkpoint directory: each problem one line, before anything is loaded ----------


def _broken_copy(checkpoint, tmp_path, problem: str):
    directory = tmp_path / f"{problem}_{uuid.uuid4().hex[:8]}"
    shutil.copytree(checkpoint, directory)
    weights = directory / "model.safetensors"
    if problem == "truncated":
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size - 100)
    elif problem == "corrupt_header":
        data = bytearray(weights.read_bytes())
        data[8:16] = b"\x00garbage"
        weights.write_bytes(bytes(data))
    elif problem == "config_mismatch":
        config = json.loads((directory / "config.json").read_text())
        config["ffn_hidden_size"] = config["ffn_hidden_size"] // 2
        (directory / "config.json").write_text(json.dumps(config))
    elif problem == "garbage_tokenizer":
        (directory / "tokenizer.model").write_bytes(os.urandom(2000))
    elif problem == "dangling_symlink":
        weights.unlink()
        weights.symlink_to(tmp_path / "blobs" / "missing-blob")
    elif problem == "corrupt_bin":
        weights.unlink()
        (directory / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    return directory


@pytest.mark.parametrize(
    "problem, message",
    [
        ("truncated", "truncated or corrupt download); re-download"),
        ("corrupt_header", "not valid JSON (corrupt or not safetensors); re-download"),
        ("config_mismatch", "config.json does not match the weights; fix config.json"),
        ("garbage_tokenizer", "tokenizer.model is not a SentencePiece model"),
        ("dangling_symlink", "is a dangling symlink"),
        ("corrupt_bin", "cannot load"),
    ],
)
def test_broken_checkpoint_is_one_line_naming_the_file(capsys, checkpoint, tmp_path, problem, message):
    directory = _broken_copy(checkpoint, tmp_path, problem)
    code, out, err = run_main(
        capsys,
        "--model_path",
        str(directory),
        "--input_max_len",
        "32",
        "--max_new_tokens",
        "2",
        "--iters",
        "1",
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(directory) in lines[0], err
    assert "model:" not in out


# ---- prompts, memory, environment ----------------------------------------------------------------


def test_prompts_file_that_is_not_utf8_is_refused(capsys, checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("caf".encode() + b"\xe9 au lait\n")
    code, _, err = run_main(capsys, "--model_path", str(checkpoint), "--prompts-file", str(prompts))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is not UTF-8 text (bad byte at offset 3)" in err


def test_prompt_with_undecodable_bytes_is_refused(capsys, checkpoint):
    # What Python makes of a non-UTF-8 argv byte: a lone surrogate.
    code, _, err = run_main(capsys, "--model_path", str(checkpoint), "--prompt", "caf\udce9")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--prompt b'caf\\xe9' is not valid UTF-8 text" in err


def test_impossible_batch_size_is_refused_with_the_memory_it_needs(capsys):
    code, out, err = run_main(
        capsys,
        "--preset",
        "chatglm3-6b",
        "--batch_size",
        "1",
        "4096",
        "--input_max_len",
        "4096",
        "--max_new_tokens",
        "4096",
    )
    assert code == 2, err
    assert "--batch_size 4096 with 8192 tokens needs about" in err and "GiB free" in err
    assert "model:" not in out


@pytest.mark.parametrize(
    "variable, value",
    [
        ("CHATGLM_ATTENTION", "flash"),
        ("CHATGLM_RMSNORM", "apex"),
        ("CHATGLM_KV_CACHE", "paged"),
        ("EXE_MODE", "graph"),
    ],
)
@pytest.mark.parametrize("with_flag", [False, True])
def test_invalid_fast_path_variable_is_one_line_even_with_a_flag(
    capsys, monkeypatch, variable, value, with_flag
):
    monkeypatch.setenv(variable, value)
    flags = ["--attention", "sdpa", "--rmsnorm", "math", "--kv_cache", "tuple", "--execute_mode", "eager"]
    code, _, err = run_main(capsys, *FAST, *(flags if with_flag else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"{variable}={value!r} is not valid" in lines[0], err


def test_fast_path_variables_are_honoured_and_reported(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATGLM_ATTENTION", "math")
    monkeypatch.setenv("CHATGLM_RMSNORM", "math")
    monkeypatch.setenv("CHATGLM_LINEAR", "gemv")
    monkeypatch.setenv("CHATGLM_KV_CACHE", "static")
    monkeypatch.setenv("CHATGLM_GRAPH_BACKEND", "eager")
    monkeypatch.setenv("EXE_MODE", "dynamo")
    out_json = tmp_path / "r.json"
    code, out, err = run_main(capsys, *FAST, "--output", str(out_json))
    assert code == 0, err
    (result,) = json.loads(out_json.read_text())["results"]
    got = (result["attention"], result["rmsnorm"], result["linear"], result["kv_cache"], result["exe_mode"])
    assert got == ("math", "math", "gemv", "static", "dynamo")
    assert result["graph_backend"] == "eager"
    assert "| dynamo | math      | math    | gemv   | static | eager    |" in out


def test_flags_beat_variables_and_auto_is_shown_resolved(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATGLM_ATTENTION", "math")
    monkeypatch.setenv("CHATGLM_KV_CACHE", "static")
    out_json = tmp_path / "r.json"
    code, _, err = run_main(
        capsys, *FAST, "--attention", "sdpa", "--kv_cache", "tuple", "--output", str(out_json)
    )
    assert code == 0, err
    (result,) = json.loads(out_json.read_text())["results"]
    # rmsnorm: no flag, no variable -> auto, which is the fused kernel on a CPU.
    assert (result["attention"], result["rmsnorm"], result["kv_cache"], result["graph_backend"]) == (
        "sdpa",
        "fused",
        "tuple",
        "-",
    )


# ---- checked before the model loads, not after the timed run -------------------------------------


def test_baseline_without_the_original_file_fails_before_loading(capsys, checkpoint):
    code, out, err = run_main(capsys, "--model_path", str(checkpoint), "--baseline", "--input_max_len", "32")
    assert code == 2 and "has no modeling_chatglm_orig.py" in err
    assert "model:" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--plot", "{tmp}/latency.xyz"], "unknown image type '.xyz'"),
        (["--plot", "{tmp}/latency"], "unknown image type '(no extension)'"),
        (["--output", "{tmp}/same.png", "--plot", "{tmp}/same.png"], "--output and --plot both name"),
    ],
)
def test_output_problems_fail_before_the_run(capsys, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_main(capsys, *FAST, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert "model:" not in out


def test_plot_without_matplotlib_fails_before_the_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like to import
    code, out, err = run_main(capsys, *FAST, "--plot", str(tmp_path / "p.png"))
    assert code == 2 and "--plot needs matplotlib" in err
    assert "model:" not in out


def test_output_replaces_the_previous_file_atomically_on_a_full_disk(tmp_path):
    # A real write failure: the file-size limit makes the write fail part-way (EFBIG), as a
    # full disk would. The previous results must survive and no partial file may be left.
    previous = tmp_path / "results.json"
    previous.write_text('{"previous": true}\n')
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from chatglm_bench import UsageError, report\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    report.write_json(Path({str(previous)!r}), {{'results': ['x' * 100] * 1000}})\n"
        "except UsageError as error:\n"
        "    print(error)\n"
        "    sys.exit(2)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "the previous file is unchanged" in proc.stdout
    assert previous.read_text() == '{"previous": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_output_symlink_is_replaced_not_written_through(capsys, tmp_path):
    shared = tmp_path / "shared.json"
    shared.write_text("{}\n")
    link = tmp_path / "r.json"
    link.symlink_to(shared)
    code, _, err = run_main(capsys, *FAST, "--output", str(link))
    assert code == 0, err
    assert shared.read_text() == "{}\n"
    assert not link.is_symlink() and json.loads(link.read_text())["results"]


def test_closed_stdout_still_writes_output_and_prints_no_traceback(tmp_path):
    out_json = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "benchmark_chatglm.py"), *FAST, "--output", str(out_json)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    proc.stdout.readline()  # what `| head -1` reads, then it goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "Error" not in err, err
    assert json.loads(out_json.read_text())["results"]


# ---- launch problems ------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_world_size_without_a_launcher_names_the_launchers(capsys, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_main(capsys, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "MASTER_ADDR/MASTER_PORT not set" in err and "deepspeed --num_gpus 2" in err and "torchrun" in err


@pytest.mark.parametrize(
    "rank, message",
    [(0, "could not meet the other 1 rank(s)"), (1, "found nothing listening at 127.0.0.1:")],
)
def test_rendezvous_without_the_other_ranks_times_out_in_one_line(tmp_path, rank, message):
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        CHATGLM_DIST_TIMEOUT="2",
    )
    line = one_line_error_from_a_real_process(FAST, env, timeout=20)
    assert message in line, line
    assert "within 2 s" in line and "deepspeed --num_gpus 2" in line


@pytest.mark.parametrize("rank, printed", [(0, 1), (1, 0), (2, 0)])
def test_invalid_tensor_parallel_size_is_printed_by_rank_zero_only(capsys, monkeypatch, rank, printed):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    code, _, err = run_main(capsys, *FAST)
    assert code == 2
    assert err.count("cannot share 4 query heads in 2 KV groups") == printed, err
    assert len(err.strip().splitlines()) == printed


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf"])
def test_invalid_rendezvous_timeout_is_one_line(capsys, monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("CHATGLM_DIST_TIMEOUT", value)
    code, _, err = run_main(capsys, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"CHATGLM_DIST_TIMEOUT={value!r} is not a positive number of seconds" in err


def test_prompt_length_sweep_reports_peak_memory_per_phase_and_plots_it(capsys, tmp_path):
    out_json, out_png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = [a for a in FAST if a not in ("--input_max_len", "16")]
    code, out, err = run_main(
        capsys, *args, "--input_max_len", "8", "64", "--output", str(out_json), "--plot", str(out_png)
    )
    assert code == 0, err
    assert "input 8 / 64 tokens" in out and "prefill peak MiB" in out and "decode peak MiB" in out
    results = json.loads(out_json.read_text())["results"]
    assert [r["input_len"] for r in results] == [8, 64]
    for r in results:
        # Each phase's own peak (RSS on a CPU, reset between the phases): at least the weights.
        assert r["prefill_peak_memory_bytes"] > 0 and r["decode_peak_memory_bytes"] > 0
        assert r["peak_memory_bytes"] == max(r["prefill_peak_memory_bytes"], r["decode_peak_memory_bytes"])
    assert out_png.stat().st_size > 0
    code, _, err = run_main(capsys, *args, "--input_max_len", "8", "0")
    assert code == 2 and "--input_max_len values must be at least 1" in err


def test_cpu_peak_memory_is_reset_per_phase():
    import torch

    from chatglm_bench.measure import peak_memory, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    base, kind = peak_memory(cpu)
    # 64 MiB of fresh pages, touched: an anonymous mapping of its own (a tensor's allocation can be
    # served from heap memory an earlier test left resident, and then RSS does not grow).
    block = mmap.mmap(-1, 64 * 2**20)
    torch.frombuffer(block, dtype=torch.uint8).fill_(1)
    grown = peak_memory(cpu)[0]
    block.close()
    reset_peak_memory(cpu)
    after = peak_memory(cpu)[0]
    assert kind == "peak RSS of the phase"
    assert grown - base >= 60 * 2**20 and after < grown - 32 * 2**20


def test_quantize_sweep_adds_int8_and_int4_rows_with_the_bytes_they_hold(capsys, tmp_path):
    out_json = tmp_path / "q.json"
    code, out, err = run_main(capsys, *FAST, "--quantize", "none", "8", "4", "--output", str(out_json))
    assert code == 0, err
    assert "| eager (int8)" in out and "| eager (int4)" in out and "floor ms" in out
    report = json.loads(out_json.read_text())
    results = report["results"]
    assert [r["quantization"] for r in results] == ["none", "int8", "int4"]
    unquantized, int8, int4 = (r["decode_bytes_per_step"] for r in results)
    # --dtype auto: float32 (4 bytes/weight) or, on bf16-capable CPUs, bfloat16 (2 bytes/weight).
    width = {"float32": 4, "bfloat16": 2}[report["environment"]["dtype"]]
    assert int8 < (1.25 / width) * unquantized and int4 < (1.0 / width) * unquantized
    code, out, err = run_main(
        capsys, *FAST, "--quantize", "none", "8", "--ablation", "--graph_backend", "eager"
    )
    assert code == 0, err
    assert "| all + int8" in out.split("ablation (speed-up vs baseline):")[1]


def test_unusable_quant_kernel_is_one_line_with_exit_code_2(capsys, monkeypatch):
    monkeypatch.setenv("CHATGLM_QUANT_KERNEL", "npu")
    code, out, err = run_main(capsys, *FAST, "--quantize", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "CHATGLM_QUANT_KERNEL=math" in err


# --- --dtype auto on a CPU ------------------------------------------------------------------


def test_header_and_json_name_the_cpu_its_bf16_units_and_the_dtype_choice(capsys, tmp_path):
    from chatglm_bench.hardware import cpu_bf16_units, cpu_model

    out_json = tmp_path / "r.json"
    code, out, err = run_main(capsys, *FAST, "--output", str(out_json))
    assert code == 0, err
    environment = json.loads(out_json.read_text())["environment"]
    assert environment["cpu"] == {"model": cpu_model(), "bf16_units": cpu_bf16_units()}
    assert environment["dtype_choice"].startswith("auto: ")
    units = " ".join(cpu_bf16_units()) or "none"
    assert f"cpu: {cpu_model()}; bf16 units (AVX512-BF16/AMX): {units}" in out
    assert f"({environment['dtype_choice']})" in out


def test_dtype_auto_on_a_bf16_capable_cpu_is_bfloat16_untimed(monkeypatch):
    import torch

    from chatglm_bench import hardware, plan

    # The CPU's flags are this test's input; the choice is under test. Nothing is timed.
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: ["amx_bf16"])
    choices = {plan.resolve_dtype("auto", torch.device("cpu"), n_params=1000) for _ in range(3)}
    assert choices == {(torch.bfloat16, "auto: native bf16 on this CPU (amx_bf16)")}


def test_dtype_auto_without_bf16_units_is_float32(monkeypatch):
    import torch

    from chatglm_bench import hardware, plan

    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: [])
    assert plan.resolve_dtype("auto", torch.device("cpu"), n_params=1000) == (
        torch.float32,
        "auto: no AVX512-BF16/AMX on this CPU",
    )


def test_prompt_plus_new_tokens_beyond_a_checkpoints_context_is_one_line(capsys, checkpoint):
    code, out, err = run_main(
        capsys, "--model_path", str(checkpoint), "--input_max_len", "200", "--max_new_tokens", "100"
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "exceeds the model's context" in err


def test_random_preset_is_built_with_the_context_the_run_needs():
    import torch

    from chatglm_bench.presets import PRESETS, build_preset_model

    base = PRESETS["tiny"]["seq_length"]
    model = build_preset_model("tiny", torch.float32, seed=0, context=8 * base)
    assert model.config.seq_length == 8 * base and model.transformer.seq_length == 8 * base
    assert build_preset_model("tiny", torch.float32, seed=0).config.seq_length == base
    assert build_preset_model("tiny", torch.float32, seed=0, context=base // 2).config.seq_length == base


def test_bandwidth_yardstick_reads_at_least_a_gib_and_the_working_set_and_keeps_the_best(monkeypatch):
    from chatglm_bench import hardware

    read = []
    rates = {hardware.YARDSTICK_MIN_BYTES: 20.0, 64 * 2**20: 55.0}
    monkeypatch.setattr(
        hardware, "_best_read_rate", lambda nbytes, passes: read.append(nbytes) or rates[nbytes]
    )
    # A small model is read from a cache: its own size is measured too, and the faster rate wins.
    assert hardware.measure_cpu_bandwidth(64 * 2**20) == 55.0
    assert sorted(read) == [64 * 2**20, 2**30]
    read.clear()
    # A large one streams from memory: only the >= 1 GiB buffer.
    assert hardware.measure_cpu_bandwidth(12 * 2**30) == 20.0 and read == [2**30]


def test_the_yardstick_of_a_run_is_its_best_read_and_says_how_many_and_their_range():
    from chatglm_bench.hardware import HardwareRef, best_over_run

    start = HardwareRef("cpu", 48.0, 0.9, "measured here")
    # A fast minute after a slow start: the best read wins, and the source names the reads.
    ref = best_over_run(start, [81.2, 50.0])
    assert ref.bandwidth_gbs == 81.2 and ref.tflops == 0.9
    assert (
        ref.source
        == "measured here; bandwidth the best of 3 reads, at the start and after each row: 48.0-81.2 GB/s"
    )
    assert best_over_run(start, [40.0]).bandwidth_gbs == 48.0  # a slower read never lowers it
    assert best_over_run(start, []) is start  # no row finished: the start's read alone
    nominal = HardwareRef("NVIDIA H200", None, None, "unknown device")
    assert best_over_run(nominal, [50.0]) is nominal  # no measured bandwidth to improve on


def test_bandwidth_yardstick_reads_as_our_kernels_do_where_they_build():
    import modeling_chatglm as modeling
    from chatglm_bench import hardware

    weight = torch.ones(64, 1024)
    reads = hardware._native_reads(weight)
    if modeling._NativeDot.load() is None:
        assert reads == []
    else:
        # The tiled read of the buffer itself (every byte: 64 x 4096 bytes of float32 ones), and
        # a copy in huge pages where Linux offers them.
        assert int(reads[0]()) == 64 * 1024 * sum(torch.ones(1).view(torch.uint8).tolist())
        assert len(reads) in (1, 3)
    assert hardware._best_read_rate(2**20, 1) > 0


def test_small_rates_keep_three_significant_digits():
    from chatglm_bench.report import _fmt_significant

    assert _fmt_significant(0.0012345) == "0.00123" and _fmt_significant(12.345) == "12.3"
    assert _fmt_significant(float("nan")) == "-"


def test_the_model_source_holds_one_model_at_a_time():
    """A quantization sweep with --baseline on the 6B model: each model is half of a 24 GiB
    machine, so the one being replaced must be gone before the next is built or loaded."""
    import gc
    import weakref

    from chatglm_bench.models import ModelSource
    from chatglm_bench.plan import Entry

    live = weakref.WeakSet()

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gc.collect()
            assert len(live) == 0, "a previous model is still alive"
            live.add(self)
            self.transformer = torch.nn.Module()
            self.transformer.encoder = torch.nn.Identity()
            self.transformer.set_runtime_options = lambda **options: None
            self.bits = 0

        def quantize(self, bits):
            self.bits = bits

    first = Fake()
    source = ModelSource(first, rebuild=Fake, load_original=Fake)
    del first
    plan = [Entry("run", {"exe_mode": "eager"}, {}, bits) for bits in (0, 8, 4)]
    plan += [Entry("original", {"exe_mode": mode}, {}, original=True) for mode in ("eager", "dynamo")]
    plan += [Entry("run", {"exe_mode": "eager"}, {}, 8)]
    model = None
    got = []
    for entry in plan:
        model = None
        model = source(entry)
        got.append(getattr(model, "bits", None) if not entry.original else "original")
    assert got == [0, 8, 4, "original", "original", 8]
