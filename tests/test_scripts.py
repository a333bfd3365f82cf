"""scripts/make_tiny_checkpoint.py and scripts/install_into_checkpoint.py.

transformers reads HF_MODULES_CACHE once, at import, and transformers 4.31 names a local
checkpoint's cached remote-code module after the directory's basename alone. So besides pointing
HF_MODULES_CACHE at tmp_path (effective for subprocesses and for a transformers imported later),
every checkpoint loaded here gets a unique directory name: a stale cached module is never reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from helpers import installer_originals, write_installer_checkpoint, write_our_stand_ins
from safetensors import safe_open
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import install_into_checkpoint as inst  # noqa: E402
import make_tiny_checkpoint as mtc  # noqa: E402

GOLDEN = REPO_ROOT / "tests" / "golden"
SUBPROCESS_TIMEOUT = 120


@pytest.fixture
def unique_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))

    def make(prefix: str = "ckpt") -> Path:
        return tmp_path / f"{prefix}_{uuid.uuid4().hex[:12]}"

    return make


def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules_cli")}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=env,
        cwd=str(tmp_path),
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0]
    for needle in needles:
        assert needle in lines[0]


# ---- make_tiny_checkpoint ---------------------------------------------------------------------


def test_tiny_checkpoint_loads_with_auto_class_without_missing_or_unexpected_keys(unique_dir):
    from transformers import AutoModelForCausalLM

    out = mtc.make_tiny_checkpoint(unique_dir())
    model, info = AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=True, output_loading_info=True
    )
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert (
        Path(sys.modules[type(model).__module__].__file__).read_bytes()
        == (REPO_ROOT / "modeling_chatglm.py").read_bytes()
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info.get("mismatched_keys") and not info.get("error_msgs")
    saved = load_file(out / "model.safetensors")
    loaded = model.state_dict()
    assert set(saved) == set(loaded)
    for name, tensor in saved.items():
        assert torch.equal(loaded[name].float(), tensor.float()), name
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()


_PEAK_MEMORY_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[1] + "/scripts")
import make_tiny_checkpoint as mtc
import torch, transformers  # noqa: F401  (imported before the baseline is taken)
import modeling_chatglm, configuration_chatglm  # noqa: F401
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = mtc.make_tiny_checkpoint(sys.argv[2], preset="small-real-vocab", overrides={"hidden_size": 1024, "num_attention_heads": 16})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, (out / "model.safetensors").stat().st_size)
"""


def test_checkpoint_is_written_tensor_by_tensor_in_memory_far_below_its_size(tmp_path):
    # 4 layers at hidden 1024 with the real vocabulary: a 600 MB float32 file. Building the model
    # and a state_dict copy (as before) grew the peak by more than the file; chunked draws by
    # about one 64 MB chunk (and its cast).
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(REPO_ROOT), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    growth, size = map(int, result.stdout.split())
    assert size > 500e6
    assert growth < 0.35 * size, (growth, size)


@pytest.mark.parametrize(
    "fixture, overrides",
    [
        ("tiny-chatglm3", None),
        ("tiny-chatglm3-32k", {"num_layers": 3, "multi_query_group_num": 1, "rope_ratio": 50}),
    ],
)
def test_tiny_preset_reproduces_golden_fixture_weights_and_config(tmp_path, fixture, overrides):
    golden = GOLDEN / fixture
    out = mtc.make_tiny_checkpoint(tmp_path / "ckpt", seed=0, overrides=overrides)
    ours, theirs = load_file(out / "model.safetensors"), load_file(golden / "model.safetensors")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    config, golden_config = (
        json.loads((out / "config.json").read_text()),
        json.loads((golden / "config.json").read_text()),
    )
    for key in set(golden_config) - {"_name_or_path", "transformers_version"}:
        assert config[key] == golden_config[key], key


def test_checkpoint_is_labelled_random(tmp_path):
    out = mtc.make_tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert "RANDOM" in config["_comment"]
    assert "RANDOM" in (out / "README.md").read_text()
    assert config["model_type"] == "chatglm"
    assert config["architectures"] == ["ChatGLMForConditionalGeneration"]
    assert config["auto_map"] == mtc.AUTO_MAP
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        if (REPO_ROOT / name).is_file():
            assert (out / name).read_bytes() == (REPO_ROOT / name).read_bytes()


