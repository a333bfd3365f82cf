"""Write a small chatglm3 checkpoint with RANDOM weights, loadable like the real one.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--preset tiny|small-real-vocab|...] [--seed N]
        [--dtype float32|bfloat16|float16] [--set key=value ...] [--tokenizer-model PATH] [--force]

The directory gets ``config.json`` (the real checkpoint's ``auto_map``), ``model.safetensors``
(the original parameter names), this repository's ``modeling_chatglm.py``,
``configuration_chatglm.py`` and ``tokenization_chatglm.py``, and a README.md, so
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` loads it. With
``--tokenizer-model`` (a SentencePiece ``.model``) it also gets ``tokenizer.model`` and
``tokenizer_config.json`` for ``AutoTokenizer``. The files are written into a hidden staging
directory beside ``OUT_DIR`` and renamed into place, so a killed run leaves no half checkpoint.

The weights are random: good for tests, demos, timing and bug reports, useless for answers.
The recipe is the golden fixtures' (``tests/golden/README.md``): the model is built after
``torch.manual_seed(seed)``, then ``chatglm_protocol.randomize_`` draws every parameter, in
``named_parameters()`` order, from ``torch.Generator().manual_seed(seed)`` as ``randn * 0.02``
(plus 1 for the RMSNorm weights, so the norms do not squash activations to zero). The presets
are the benchmark's table (``chatglm_bench/presets.py``). Draws are made in float32 and then
cast, so a bfloat16 checkpoint is exactly the rounded float32 one. The ``tiny`` preset with
seed 0 reproduces ``golden/tiny-chatglm3`` bit for bit. The file is written tensor by tensor
(the model is built on the meta device for its names and shapes, and the same draws are made
chunk by chunk), so peak memory stays about one 64 MB chunk: ``--preset chatglm3-6b --dtype
bfloat16`` writes the 12.5 GB file on a machine with far less free memory.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from chatglm_bench.cli import (  # noqa: E402  (needs the path set-up above)
    OneLineArgumentParser,
    UsageError,
    process_alive,
    remove_stale_temporaries,
)
from chatglm_bench.presets import CHATGLM3_FLAGS, PRESETS  # noqa: E402

CODE_FILES = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py")
DTYPES = ("float32", "bfloat16", "float16")
# Command tokens ChatGLMTokenizer appends after the SentencePiece vocabulary
# ([MASK] [gMASK] [sMASK] sop eop and the four role tokens).
N_COMMAND_TOKENS = 9
RANDOM_NOTE = (
    "RANDOM weights, not a trained model: for tests, demos, timing and bug reports only. "
    "Written by scripts/make_tiny_checkpoint.py"
)

AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}


def _import_repo_modules():
    # Imported late (torch, transformers) so --help and usage errors answer at once; the
    # repository root is on sys.path since this module's import.
    import configuration_chatglm
    import modeling_chatglm

    return configuration_chatglm, modeling_chatglm


def _config_defaults(config_class) -> Dict[str, Any]:
    params = inspect.signature(config_class.__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


# Sizes: positive integers (pre_seq_len may also be null).
_SIZE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "kv_channels",
    "num_attention_heads",
    "multi_query_group_num",
    "padded_vocab_size",
    "seq_length",
    "pre_seq_len",
)


def _type_problem(key: str, value: Any, reference: Any) -> Optional[str]:
    if key in _SIZE_FIELDS:
        if value is None and key == "pre_seq_len":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return "a positive integer"
        return None
    if isinstance(reference, bool) and not isinstance(value, bool):
        return "true or false"
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
    return None


def _sp_vocab_size(tokenizer_model: Path) -> int:
    from sentencepiece import SentencePieceProcessor

    try:
        processor = SentencePieceProcessor(model_file=str(tokenizer_model))
    except (OSError, RuntimeError) as error:
        raise UsageError(f"{tokenizer_model} is not a SentencePiece model ({error})") from None
    return processor.get_piece_size()


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file; pass a new or empty directory")
    if out_dir.resolve() == REPO_ROOT.resolve():
        # --force here would replace this repository's README.md (and the files it copies).
        raise UsageError(f"{out_dir} is this repository, whose files are the input; pick another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} is not empty; pick a new directory or pass --force to overwrite")


def resolve_config_values(
    preset: str, overrides: Optional[Dict[str, Any]], defaults: Dict[str, Any]
) -> Dict[str, Any]:
    """The preset's config values with ``overrides`` applied; unknown keys or wrong types are a
    UsageError (ranges and divisibility are the model's ``config_problem``)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; use one of: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    references = {**defaults, **values}
    for key, value in (overrides or {}).items():
        if key == "vocab_size":
            raise UsageError("set padded_vocab_size, not vocab_size (ChatGLM derives vocab_size from it)")
        if key not in references:
            raise UsageError(f"unknown config field {key!r}; known: {', '.join(sorted(references))}")
        expected = _type_problem(key, value, references[key])
        if expected:
            raise UsageError(f"{key}={value!r} is not valid; expected {expected}")
        values[key] = value
    return values


def _config_json(config, fields: list, dtype: str, note: str) -> Dict[str, Any]:
    """config.json in the shape the original's save_pretrained writes, stable across transformers."""
    import transformers

    data: Dict[str, Any] = {
        "_comment": note,
        "model_type": "chatglm",
        "architectures": ["ChatGLMForConditionalGeneration"],
        "auto_map": dict(AUTO_MAP),
    }
    for name in fields:
        data[name] = getattr(config, name)
    data.update(
        original_rope=getattr(config, "original_rope", True),
        vocab_size=config.padded_vocab_size,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=False,
        use_cache=True,
        torch_dtype=dtype,
        transformers_version=transformers.__version__,
    )
    return dict(sorted(data.items()))


def _readme(preset: str, seed: int, dtype: str, values: Dict[str, Any], n_params: int) -> str:
    sizes = ", ".join(f"{k}={values[k]}" for k in sorted(values) if k not in CHATGLM3_FLAGS)
    return (
        "# RANDOM-weight ChatGLM3 checkpoint\n\n"
        "**The weights are RANDOM.** This is not a trained model: its answers are noise. Use it for\n"
        "tests, demos, timing and bug reports only.\n\n"
        f"- preset `{preset}`, seed {seed}, dtype {dtype}, {n_params:,} parameters\n"
        f"- {sizes}\n\n"
        "Made by `scripts/make_tiny_checkpoint.py`; load it with\n"
        "`AutoModelForCausalLM.from_pretrained(this_dir, trust_remote_code=True)`.\n"
    )


def make_tiny_checkpoint(
    out_dir: Union[str, Path],
    *,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    overrides: Optional[Dict[str, Any]] = None,
    tokenizer_model: Optional[Union[str, Path]] = None,
    force: bool = False,
) -> Path:
    """Write a random-weight chatglm3 checkpoint into ``out_dir`` and return its path.

    ``overrides`` patches config fields of the preset (``{"rope_ratio": 50, "pre_seq_len": 8}``).
    ``tokenizer_model`` adds a SentencePiece tokenizer and grows ``padded_vocab_size`` to cover it.
    A non-empty ``out_dir`` is refused unless ``force`` (which overwrites the files written here
    and leaves any others).
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    if tokenizer_model is not None:
        tokenizer_model = Path(tokenizer_model)
        if not tokenizer_model.is_file():
            raise UsageError(f"tokenizer model {tokenizer_model} does not exist")
        if not (REPO_ROOT / "tokenization_chatglm.py").is_file():
            raise UsageError(
                f"{REPO_ROOT / 'tokenization_chatglm.py'} is missing; it is needed for a tokenizer"
            )

    import torch

    configuration, modeling = _import_repo_modules()
    defaults = _config_defaults(configuration.ChatGLMConfig)
    values = resolve_config_values(preset, overrides, defaults)
    if tokenizer_model is not None:
        needed = _sp_vocab_size(tokenizer_model) + N_COMMAND_TOKENS
        if values["padded_vocab_size"] < needed:
            if "padded_vocab_size" in (overrides or {}):
                raise UsageError(
                    f"padded_vocab_size={values['padded_vocab_size']} is smaller than the tokenizer's "
                    f"{needed} tokens"
                )
            # Round up the way the real checkpoint does (64798 tokens -> 65024 rows).
            values["padded_vocab_size"] = math.ceil(needed / 128) * 128

    config = configuration.ChatGLMConfig(**values, torch_dtype=dtype)
    problem = modeling.config_problem(config)  # ranges and divisibility, as the model checks them
    if problem:
        raise UsageError(f"--set: {problem}")
    torch.manual_seed(seed)
    # Shapes and names only: the weights are drawn tensor by tensor while the file is written.
    with torch.device("meta"):
        model = modeling.ChatGLMForConditionalGeneration(config, empty_init=True)
    n_params = sum(p.numel() for p in model.parameters())

    note = f"{RANDOM_NOTE} (preset {preset}, seed {seed})."
    files: Dict[str, Any] = {
        "model.safetensors": lambda path: write_random_safetensors(model, seed, getattr(torch, dtype), path),
        "README.md": _readme(preset, seed, dtype, values, n_params),
    }
    for name in CODE_FILES:
        if (REPO_ROOT / name).is_file():
            files[name] = REPO_ROOT / name
    if tokenizer_model is not None:
        files["tokenizer.model"] = tokenizer_model
        tokenizer_config = {
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            "tokenizer_class": "ChatGLMTokenizer",
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.seq_length,
        }
        files["tokenizer_config.json"] = json.dumps(tokenizer_config, indent=2) + "\n"
    # config.json last: what makes the directory a checkpoint is the last thing to appear.
    files["config.json"] = json.dumps(_config_json(config, list(defaults), dtype, note), indent=2) + "\n"
    _write_checkpoint(out_dir, files)
    return out_dir


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32"}


def write_random_safetensors(model, seed: int, dtype, path: Path) -> None:
    """``model``'s state_dict (a model on the meta device: names and shapes) as a safetensors file
    whose parameters are :func:`chatglm_protocol.randomize_`'s values for ``seed``, drawn and
    written chunk by chunk: peak memory is one chunk, not the model (a chatglm3-6b-sized file is
    12 GB in bf16). Buffers (the rotary ``inv_freq``, kept in checkpoints like the originals') are
    computed on the CPU. Floating tensors are cast to ``dtype`` (the P-tuning prefix encoder too,
    which the model builds in float32)."""
    import torch

    from chatglm_protocol import random_chunks

    parameters = dict(model.named_parameters())
    buffers = {}
    for name, _ in model.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.to_empty(device="cpu", recurse=False)
        model._init_weights(owner)  # the model's own recipe for what checkpoints derive
        buffers[name] = getattr(owner, attr)
    entries, offset = {}, 0
    for name, tensor in model.state_dict().items():
        out_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * torch.empty((), dtype=out_dtype).element_size()
        dtype_name = _SAFETENSORS_DTYPES[str(out_dtype).replace("torch.", "")]
        entries[name] = {
            "dtype": dtype_name,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    # randomize_ draws in named_parameters() order: draw every parameter in that order, and write
    # each where the header put it.
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        base = handle.tell()
        for name, param in parameters.items():
            handle.seek(base + entries[name]["data_offsets"][0])
            for values in random_chunks(name, param.numel(), generator):
                handle.write(values.to(dtype).view(torch.uint8).numpy())  # no copy: buffer protocol
        for name, buffer in buffers.items():
            if name in entries:
                handle.seek(base + entries[name]["data_offsets"][0])
                data = buffer.to(dtype) if buffer.is_floating_point() else buffer
                handle.write(data.contiguous().view(torch.uint8).numpy())


def _staging_dir(out_dir: Path, pid: int) -> Path:
    return out_dir.parent / f".{out_dir.name}.{pid}.partial"


def _remove_stale_staging(out_dir: Path) -> None:
    """What a killed run left: its staging directory beside OUT_DIR (and, from older versions,
    hidden temporaries inside it)."""
    prefix, suffix = f".{out_dir.name}.", ".partial"
    if out_dir.parent.is_dir():
        for entry in out_dir.parent.iterdir():
            pid = entry.name[len(prefix) : -len(suffix)]
            if entry.name.startswith(prefix) and entry.name.endswith(suffix) and pid.isdigit():
                if int(pid) != os.getpid() and not process_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)
    remove_stale_temporaries(out_dir)


def _write_checkpoint(out_dir: Path, files: Dict[str, Any]) -> None:
    """Write every file into a staging directory beside ``out_dir``, then move them in by
    renames: a run killed while writing (the weights take the time) leaves ``out_dir`` as it was
    and only the hidden staging directory, which the next run removes. A new ``out_dir`` appears
    whole (one rename); with --force each file replaces its target, a symlink (an HF-cache
    snapshot) included, never written through into the shared ``blobs/``. ``files``: name ->
    text, a source path to copy, or a function writing the path it is given."""
    _remove_stale_staging(out_dir)
    stage = _staging_dir(out_dir, os.getpid())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage.mkdir()
    try:
        for name, content in files.items():
            target = stage / name
            if isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            elif isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                content(target)
        if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        if not out_dir.exists():
            os.rename(stage, out_dir)
            return
        for name in files:
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _parse_assignment(text: str) -> tuple:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects key=value, got {text!r}")
    try:
        value = json.loads(raw)  # numbers, true/false, null
    except ValueError:
        value = raw
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="make_tiny_checkpoint.py",
        description="Write a chatglm3 checkpoint with RANDOM weights (tests, demos, bug reports only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new or empty directory to write")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny: 2 layers, hidden 64, vocab 128 (the golden fixture's shape); "
        "small-real-vocab: 4 layers, hidden 512, head_dim 64, the real 65024 vocab "
        "(the table in chatglm_bench/presets.py, shared with the benchmark)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (JSON value, e.g. rope_ratio=50, pre_seq_len=8); repeatable",
    )
    parser.add_argument(
        "--tokenizer-model",
        default=None,
        metavar="PATH",
        help="SentencePiece tokenizer.model to include (padded_vocab_size grows to cover it)",
    )
    parser.add_argument(
        "--force", action="store_true", default=False, help="write into a non-empty directory"
    )
    return parser


def main(argv: Optional[list] = None) -> int:
    """CLI entry point: returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        overrides = dict(_parse_assignment(item) for item in args.overrides)
        out = make_tiny_checkpoint(
            args.out_dir,
            preset=args.preset,
            seed=args.seed,
            dtype=args.dtype,
            overrides=overrides,
            tokenizer_model=args.tokenizer_model,
            force=args.force,
        )
    except UsageError as error:
        print(f"make_tiny_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        print(
            f"make_tiny_checkpoint.py: error: cannot write{where}: {error.strerror or error}; "
            "free some space or pick another OUT_DIR",
            file=sys.stderr,
        )
        return 2
    print(
        f"wrote a RANDOM-weight chatglm3 checkpoint (preset {args.preset}, seed {args.seed}, {args.dtype}) to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
