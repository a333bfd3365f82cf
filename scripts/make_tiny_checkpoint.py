"""Write a small chatglm3 checkpoint with RANDOM weights, loadable like the real one.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--preset tiny|small-real-vocab|...] [--seed N]
        [--dtype float32|bfloat16|float16] [--set key=value ...] [--tokenizer-model PATH] [--force]

The directory gets ``config.json`` (the real checkpoint's ``auto_map``), ``model.safetensors``
(the original parameter names), this repository's ``modeling_chatglm.py``,
``configuration_chatglm.py`` and ``tokenization_chatglm.py``, and a README.md, so
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` loads it. With
``--tokenizer-model`` (a SentencePiece ``.model``) it also gets ``tokenizer.model`` and
``tokenizer_config.json`` for ``AutoTokenizer``.

The weights are random: good for tests, demos, timing and bug reports, useless for answers.
The recipe is the golden fixtures' (``tests/golden/README.md``): the model is built after
``torch.manual_seed(seed)``, then ``chatglm_protocol.randomize_`` draws every parameter, in
``named_parameters()`` order, from ``torch.Generator().manual_seed(seed)`` as ``randn * 0.02``
(plus 1 for the RMSNorm weights, so the norms do not squash activations to zero). The presets
are the benchmark's table (``chatglm_bench/presets.py``). Draws are made in float32 and then
cast, so a bfloat16 checkpoint is exactly the rounded float32 one. The ``tiny`` preset with
seed 0 reproduces ``golden/tiny-chatglm3`` bit for bit.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from chatglm_bench.cli import OneLineArgumentParser, UsageError, replacing_file  # noqa: E402  (needs the path set-up above)
from chatglm_bench.presets import CHATGLM3_FLAGS, PRESETS  # noqa: E402
from chatglm_protocol import randomize_  # noqa: E402

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
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} is not empty; pick a new directory or pass --force to overwrite")


def resolve_config_values(
    preset: str, overrides: Optional[Dict[str, Any]], defaults: Dict[str, Any]
) -> Dict[str, Any]:
    """The preset's config values with ``overrides`` applied; unknown keys or wrong types are a UsageError."""
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
    heads, groups = values["num_attention_heads"], values["multi_query_group_num"]
    if values["multi_query_attention"] and (groups < 1 or heads % groups):
        raise UsageError(f"num_attention_heads={heads} must be a multiple of multi_query_group_num={groups}")
    if values["kv_channels"] % 4:
        raise UsageError(
            f"kv_channels={values['kv_channels']} must be a multiple of 4 (half-dim rotary pairs)"
        )
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
    from safetensors.torch import save_file

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
    torch.manual_seed(seed)
    model = modeling.ChatGLMForConditionalGeneration(config, empty_init=False)
    randomize_(model, seed)
    # Includes the persistent rotary buffer "transformer.rotary_pos_emb.inv_freq", like the originals.
    # The model builds the P-tuning prefix encoder in float32 whatever the dtype; the file holds
    # every floating tensor in the checkpoint's dtype.
    target = getattr(torch, dtype)
    state = {
        name: (tensor.to(target) if tensor.is_floating_point() else tensor).detach().contiguous()
        for name, tensor in model.state_dict().items()
    }
    n_params = sum(p.numel() for p in model.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    note = f"{RANDOM_NOTE} (preset {preset}, seed {seed})."
    # Every file goes through replacing_file: written beside its target and renamed over it, so
    # with --force into an HF-cache snapshot a symlink is replaced, never written through into
    # the shared blobs/ that other snapshots point at.
    with replacing_file(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config_data = _config_json(config, list(defaults), dtype, note)
    _write_text(out_dir / "config.json", json.dumps(config_data, indent=2) + "\n")
    _write_text(out_dir / "README.md", _readme(preset, seed, dtype, values, n_params))
    for name in CODE_FILES:
        if (REPO_ROOT / name).is_file():
            with replacing_file(out_dir / name) as tmp:
                shutil.copyfile(REPO_ROOT / name, tmp)
    if tokenizer_model is not None:
        with replacing_file(out_dir / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer_model, tmp)
        tokenizer_config = {
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            "tokenizer_class": "ChatGLMTokenizer",
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,
            "model_max_length": config.seq_length,
        }
        _write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir


def _write_text(path: Path, text: str) -> None:
    with replacing_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
