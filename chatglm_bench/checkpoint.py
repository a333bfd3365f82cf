"""Cheap checks of a user's checkpoint directory, run before anything is loaded.

Loading a 12 GB checkpoint only to fail inside torch on a truncated shard wastes minutes and
ends in a traceback. What can be checked without reading the weights is checked here, each
problem as one :class:`UsageError` naming the file and the fix: weight symlinks that point
nowhere (an HF cache whose ``blobs/`` lost a file), a shard index naming missing shards,
safetensors files whose header does not parse or whose size does not match the header's
offsets (an interrupted download), and a ``tokenizer.model`` SentencePiece cannot load.
"""

import contextlib
import json
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .cli import UsageError

REDOWNLOAD = "re-download it (huggingface-cli download THUDM/chatglm3-6b)"
# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_HEADER = 100 * 2**20


def check_symlinks(directory: Path) -> None:
    """Every entry of the directory that is a symlink must lead to an existing file."""
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() and not entry.exists():
            target = entry.resolve(strict=False)
            raise UsageError(f"{entry} is a dangling symlink (its target {target} is missing); {REDOWNLOAD}")


def check_shard_index(directory: Path) -> None:
    """Each ``*.index.json`` must parse and name only shards that exist."""
    for index in sorted(directory.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{index} is not a valid shard index; {REDOWNLOAD}") from None
        missing = sorted(name for name in shards if not (directory / name).is_file())
        if missing:
            raise UsageError(f"{index.name} names missing shard(s) {', '.join(missing)}; {REDOWNLOAD}")


def safetensors_header(path: Path) -> Tuple[Dict, str]:
    """(header, problem): the parsed header of a safetensors file, and what is wrong with the
    header or the file's size ('' when nothing is)."""
    header: Dict = {}
    problem = _safetensors_problem(path, header)
    return header, problem


def _safetensors_problem(path: Path, parsed: Dict) -> str:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            return f"declares a {length}-byte header in a {size}-byte file (truncated or not safetensors)"
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return "has a header that is not valid JSON (corrupt or not safetensors)"
    if not isinstance(header, dict):
        return "has a header that is not a JSON object (corrupt)"
    parsed.update(header)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * _DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            return f"has a malformed header entry for {name!r} (corrupt)"
        if expected and stop - begin != expected:
            return f"gives tensor {name!r} {stop - begin} bytes where its shape needs {expected} (corrupt)"
        end = max(end, stop)
    if 8 + length + end != size:
        return f"is {size} bytes but its header describes {8 + length + end} (truncated or corrupt download)"
    return ""


def check_safetensors(directory: Path, expected: Optional[Dict[str, Tuple[int, ...]]] = None) -> None:
    """Headers parse, sizes match the headers, and (given ``expected``: parameter name -> shape
    the config implies) every stored tensor has the shape the model will ask for."""
    names = set()
    for path in sorted(directory.glob("*.safetensors")):
        header, problem = safetensors_header(path)
        if problem:
            raise UsageError(f"{path} {problem}; {REDOWNLOAD}")
        names.update(name for name in header if name != "__metadata__")
        for name, info in header.items():
            if expected is None or name not in expected:
                continue
            stored, wanted = tuple(int(d) for d in info["shape"]), tuple(expected[name])
            if stored != wanted:
                raise UsageError(
                    f"{path} holds {name} as {list(stored)} but config.json implies {list(wanted)}: "
                    f"config.json does not match the weights; fix config.json (e.g. hidden_size, "
                    f"ffn_hidden_size, num_layers, padded_vocab_size) or {REDOWNLOAD}"
                )
    if expected is not None and names and not any(directory.glob("*.bin")):
        missing = [name for name in expected if name not in names and name not in DERIVED_TENSORS]
        if missing:
            raise UsageError(missing_message(directory, missing))


# Tensors the model derives itself when a checkpoint lacks them (not weights).
DERIVED_TENSORS = frozenset({"transformer.rotary_pos_emb.inv_freq"})


def missing_message(directory: Path, missing: List[str]) -> str:
    """One line for tensors the model needs and the checkpoint lacks (they would be random)."""
    first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return (
        f"{directory} lacks {len(missing)} tensor(s) the model needs ({first}), which would be "
        f"random; if config.json was edited (num_layers, pre_seq_len, quantization_bit) fix it, "
        f"else {REDOWNLOAD}"
    )


def check_tokenizer_model(path: Path, padded_vocab_size: Optional[int] = None) -> None:
    """The tokenizer loads, and every id it can produce has a row in the model's embedding."""
    from sentencepiece import SentencePieceProcessor

    from tokenization_chatglm import COMMAND_TOKENS

    try:
        pieces = SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError, ValueError):
        raise UsageError(
            f"{path} is not a SentencePiece model (corrupt or a stray file); {REDOWNLOAD}"
        ) from None
    ids = pieces + len(COMMAND_TOKENS)
    if padded_vocab_size is not None and ids > padded_vocab_size:
        raise UsageError(
            f"{path} produces {ids} token ids ({pieces} pieces + {len(COMMAND_TOKENS)} command tokens) "
            f"but config.json has padded_vocab_size={padded_vocab_size} embedding rows; use this "
            "checkpoint's own tokenizer.model (or fix padded_vocab_size)"
        )