def test_same_seed_gives_identical_weights_and_another_seed_differs(tmp_path):
    a = load_file(mtc.make_tiny_checkpoint(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(mtc.make_tiny_checkpoint(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(mtc.make_tiny_checkpoint(tmp_path / "c", seed=4) / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    params = [name for name in a if not name.endswith("inv_freq")]
    assert all(not torch.equal(a[name], c[name]) for name in params)


def test_overrides_and_dtype_are_honoured(unique_dir):
    from transformers import AutoModelForCausalLM

    overrides = {"num_layers": 3, "rope_ratio": 2.5, "pre_seq_len": 4}
    half = mtc.make_tiny_checkpoint(unique_dir(), dtype="bfloat16", overrides=overrides, seed=1)
    full = mtc.make_tiny_checkpoint(unique_dir(), dtype="float32", overrides=overrides, seed=1)
    config = json.loads((half / "config.json").read_text())
    assert (config["num_layers"], config["rope_ratio"], config["pre_seq_len"]) == (3, 2.5, 4)
    assert config["torch_dtype"] == "bfloat16"
    half_w, full_w = load_file(half / "model.safetensors"), load_file(full / "model.safetensors")
    assert {t.dtype for t in half_w.values()} == {torch.bfloat16}
    assert "transformer.encoder.layers.2.mlp.dense_4h_to_h.weight" in half_w
    assert "transformer.encoder.layers.3.mlp.dense_4h_to_h.weight" not in half_w
    assert "transformer.prefix_encoder.embedding.weight" in half_w
    # Draws are made in float32, then rounded: the bfloat16 file is the rounded float32 one.
    for name, tensor in full_w.items():
        if not name.endswith("inv_freq"):
            assert torch.equal(half_w[name], tensor.to(torch.bfloat16)), name
    model, info = AutoModelForCausalLM.from_pretrained(
        str(half), trust_remote_code=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.rope_ratio == 2.5 and model.config.pre_seq_len == 4
    assert len(model.transformer.encoder.layers) == 3


def test_small_real_vocab_preset_has_the_real_vocabulary_and_head_dim():
    values = mtc.resolve_config_values("small-real-vocab", None, {})
    assert values["padded_vocab_size"] == 65024
    assert values["kv_channels"] == 64 and values["num_layers"] == 4 and values["hidden_size"] == 512


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"no_such_field": 1}, "unknown config field"),
        ({"vocab_size": 256}, "padded_vocab_size"),
        ({"num_layers": "two"}, "positive integer"),
        ({"seq_length": 0}, "positive integer"),
        ({"rmsnorm": 1}, "true or false"),
        ({"rope_ratio": "fifty"}, "a number"),
        ({"multi_query_group_num": 3}, "multiple of"),
    ],
)
def test_bad_overrides_are_refused(tmp_path, overrides, message):
    with pytest.raises(mtc.UsageError, match=message):
        mtc.make_tiny_checkpoint(tmp_path / "ckpt", overrides=overrides)
    assert not (tmp_path / "ckpt").exists()


def test_refuses_non_empty_directory_unless_forced(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(mtc.UsageError, match="not empty"):
        mtc.make_tiny_checkpoint(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    mtc.make_tiny_checkpoint(out, force=True)
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "user data"


def test_tokenizer_model_is_included_and_vocab_covers_it(unique_dir, sp_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = mtc.make_tiny_checkpoint(unique_dir(), tokenizer_model=sp_model_path)
    assert (out / "tokenizer.model").read_bytes() == sp_model_path.read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["auto_map"] == {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    assert tok_config["tokenizer_class"] == "ChatGLMTokenizer" and tok_config["padding_side"] == "left"
    config = json.loads((out / "config.json").read_text())
    assert config["padded_vocab_size"] >= 150 + mtc.N_COMMAND_TOKENS > 128

    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert len(tokenizer) <= config["padded_vocab_size"]
    batch = tokenizer(["the weather", "model number 3 answers"], return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left"
    model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[-1] == config["padded_vocab_size"]


def test_tokenizer_larger_than_explicit_vocab_is_refused(tmp_path, sp_model_path):
    with pytest.raises(mtc.UsageError, match="smaller than the tokenizer"):
        mtc.make_tiny_checkpoint(
            tmp_path / "ckpt", tokenizer_model=sp_model_path, overrides={"padded_vocab_size": 128}
        )


def test_cli_help_shows_every_default(tmp_path):
    result = _run("make_tiny_checkpoint.py", "--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for default in (
        "default: tiny",
        "default: 0",
        "default: float32",
        "default: []",
        "default: None",
        "default: False",
    ):
        assert default in " ".join(result.stdout.split())


def test_cli_main_writes_the_same_checkpoint_as_the_function(tmp_path, capsys):
    # In-process: a subprocess would spend most of the test budget importing torch and transformers.
    out = tmp_path / "cli_ckpt"
    args = [
        str(out),
        "--seed",
        "2",
        "--dtype",
        "float16",
        "--set",
        "rope_ratio=50",
        "--set",
        "pre_seq_len=null",
    ]
    assert mtc.main(args) == 0
    assert "RANDOM" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["rope_ratio"] == 50 and config["pre_seq_len"] is None and config["torch_dtype"] == "float16"
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("transformer.output_layer.weight").dtype == torch.float16
    api = mtc.make_tiny_checkpoint(tmp_path / "api", seed=2, dtype="float16", overrides={"rope_ratio": 50})
    expected, written = load_file(api / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(written[name], expected[name]) for name in expected)


def test_cli_main_reports_a_bad_override_on_one_line(tmp_path, capsys):
    assert mtc.main([str(tmp_path / "new"), "--set", "nonsense=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config field 'nonsense'" in err[0]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["{occupied}"], ["not empty", "--force"]),
        (["{new}", "--dtype", "float64"], ["float64"]),
        (["{new}", "--set", "rope_ratio"], ["key=value"]),
        (["{new}", "--tokenizer-model", "/no/such/tokenizer.model"], ["does not exist"]),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, needles):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    args = [a.format(occupied=occupied, new=tmp_path / "new") for a in args]
    _assert_one_line_error(_run("make_tiny_checkpoint.py", *args, tmp_path=tmp_path), *needles)
    assert not (tmp_path / "new").exists()


# ---- install_into_checkpoint ------------------------------------------------------------------

ORIGINALS = installer_originals(inst.OUR_FILES)


@pytest.fixture
def source_dir(tmp_path) -> Path:
    return write_our_stand_ins(tmp_path / "ours", inst.OUR_FILES)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_installer_checkpoint(tmp_path / "chatglm3-6b", inst.OUR_FILES, {"model_type": "chatglm"})


def _backup(ckpt: Path, name: str) -> Path:
    return ckpt / inst.backup_name(name)


def test_backup_names():
    assert inst.backup_name("modeling_chatglm.py") == "modeling_chatglm_orig.py"
    assert inst.backup_name("configuration_chatglm.py") == "configuration_chatglm_orig.py"


def test_install_keeps_originals_and_copies_ours(checkpoint, source_dir):
    inst.install(checkpoint, source_dir=source_dir)
    for name, original in ORIGINALS.items():
        assert (checkpoint / name).read_bytes() == (source_dir / name).read_bytes()
        assert _backup(checkpoint, name).read_bytes() == original
    assert {s.name: (s.state, s.backup) for s in inst.check(checkpoint, source_dir=source_dir)} == {
        name: ("ours", inst.backup_name(name)) for name in inst.OUR_FILES
    }


def test_reinstall_is_idempotent(checkpoint, source_dir):
    inst.install(checkpoint, source_dir=source_dir)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    report = inst.install(checkpoint, source_dir=source_dir)
    assert all("already ours" in line for line in report)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before


def test_install_never_overwrites_an_existing_backup(checkpoint, source_dir):
    sentinel = b"# sentinel: the true original from the first install\n"
    _backup(checkpoint, "modeling_chatglm.py").write_bytes(sentinel)
    (source_dir / "modeling_chatglm.py").write_bytes(b"# our updated fast file\n")
    inst.install(checkpoint, source_dir=source_dir)
    assert _backup(checkpoint, "modeling_chatglm.py").read_bytes() == sentinel
    assert (checkpoint / "modeling_chatglm.py").read_bytes() == b"# our updated fast file\n"


def test_no_backup_when_the_file_is_already_ours(checkpoint, source_dir):
    (checkpoint / "tokenization_chatglm.py").write_bytes(
        (source_dir / "tokenization_chatglm.py").read_bytes()
    )
    (checkpoint / "configuration_chatglm.py").unlink()
    inst.install(checkpoint, source_dir=source_dir)
    assert not _backup(checkpoint, "tokenization_chatglm.py").exists()
    assert not _backup(checkpoint, "configuration_chatglm.py").exists()
    assert _backup(checkpoint, "modeling_chatglm.py").exists()


def test_restore_brings_back_originals_byte_for_byte(checkpoint, source_dir):
    inst.install(checkpoint, source_dir=source_dir)
    (source_dir / "modeling_chatglm.py").write_bytes(b"# a newer version of ours\n")
    inst.install(checkpoint, source_dir=source_dir)
    inst.restore(checkpoint, source_dir=source_dir)
    for name, original in ORIGINALS.items():
        assert (checkpoint / name).read_bytes() == original
        assert not _backup(checkpoint, name).exists()
    assert {s.state for s in inst.check(checkpoint, source_dir=source_dir)} == {"original"}
    assert all("left as is" in line for line in inst.restore(checkpoint, source_dir=source_dir))


def test_check_reports_ours_original_other_and_missing(checkpoint, source_dir):
    (checkpoint / "tokenization_chatglm.py").unlink()
    assert [s.state for s in inst.check(checkpoint, source_dir=source_dir)] == [
        "original",
        "original",
        "missing",
    ]
    inst.install(checkpoint, source_dir=source_dir)
    (checkpoint / "configuration_chatglm.py").write_bytes(b"# edited by hand\n")
    states = {s.name: s.state for s in inst.check(checkpoint, source_dir=source_dir)}
    assert states == {
        "modeling_chatglm.py": "ours",
        "configuration_chatglm.py": "other",
        "tokenization_chatglm.py": "ours",
    }


@pytest.mark.parametrize("problem", ["missing_dir", "no_config", "wrong_model_type", "not_writable"])
@pytest.mark.parametrize("action", ["install", "restore"])
def test_install_and_restore_refuse_bad_directories(
    tmp_path, checkpoint, source_dir, monkeypatch, problem, action
):
    target = checkpoint
    if problem == "missing_dir":
        target = tmp_path / "absent"
    elif problem == "no_config":
        (checkpoint / "config.json").unlink()
    elif problem == "wrong_model_type":
        (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama"}))
    else:
        # Running as root makes chmod meaningless, so fake the permission answer instead.
        monkeypatch.setattr(inst.os, "access", lambda *args, **kwargs: False)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    with pytest.raises(inst.UsageError):
        if action == "install":
            inst.install(target, source_dir=source_dir)
        else:
            inst.restore(target)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before


def test_install_cli_round_trip_and_errors(tmp_path, checkpoint):
    result = _run("install_into_checkpoint.py", str(checkpoint), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    check = _run("install_into_checkpoint.py", str(checkpoint), "--check", tmp_path=tmp_path)
    assert check.returncode == 0 and "modeling_chatglm.py: ours" in check.stdout
    assert (checkpoint / "modeling_chatglm.py").read_bytes() == (
        REPO_ROOT / "modeling_chatglm.py"
    ).read_bytes()
    result = _run("install_into_checkpoint.py", str(checkpoint), "--restore", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all((checkpoint / name).read_bytes() == data for name, data in ORIGINALS.items())

    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _assert_one_line_error(
        _run("install_into_checkpoint.py", str(checkpoint), tmp_path=tmp_path), "model_type"
    )
    _assert_one_line_error(
        _run("install_into_checkpoint.py", str(tmp_path / "nope"), tmp_path=tmp_path), "does not exist"
    )
    _assert_one_line_error(
        _run("install_into_checkpoint.py", str(checkpoint), "--check", "--restore", tmp_path=tmp_path),
        "not allowed",
    )


def test_installed_tiny_checkpoint_loads_our_model(unique_dir):
    from transformers import AutoModelForCausalLM

    out = mtc.make_tiny_checkpoint(unique_dir())
    (out / "modeling_chatglm.py").write_text("# a stand-in for the original\n")
    inst.install(out)
    assert (out / "modeling_chatglm_orig.py").read_text() == "# a stand-in for the original\n"
    model, info = AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"


# ---- never lose a user's file -----------------------------------------------------------------


def _hf_snapshot(tmp_path: Path, files: dict) -> tuple:
    """An HF-cache layout: snapshot entries are symlinks into a shared blobs/ directory."""
    blobs = tmp_path / "blobs"
    snapshot = tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        blob = blobs / f"blob{i}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot, blobs


def test_make_tiny_force_into_a_snapshot_replaces_symlinks_not_blobs(tmp_path):
    original = {
        "model.safetensors": b"the shared weights blob",
        "config.json": b'{"model_type": "chatglm"}',
        "modeling_chatglm.py": b"# shared original code",
    }
    snapshot, blobs = _hf_snapshot(tmp_path, original)
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    mtc.make_tiny_checkpoint(snapshot, force=True)
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before
    for name in original:
        assert not (snapshot / name).is_symlink()
    assert json.loads((snapshot / "config.json").read_text())["model_type"] == "chatglm"
    assert load_file(str(snapshot / "model.safetensors"))
    assert not [p for p in snapshot.iterdir() if p.name.startswith(".")]


def test_install_keeps_a_timestamped_copy_of_a_user_edited_file(checkpoint, source_dir):
    inst.install(checkpoint, source_dir=source_dir)
    edited = b"# my own edits, not saved anywhere else\n"
    (checkpoint / "modeling_chatglm.py").write_bytes(edited)
    report = inst.install(checkpoint, source_dir=source_dir)
    copies = sorted(checkpoint.glob("modeling_chatglm_bak-*.py"))
    assert len(copies) == 1 and copies[0].read_bytes() == edited
    assert copies[0].name in " ".join(report)
    assert (checkpoint / "modeling_chatglm.py").read_bytes() == (
        source_dir / "modeling_chatglm.py"
    ).read_bytes()
    assert _backup(checkpoint, "modeling_chatglm.py").read_bytes() == ORIGINALS["modeling_chatglm.py"]


def test_install_is_all_or_nothing_when_a_file_cannot_be_replaced(checkpoint, source_dir):
    # The last file cannot be backed up or replaced (a directory stands in its place): the two
    # files already installed must be put back, and no backup may stay behind.
    (checkpoint / "tokenization_chatglm.py").unlink()
    (checkpoint / "tokenization_chatglm.py").mkdir()
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    with pytest.raises(inst.UsageError, match="nothing was changed"):
        inst.install(checkpoint, source_dir=source_dir)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([*before, "tokenization_chatglm.py"])


def test_install_into_a_snapshot_replaces_symlinks_and_keeps_blobs(tmp_path, source_dir):
    files = {"config.json": b'{"model_type": "chatglm"}', **ORIGINALS}
    snapshot, blobs = _hf_snapshot(tmp_path, files)
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    inst.install(snapshot, source_dir=source_dir)
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before
    for name, data in ORIGINALS.items():
        assert (snapshot / name).read_bytes() == (source_dir / name).read_bytes()
        assert _backup(snapshot, name).read_bytes() == data


def test_check_exits_non_zero_unless_every_file_is_ours(tmp_path, checkpoint):
    check = _run("install_into_checkpoint.py", str(checkpoint), "--check", tmp_path=tmp_path)
    assert check.returncode == 1 and "not fully installed" in check.stdout
    assert _run("install_into_checkpoint.py", str(checkpoint), tmp_path=tmp_path).returncode == 0
    assert _run("install_into_checkpoint.py", str(checkpoint), "--check", tmp_path=tmp_path).returncode == 0
    (checkpoint / "configuration_chatglm.py").write_bytes(b"# edited\n")
    assert _run("install_into_checkpoint.py", str(checkpoint), "--check", tmp_path=tmp_path).returncode == 1


# --- scripts/trace_decode_step.py -------------------------------------------------------------


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
def test_a_warm_decode_step_enters_few_functions_of_the_model_file(kv_cache):
    """The step's shape (issue 13): at most 20 distinct functions of modeling_chatglm.py, at most
    12 calls outside the layers; the trace sees the step's own cache functions (it can fail)."""
    import trace_decode_step

    calls, outside = trace_decode_step.trace_step(kv_cache)
    cache_class = "StaticKVCache" if kv_cache == "static" else "TupleKVCache"
    assert calls[f"{cache_class}.update"] == 2 and calls["ChatGLMModel.decode_one_token"] == 1
    assert len(calls) <= 20, sorted(calls)
    assert len(outside) <= 12, outside
