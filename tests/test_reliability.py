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
from helpers import installer_originals, write_installer_checkpoint, write_our_stand_ins

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
    earlier = tmp_path / "earlier.json"
    earlier.write_text("{}")
    os.link(earlier, tmp_path / "earlier.png")
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
        (["--output", earlier, "--plot", tmp_path / "earlier.png"], "--output and --plot both name"),
    ]
    for extra, message in cases:
        line = one_line_error(capsys, *base, *extra)
        assert message in line, (extra, line)
    for path, data in before.items():
        assert path.read_bytes() == data
    assert not (checkpoint / "results.json").exists() and not (checkpoint / "plot.png").exists()


def test_make_tiny_refuses_to_write_into_this_repository(tmp_path):
    before = {name: (REPO / name).read_bytes() for name in ("README.md", *mtc.CODE_FILES)}
    for target in (REPO, REPO / "scripts" / ".."):
        result = run_process([REPO / "scripts" / "make_tiny_checkpoint.py", target, "--force"], tmp_path)
        assert result.returncode == 2 and "is this repository" in result.stderr, result.stderr
    assert {name: (REPO / name).read_bytes() for name in before} == before


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

ORIGINALS = installer_originals(inst.OUR_FILES)


@pytest.fixture
def source_dir(tmp_path) -> Path:
    return write_our_stand_ins(tmp_path / "ours", inst.OUR_FILES)


@pytest.fixture
def plain_checkpoint(tmp_path) -> Path:
    config = {"model_type": "chatglm", "padded_vocab_size": 65024}
    return write_installer_checkpoint(tmp_path / "chatglm3-6b", inst.OUR_FILES, config)


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


@pytest.mark.parametrize("problem", ["all_removed", "directory", "dangling_link"])
def test_restore_without_a_usable_backup_fails_and_changes_nothing(
    tmp_path, plain_checkpoint, source_dir, problem
):
    inst.install(plain_checkpoint, source_dir=source_dir)
    names = inst.OUR_FILES if problem == "all_removed" else ["configuration_chatglm.py"]
    for name in names:
        (plain_checkpoint / inst.backup_name(name)).unlink()
    backup = plain_checkpoint / inst.backup_name(names[0])
    if problem == "directory":
        backup.mkdir()
    elif problem == "dangling_link":
        backup.symlink_to(tmp_path / "gone.py")
    before = snapshot(plain_checkpoint)
    with pytest.raises(inst.UsageError, match="nothing was changed") as error:
        inst.restore(plain_checkpoint, source_dir=source_dir)
    assert backup.name in str(error.value)
    assert snapshot(plain_checkpoint) == before


def test_restore_says_which_file_of_ours_it_left_without_a_backup(plain_checkpoint, source_dir):
    ours = (source_dir / "tokenization_chatglm.py").read_bytes()
    (plain_checkpoint / "tokenization_chatglm.py").write_bytes(ours)
    inst.install(plain_checkpoint, source_dir=source_dir)  # ours already there: no backup of it
    report = inst.restore(plain_checkpoint, source_dir=source_dir)
    assert (plain_checkpoint / "modeling_chatglm.py").read_bytes() == ORIGINALS["modeling_chatglm.py"]
    (line,) = [line for line in report if line.startswith("tokenization_chatglm.py")]
    assert "left as is (ours, and no tokenization_chatglm_orig.py" in line


def test_restore_cli_exits_2_on_one_line_when_the_backups_are_gone(tmp_path, plain_checkpoint):
    script = REPO / "scripts" / "install_into_checkpoint.py"
    assert run_process([script, plain_checkpoint], tmp_path).returncode == 0
    for name in inst.OUR_FILES:
        (plain_checkpoint / inst.backup_name(name)).unlink()
    result = run_process([script, plain_checkpoint, "--restore"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "nothing to restore" in result.stderr and "no modeling_chatglm_orig.py" in result.stderr


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


# --- 3. A tensor missing from the checkpoint is an error, not a random weight -------------------


def _rewrite_weights(directory: Path, drop=(), bin_file: bool = False) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(directory / "model.safetensors")).items() if k not in drop}
    (directory / "model.safetensors").unlink()
    if bin_file:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "drop, bin_file, first",
    [
        (["transformer.output_layer.weight"], False, "transformer.output_layer.weight"),
        (["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"], False, "layers.1.mlp.dense_4h_to_h"),
        (
            ["transformer.encoder.final_layernorm.weight", "transformer.embedding.word_embeddings.weight"],
            True,
            "lacks 2 tensor(s)",
        ),
    ],
)
def test_a_tensor_missing_from_the_checkpoint_is_named_with_the_count(
    capsys, checkpoint, tmp_path, drop, bin_file, first
):
    broken = copy_checkpoint(checkpoint, tmp_path)
    _rewrite_weights(broken, drop, bin_file)
    line = one_line_error(capsys, "--model_path", broken, *FAST)
    assert first in line and f"lacks {len(drop)} tensor(s)" in line, line
    assert "random" in line