def read_config(directory: Path) -> Dict:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{directory / 'config.json'} cannot be read ({error}); {REDOWNLOAD}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{directory / 'config.json'} is not a JSON object; {REDOWNLOAD}")
    return config


# GLM-4's vocabulary (151552 rows) and tokenizer class: the same model_type "chatglm", another
# architecture and a tiktoken tokenizer our tokenization_chatglm.py cannot read.
_GLM4_VOCAB = 151552


def architecture_problem(config: Dict, directory: Path) -> str:
    """What makes a ``model_type: chatglm`` checkpoint one our files cannot run ('' if nothing):
    chatglm-6b (v1: 2-D position encoding, ``inner_hidden_size``) and GLM-4 share the model type
    with chatglm2/chatglm3. Standard library only (the installer uses it)."""
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return (
            "is a chatglm-6b (v1) checkpoint (2-D position encoding); these files "
            "run chatglm2-6b and chatglm3-6b only, keep its own modeling_chatglm.py"
        )
    tokenizer_class = ""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer_class = str(tokenizer_config.get("tokenizer_class") or "")
    if "ChatGLM4" in tokenizer_class or config.get("padded_vocab_size") == _GLM4_VOCAB:
        return (
            "is a GLM-4 checkpoint (151552-token tiktoken vocabulary); these files run chatglm2-6b "
            "and chatglm3-6b only, keep its own modeling_chatglm.py"
        )
    return ""


def check_config(directory: Path):
    """config.json builds a ChatGLM config whose fields are valid (the model's own check), so a
    hand-edited field is named here rather than failing in torch later."""
    from configuration_chatglm import ChatGLMConfig
    from modeling_chatglm import config_problem

    config_file = directory / "config.json"
    try:
        config = ChatGLMConfig.from_pretrained(str(directory))
    except Exception as error:  # whatever transformers raises for a config it cannot read
        raise UsageError(f"{config_file} is not a usable config ({type(error).__name__}: {error})") from None
    problem = config_problem(config)
    if problem:
        raise UsageError(
            f"{config_file}: {problem}; fix that field (or re-download config.json if you did not edit it)"
        )
    return config


def check_directory(
    directory: Path,
    expected: Optional[Dict[str, Tuple[int, ...]]] = None,
    padded_vocab_size: Optional[int] = None,
) -> None:
    """All the cheap checks, in the order a user would fix them."""
    check_symlinks(directory)
    check_shard_index(directory)
    check_safetensors(directory, expected)
    tokenizer = directory / "tokenizer.model"
    if tokenizer.is_file():
        check_tokenizer_model(tokenizer, padded_vocab_size)