def test_a_bin_checkpoint_whose_shapes_differ_from_the_config_names_the_tensor(capsys, checkpoint, tmp_path):
    edited = copy_checkpoint(checkpoint, tmp_path)
    _rewrite_weights(edited, bin_file=True)  # .bin: no header to compare before loading
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(
        json.dumps({**config, "ffn_hidden_size": config["ffn_hidden_size"] * 2})
    )
    line = one_line_error(capsys, "--model_path", edited, *FAST)
    assert "mlp.dense_4h_to_h.weight" in line or "mlp.dense_h_to_4h.weight" in line, line
    assert "but config.json implies" in line and "above report" not in line


def test_a_quantized_checkpoint_missing_its_scales_is_named(capsys, checkpoint, tmp_path):
    import torch
    from safetensors.torch import save_file

    from modeling_chatglm import ChatGLMForConditionalGeneration

    quantized = copy_checkpoint(checkpoint, tmp_path)
    model = ChatGLMForConditionalGeneration.from_pretrained(str(quantized), torch_dtype=torch.float32)
    model.quantize(8)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("weight_scale")}
    save_file(state, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((quantized / "config.json").read_text())
    config.update(quantization_bit=8, quantization_group_size=0, quantization_output_layer=True)
    (quantized / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # the loading bar of the model built above
    line = one_line_error(capsys, "--model_path", quantized, *FAST)
    assert "weight_scale" in line and "tensor(s)" in line, line


# --- 4. Config fields and the tokenizer's vocabulary are checked up front ------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_layers", "2", "num_layers='2' must be a positive integer"),
        ("num_attention_heads", None, "num_attention_heads=None must be a positive integer"),
        ("hidden_size", 0, "hidden_size=0 must be a positive integer"),
        ("seq_length", 2.5, "seq_length=2.5 must be a positive integer"),
        ("multi_query_group_num", 3, "must be a multiple of multi_query_group_num=3"),
        ("kv_channels", 18, "kv_channels=18 must be a multiple of 4"),
        ("multi_query_attention", "yes", "must be true or false"),
        ("layernorm_epsilon", -1, "layernorm_epsilon=-1 must be a positive number"),
        ("quantization_bit", 3, "quantization_bit=3 must be 0, 4 or 8"),
    ],
)
def test_a_bad_config_field_is_named_before_anything_loads(
    capsys, checkpoint, tmp_path, field, value, message
):
    edited = copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((edited / "config.json").read_text())
    config[field] = value
    (edited / "config.json").write_text(json.dumps(config))
    line = one_line_error(capsys, "--model_path", edited, *FAST)
    assert message in line and "config.json" in line, line
    assert "damaged" not in line


def test_the_model_refuses_a_bad_config_with_a_value_error():
    from configuration_chatglm import ChatGLMConfig
    from modeling_chatglm import ChatGLMForConditionalGeneration

    base = dict(num_layers=1, hidden_size=32, ffn_hidden_size=64, kv_channels=16, num_attention_heads=2)
    for change, message in [
        ({"num_layers": "1"}, "num_layers"),
        ({"num_attention_heads": None}, "num_attention_heads"),
        ({"multi_query_attention": True, "multi_query_group_num": 0}, "multi_query_group_num"),
        ({"pre_seq_len": -4}, "pre_seq_len"),
    ]:
        with pytest.raises(ValueError, match=message):
            ChatGLMForConditionalGeneration(ChatGLMConfig(**{**base, **change, "padded_vocab_size": 64}))


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("rope_ratio=-1", "rope_ratio=-1 must be a positive number"),
        ("quantization_bit=3", "quantization_bit=3 must be 0, 4 or 8"),
        ("kv_channels=6", "kv_channels=6 must be a multiple of 4"),
        ("layernorm_epsilon=0", "layernorm_epsilon=0 must be a positive number"),
    ],
)
def test_make_tiny_refuses_a_config_the_model_would_refuse_in_one_line(capsys, tmp_path, assignment, message):
    assert mtc.main([str(tmp_path / "out"), "--set", assignment]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(capsys, checkpoint, tmp_path):
    edited = copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((edited / "config.json").read_text())
    rows = config["padded_vocab_size"]
    _shrink_vocabulary(edited, config, rows - 128)
    line = one_line_error(capsys, "--model_path", edited, *FAST)
    assert f"padded_vocab_size={rows - 128}" in line and "tokenizer.model" in line, line


def _shrink_vocabulary(directory: Path, config: dict, rows: int) -> None:
    """A consistent checkpoint (weights and config) whose embedding is smaller than its tokenizer."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    for name in ("transformer.embedding.word_embeddings.weight", "transformer.output_layer.weight"):
        state[name] = state[name][:rows].contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(
        json.dumps({**config, "padded_vocab_size": rows, "vocab_size": rows})
    )


# --- 7. chat() on a small checkpoint, and chatglm2-style history ---------------------------------


@pytest.fixture(scope="module")
def chat_model(checkpoint):
    from modeling_chatglm import ChatGLMForConditionalGeneration
    from tokenization_chatglm import ChatGLMTokenizer

    model = ChatGLMForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    return model, ChatGLMTokenizer(str(checkpoint / "tokenizer.model"))


def test_chat_default_max_length_is_bounded_by_the_context(tmp_path, sp_model_path):
    import torch
    from transformers.generation.logits_process import LogitsProcessorList

    from modeling_chatglm import ChatGLMForConditionalGeneration
    from tokenization_chatglm import ChatGLMTokenizer

    short = mtc.make_tiny_checkpoint(
        tmp_path / "short", preset="tiny", tokenizer_model=sp_model_path, overrides={"seq_length": 64}
    )
    model = ChatGLMForConditionalGeneration.from_pretrained(str(short)).eval()
    tokenizer = ChatGLMTokenizer(str(short / "tokenizer.model"))
    context = model.config.seq_length
    assert context == 64
    stops = [
        tokenizer.eos_token_id,
        tokenizer.get_command("<|user|>"),
        tokenizer.get_command("<|observation|>"),
    ]

    def never_stop(input_ids, scores):  # the answer runs to max_length
        scores[:, stops] = -torch.inf
        return scores

    for call in (
        lambda: model.chat(
            tokenizer, "你好", history=[], do_sample=False, logits_processor=LogitsProcessorList([never_stop])
        ),
        lambda: list(
            model.stream_chat(
                tokenizer,
                "hello",
                history=[],
                do_sample=False,
                logits_processor=LogitsProcessorList([never_stop]),
            )
        )[-1],
    ):
        response, history = call()
        assert history[0]["content"] in ("你好", "hello")
        assert len(tokenizer.encode(response, add_special_tokens=False)) > context // 2  # it ran to the bound


def test_chat_accepts_chatglm2_history_pairs_and_refuses_other_shapes(chat_model):
    model, tokenizer = chat_model
    pairs = [("hello", "world"), ("the quick", "brown fox")]
    turns = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "metadata": "", "content": "world"},
        {"role": "user", "content": "the quick"},
        {"role": "assistant", "metadata": "", "content": "brown fox"},
    ]
    a = model.chat(tokenizer, "city", history=pairs, max_length=120, do_sample=False)
    b = model.chat(tokenizer, "city", history=[dict(t) for t in turns], max_length=120, do_sample=False)
    assert a == b and a[1][:4] == turns
    assert pairs == [("hello", "world"), ("the quick", "brown fox")]  # the caller's list is unchanged
    for bad in (["hello"], [("q", "a", "x")], [{"content": "no role"}], "hello", [(1, 2)]):
        with pytest.raises(ValueError, match="history"):
            model.chat(tokenizer, "city", history=bad, max_length=60)
        with pytest.raises(ValueError, match="history"):
            next(model.stream_chat(tokenizer, "city", history=bad, max_length=60))
    with pytest.raises(ValueError, match="max_length"):
        model.chat(tokenizer, "city", max_length=0)


# --- 8. Edges of the public API: a ValueError that says what is wrong ---------------------------


def test_bad_inputs_to_forward_are_value_errors(chat_model):
    import torch

    model, _ = chat_model
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    vocab, context = model.config.padded_vocab_size, model.config.seq_length
    cases = [
        (dict(input_ids=ids[0]), "input_ids must be \\[batch, seq\\]"),
        (dict(input_ids=ids[None]), "input_ids must be \\[batch, seq\\]"),
        (dict(input_ids=ids.float()), "integer token ids"),
        (dict(input_ids=ids[:, :0]), "empty"),
        (dict(input_ids=ids, position_ids=torch.arange(4)), "position_ids has shape"),
        (dict(input_ids=ids, position_ids=torch.arange(4)[None]), "position_ids has shape"),
        (
            dict(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, context]] * 2)),
            "outside the model's positions",
        ),
        (
            dict(input_ids=ids, position_ids=torch.tensor([[-1, 0, 1, 2]] * 2)),
            "outside the model's positions",
        ),
        (dict(input_ids=ids + vocab), f"token id {vocab + 12}"),
        (dict(input_ids=ids - 100), "token id -95"),
        (
            dict(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])),
            "row 1 is all zeros",
        ),
        (dict(input_ids=ids, attention_mask=torch.ones(2, 1, 4, 4)), "attention_mask must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)
    assert model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])).logits.shape[
        :2
    ] == (2, 4)


def test_quantize_refuses_a_bad_group_size(checkpoint):
    import torch

    from modeling_chatglm import ChatGLMForConditionalGeneration

    model = ChatGLMForConditionalGeneration.from_pretrained(str(checkpoint), torch_dtype=torch.float32)
    for group_size in (-32, 32.5, "32", True):
        with pytest.raises(ValueError, match="group_size"):
            model.quantize(4, group_size=group_size)
    assert not model.quantized
    model.quantize(4, group_size=32)
    assert model.quantized


# --- 6. Ctrl-C mid-sweep keeps what was measured ------------------------------------------------

INTERRUPT_AT = """
import os, signal, sys
sys.path[:0] = [{repo!r}]
import benchmark_chatglm
from chatglm_bench import measure

real, calls = measure.measure, []

def measure_until_ctrl_c(*args, **kwargs):
    calls.append(1)
    if len(calls) == {at}:
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, as the terminal sends it
    return real(*args, **kwargs)

measure.measure = measure_until_ctrl_c
# A shell starts background jobs (nohup, CI runners) with SIGINT ignored, and Python keeps that;
# a terminal's foreground run has Python's own handler, which is what Ctrl-C meets.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(benchmark_chatglm.main({argv!r}))
"""


def run_interrupted(tmp_path, at: int, argv) -> subprocess.CompletedProcess:
    code = INTERRUPT_AT.format(repo=str(REPO), at=at, argv=[str(a) for a in argv])
    return run_process(["-c", code], tmp_path)


def test_ctrl_c_mid_sweep_writes_the_finished_rows_marked_partial(tmp_path):
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--preset", "tiny", *FAST, "--batch_size", "1", "2", "3", "--output", out]
    result = run_interrupted(tmp_path, 3, argv + ["--plot", plot])
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"benchmark_chatglm.py: interrupted (Ctrl-C) after 2 of 3 runs; wrote them to {out} marked partial"
    ]
    assert "Traceback" not in result.stdout and "PARTIAL" in result.stdout
    assert result.stdout.count("| eager ") == 2
    payload = json.loads(out.read_text())
    assert payload["partial"] is True and [r["batch_size"] for r in payload["results"]] == [1, 2]
    assert plot.stat().st_size > 1000


def test_ctrl_c_before_anything_finished_keeps_the_previous_output(tmp_path):
    out = tmp_path / "r.json"
    out.write_text('{"results": "from an earlier run"}')
    result = run_interrupted(
        tmp_path, 1, ["--preset", "tiny", *FAST, "--batch_size", "1", "2", "--output", out]
    )
    assert result.returncode == 130, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "before any configuration finished" in lines[0], result.stderr
    assert out.read_text() == '{"results": "from an earlier run"}'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_benchmark_removes_a_killed_runs_temporary_of_its_output(capsys, tmp_path):
    out = tmp_path / "r.json"
    stale = tmp_path / ".r.json.999999999.tmp.json"  # a run killed while writing r.json
    live = tmp_path / ".r.json.1.tmp.json"  # pid 1 is alive: not ours to remove
    other = tmp_path / ".notes.txt.999999999.tmp.txt"  # another file's: left alone
    for path in (stale, live, other):
        path.write_text("{")
    code, _, err = run_main(capsys, "--preset", "tiny", *FAST, "--output", out)
    assert code == 0, err
    assert json.loads(out.read_text())["results"]
    assert hidden(tmp_path) == sorted([live.name, other.name])