def loading_problem(directory: Path, info: Dict) -> str:
    """What transformers' loading info says is wrong ('' if nothing): a stored tensor of another
    shape than config.json implies, or a tensor the model needs that the checkpoint lacks (left
    random by the loader)."""
    for name, stored, wanted in sorted(info.get("mismatched_keys") or ()):
        return (
            f"{directory} holds {name} as {list(stored)} but config.json implies {list(wanted)}: "
            f"config.json does not match the weights; fix config.json or {REDOWNLOAD}"
        )
    missing = sorted(name for name in info.get("missing_keys") or () if name not in DERIVED_TENSORS)
    return missing_message(directory, missing) if missing else ""


def load_error_message(directory: Path, error: BaseException) -> str:
    """One line for an exception raised while loading the weights."""
    # transformers points at a load report it printed; ours is hidden (one-line errors).
    text = " ".join(str(error).replace("For details look at the above report!", "").split())
    lines: List[str] = [text[:300] + ("..." if len(text) > 300 else "")]
    if "size mismatch" in text or "shape" in text:
        lines.append(
            f"{directory / 'config.json'} does not match the weights: fix config.json (sizes such as "
            f"hidden_size, num_layers, padded_vocab_size) or {REDOWNLOAD}"
        )
    else:
        lines.append(f"the checkpoint looks damaged; {REDOWNLOAD}")
    return f"cannot load {directory} ({type(error).__name__}: {lines[0]}); {lines[1]}"


def check_checkpoint(path: str) -> Path:
    """--model_path: the model's own directory check, weights and tokenizer present, then every
    cheap check of :func:`check_directory` against the shapes config.json implies."""
    from modeling_chatglm import check_checkpoint_dir

    directory = Path(path).expanduser()
    if not directory.exists():
        raise UsageError(f"--model_path {path} does not exist; pass the downloaded chatglm3-6b directory")
    try:
        check_checkpoint_dir(str(directory))
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    problem = architecture_problem(read_config(directory), directory)
    if problem:
        raise UsageError(f"{path} {problem}")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise UsageError(f"{path} has no *.safetensors or *.bin weights; the download looks incomplete")
    if not (directory / "tokenizer.model").is_file():
        raise UsageError(f"{path} has no tokenizer.model; copy it from the chatglm3-6b release")
    config = check_config(directory)
    check_directory(directory, expected_shapes(directory), config.padded_vocab_size)
    return directory


def expected_shapes(directory: Path) -> Optional[Dict[str, tuple]]:
    """Parameter name -> shape, as the directory's config.json builds the model (on the meta
    device: no memory, no time). None when that cannot be known cheaply: a pre-quantized
    checkpoint stores packed weights of other shapes, and a config the model cannot be built
    from is left for the loader to report (in one line, see load_checkpoint_model)."""
    import torch

    from configuration_chatglm import ChatGLMConfig
    from modeling_chatglm import ChatGLMForConditionalGeneration

    try:
        config = ChatGLMConfig.from_pretrained(str(directory))
        if getattr(config, "quantization_bit", 0):
            return None
        with torch.device("meta"):
            model = ChatGLMForConditionalGeneration(config, empty_init=True)
    except Exception:
        return None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_baseline_source(directory: Path) -> None:
    if not (directory / "modeling_chatglm_orig.py").is_file():
        raise UsageError(
            f"--baseline: {directory} has no modeling_chatglm_orig.py; run "
            "scripts/install_into_checkpoint.py on it (it keeps the original there)"
        )


def checkpoint_params(directory: Path) -> int:
    """Parameter count from the weight files' sizes (fp16/bf16 checkpoints: 2 bytes each)."""
    files = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    return sum(f.stat().st_size for f in files) // 2


def model_shape(directory: Path) -> Dict[str, Any]:
    """The architecture numbers the up-front checks need, without building the model."""
    from configuration_chatglm import ChatGLMConfig

    defaults = vars(ChatGLMConfig())
    config = read_config(directory)
    return {key: config.get(key, defaults.get(key)) for key in defaults}
