#!/usr/bin/env python
"""Benchmark ChatGLM3-6B prefill (全量) and decode (增量) latency, eager or graph mode.

    python benchmark_chatglm.py                          # built-in random-weights preset, CPU OK
    python benchmark_chatglm.py --model_path DIR --batch_size 1 4 8 --execute_mode eager dynamo
    deepspeed --num_gpus=8 benchmark_chatglm.py --model_path DIR --execute_mode dynamo
    python benchmark_chatglm.py --preset chatglm3-6b --ablation --input_max_len 64 --max_new_tokens 8

Prefill is the first forward over the padded prompts; decode is each following one-token forward
on the KV cache, timed one by one with device synchronisation after warm-up. Compile time (graph
mode) is reported apart. Bad input ends with one line on stderr and exit code 2.
"""

import argparse
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chatglm_bench import OneLineArgumentParser, UsageError  # noqa: E402

MODES = ("eager", "dynamo")
ATTENTION = ("auto", "npu", "sdpa", "math")
RMSNORM = ("auto", "npu", "fused", "math")
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "npu", "cuda", "cpu")
KV_CACHES = ("auto", "tuple", "static")
# Fast-path switches, resolved as the model resolves them: CLI flag > environment > default.
# (argparse dest, environment variable, allowed values or None for any, default)
SWITCHES = (
    ("attention", "CHATGLM_ATTENTION", ATTENTION, "auto"),
    ("rmsnorm", "CHATGLM_RMSNORM", RMSNORM, "auto"),
    ("kv_cache", "CHATGLM_KV_CACHE", KV_CACHES, "auto"),
    ("graph_backend", "CHATGLM_GRAPH_BACKEND", None, "auto"),
)

# Random-weights presets (timing only). "small" is the default: a laptop-sized model with
# chatglm3's grouped KV heads and head size (vocabulary halved, so the output layer does not
# dominate a tiny model); "chatglm3-6b" is the real architecture.
PRESETS: Dict[str, Dict] = {
    "tiny": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        kv_channels=16,
        multi_query_group_num=2,
        ffn_hidden_size=160,
        padded_vocab_size=128,
        seq_length=4096,
    ),
    "small": dict(
        num_layers=4,
        hidden_size=512,
        num_attention_heads=8,
        kv_channels=64,
        multi_query_group_num=2,
        ffn_hidden_size=1376,
        padded_vocab_size=32768,
        seq_length=8192,
    ),
    "chatglm3-6b": dict(
        num_layers=28,
        hidden_size=4096,
        num_attention_heads=32,
        kv_channels=128,
        multi_query_group_num=2,
        ffn_hidden_size=13696,
        padded_vocab_size=65024,
        seq_length=8192,
    ),
}
PRESET_COMMON = dict(
    add_bias_linear=False,
    add_qkv_bias=True,
    multi_query_attention=True,
    original_rope=True,
    rmsnorm=True,
    post_layer_norm=True,
    layernorm_epsilon=1e-5,
    eos_token_id=2,
    pad_token_id=0,
)

DEFAULT_PROMPTS = (
    "晚上睡不着应该怎么办",
    "How do I make a good cup of coffee?",
    "请介绍一下长城的历史。",
    "Explain the difference between prefill and decode in LLM inference.",
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="benchmark_chatglm.py",
        description="Prefill and per-token decode latency of ChatGLM3-6B (ours, optionally the original).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model")
    src.add_argument(
        "--model_path",
        help="checkpoint directory (config.json, weights, tokenizer.model); "
        "without it a random-weights --preset is timed",
    )
    src.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small",
        help="random-weights architecture used when no --model_path is given",
    )
    src.add_argument(
        "--baseline",
        action="store_true",
        help="also time the original implementation kept as modeling_chatglm_orig.py in --model_path",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--execute_mode",
        "--exe_mode",
        nargs="+",
        choices=MODES,
        default=None,
        help="eager and/or dynamo (graph mode); default: $EXE_MODE, else eager",
    )
    run.add_argument(
        "--batch_size", nargs="+", type=int, default=[1], help="one or more batch sizes (a sweep)"
    )
    run.add_argument("--input_max_len", type=int, default=1024, help="prompts are left-padded to this length")
    run.add_argument(
        "--max_new_tokens", type=int, default=1024, help="tokens generated per run (no early stop)"
    )
    run.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: float16 on npu, bfloat16 on cuda; on cpu float32 when the weights fit in "
        "half the RAM, else bfloat16",
    )
    run.add_argument("--device", choices=DEVICES, default="auto", help="auto: npu, else cuda, else cpu")
    run.add_argument(
        "--kv_cache",
        choices=KV_CACHES,
        default=None,
        help="tuple: the original's growing cache; static: preallocated, updated in place; auto: "
        "static in graph mode, tuple in eager; default: $CHATGLM_KV_CACHE, else auto",
    )
    run.add_argument(
        "--attention",
        choices=ATTENTION,
        default=None,
        help="attention kernel; default: $CHATGLM_ATTENTION, else auto",
    )
    run.add_argument(
        "--rmsnorm",
        choices=RMSNORM,
        default=None,
        help="RMSNorm kernel; default: $CHATGLM_RMSNORM, else auto",
    )
    run.add_argument(
        "--quantize",
        nargs="+",
        choices=("none", "8", "4"),
        default=["none"],
        help="weight-only quantization of the timed model (model.quantize(bits)); a list sweeps "
        "(with --ablation: the full ablation unquantized, then 'all' per bit width)",
    )
    run.add_argument(
        "--graph_backend",
        default=None,
        help="torch.compile backend in dynamo mode (auto: torchair on npu, inductor elsewhere); "
        "default: $CHATGLM_GRAPH_BACKEND, else auto",
    )
    run.add_argument(
        "--ablation",
        action="store_true",
        help="baseline (math/math/tuple/eager), each optimization alone, then all together",
    )
    run.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed warm-up runs (the first one compiles; "
        "0: none, compile time then lands in the first timed run)",
    )
    run.add_argument(
        "--iters",
        type=int,
        default=2,
        help="timed runs per configuration (each: one prefill + max_new_tokens-1 timed decode steps)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")
    inp = p.add_argument_group("prompts (with --model_path)")
    inp.add_argument("--prompt", action="append", default=None, help="a prompt (repeat the flag for several)")
    inp.add_argument(
        "--prompts-file",
        "--prompts_file",
        dest="prompts_file",
        default=None,
        help="a file with one prompt per line",
    )
    inp.add_argument(
        "--repeat-prompts",
        "--repeat_prompts",
        dest="repeat_prompts",
        action="store_true",
        help="cycle the prompts when a batch has more rows than prompts",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output", default=None, help="write every figure and the environment to this JSON file"
    )
    out.add_argument("--plot", default=None, help="write a PNG of latency against batch size")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------
# Resolution of the user's choices (each bad value: UsageError).
# ---------------------------------------------------------------------------------------------


def resolve_modes(args) -> List[str]:
    env = os.environ.get("EXE_MODE", "").strip().lower()
    # Checked even when --execute_mode wins: the model reads it too, and would fail later.
    if env and env not in MODES:
        raise UsageError(f"EXE_MODE={env!r} is not valid; use one of: {', '.join(MODES)} (or unset it)")
    if args.execute_mode:
        return list(dict.fromkeys(args.execute_mode))
    return [env or "eager"]


def resolve_switches(args) -> Dict[str, str]:
    """Kernel, cache and compiler choices: the CLI flag, else the CHATGLM_* variable, else the
    default, exactly as the model resolves them. A bad variable is an error even when a flag
    overrides it (the model reads the variable as well)."""
    chosen = {}
    for dest, env_name, allowed, default in SWITCHES:
        raw = os.environ.get(env_name, "").strip()
        env_value = raw.lower() if allowed else raw
        if raw and allowed and env_value not in allowed:
            raise UsageError(
                f"{env_name}={raw!r} is not valid; use one of: {', '.join(allowed)} (or unset it)"
            )
        flag = getattr(args, dest)
        chosen[dest] = flag if flag is not None else (env_value or default)
    return chosen


def npu_available() -> bool:
    import importlib

    try:
        importlib.import_module("torch_npu")
    except Exception:
        return False
    import torch

    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve_device(choice: str):
    import torch

    if choice == "npu" and not npu_available():
        raise UsageError(
            "--device npu needs torch_npu with CANN and a visible NPU; install torch_npu "
            "(requirements-npu.txt) or use --device cuda/cpu"
        )
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda but no CUDA device is visible; use --device cpu or check CUDA_VISIBLE_DEVICES"
        )
    if choice == "auto":
        choice = "npu" if npu_available() else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_dtype(choice: str, device, n_params: int):
    import torch

    if choice == "auto":
        if device.type == "npu":
            choice = "float16"
        elif device.type == "cuda":
            choice = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            # CPUs without AVX512-BF16/AMX run 16-bit GEMMs far slower than float32; use float32
            # unless the weights would not fit (the 6B model: 25 GB in float32).
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            choice = "float32" if 4 * n_params < ram / 2 else "bfloat16"
    return getattr(torch, choice)


def preset_params(name: str) -> int:
    c = PRESETS[name]
    h, ffn, layers, vocab = c["hidden_size"], c["ffn_hidden_size"], c["num_layers"], c["padded_vocab_size"]
    qkv = c["num_attention_heads"] * c["kv_channels"] + 2 * c["multi_query_group_num"] * c["kv_channels"]
    per_layer = h * qkv + qkv + c["num_attention_heads"] * c["kv_channels"] * h + 3 * h * ffn + 2 * h
    return layers * per_layer + 2 * vocab * h + h


def checkpoint_params(directory: Path) -> int:
    """Parameter count from the weight files' sizes (fp16/bf16 checkpoints: 2 bytes each)."""
    files = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    return sum(f.stat().st_size for f in files) // 2


def validate_outputs(args):
    """--output and --plot: writable, distinct, and a plot matplotlib can make, before any work."""
    from chatglm_bench import report

    output = report.check_writable(args.output, "--output")
    plot = report.check_writable(args.plot, "--plot")
    if output and plot and output.resolve() == plot.resolve():
        raise UsageError(f"--output and --plot both name {args.output}; give them different files")
    report.check_plot(plot)
    return output, plot


def validate_numbers(args) -> None:
    for name in ("input_max_len", "max_new_tokens", "iters"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more (got {args.warmup})")
    if any(b < 1 for b in args.batch_size):
        raise UsageError(f"--batch_size values must be at least 1 (got {args.batch_size})")
    if args.model_path is None and (args.prompt or args.prompts_file):
        raise UsageError("--prompt/--prompts-file need --model_path (random presets have no tokenizer)")
    if args.baseline and args.model_path is None:
        raise UsageError(
            "--baseline needs --model_path: a checkpoint holding the original modeling_chatglm_orig.py "
            "(scripts/install_into_checkpoint.py keeps it there)"
        )


# ---------------------------------------------------------------------------------------------
# Models and inputs.
# ---------------------------------------------------------------------------------------------


def check_checkpoint(path: str) -> Path:
    from modeling_chatglm import _check_checkpoint_dir

    directory = Path(path).expanduser()
    if not directory.exists():
        raise UsageError(f"--model_path {path} does not exist; pass the downloaded chatglm3-6b directory")
    try:
        _check_checkpoint_dir(str(directory))
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise UsageError(f"{path} has no *.safetensors or *.bin weights; the download looks incomplete")
    if not (directory / "tokenizer.model").is_file():
        raise UsageError(f"{path} has no tokenizer.model; copy it from the chatglm3-6b release")
    from chatglm_bench.checkpoint import check_directory, check_symlinks

    check_symlinks(directory)
    check_directory(directory, expected_shapes(directory))
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


def load_checkpoint_model(directory: Path, dtype):
    """Our implementation on the checkpoint's weights (whatever modeling file the directory holds)."""
    from transformers.utils import logging as hf_logging

    from chatglm_bench.checkpoint import load_error_message
    from modeling_chatglm import ChatGLMForConditionalGeneration

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # A load report or progress bar would add lines around a one-line error.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return ChatGLMForConditionalGeneration.from_pretrained(str(directory), torch_dtype=dtype).eval()
    except Exception as error:  # anything from torch/safetensors/transformers: one line, not a traceback
        raise UsageError(load_error_message(directory, error)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_preset_model(name: str, dtype, seed: int):
    """Random weights (timing only): built uninitialised, then filled in place, chunk by chunk."""
    import torch

    from configuration_chatglm import ChatGLMConfig
    from modeling_chatglm import ChatGLMForConditionalGeneration

    config = ChatGLMConfig(**PRESET_COMMON, **PRESETS[name], torch_dtype=dtype)
    model = ChatGLMForConditionalGeneration(config, empty_init=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            flat = param.view(-1)
            for start in range(0, flat.numel(), 1 << 24):
                chunk = flat[start : start + (1 << 24)]
                chunk.copy_(torch.randn(chunk.numel(), generator=generator) * 0.02)
            if param_name.endswith("layernorm.weight"):
                param.add_(1.0)
    return model.to(dtype).eval()


@dataclass
class Prompts:
    texts: Optional[List[str]]  # None for random ids
    repeat: bool


def read_prompts(args) -> Prompts:
    texts: List[str] = list(args.prompt or [])
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that were not UTF-8 arrive as lone surrogates
            try:
                shown = text.encode("utf-8", "surrogateescape")  # the bytes as they were typed
            except UnicodeEncodeError:
                shown = text.encode("utf-8", "backslashreplace")
            raise UsageError(
                f"--prompt {shown!r} is not valid UTF-8 text; pass it in UTF-8 (check the terminal's locale)"
            ) from None
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise UsageError(
                f"--prompts-file {args.prompts_file} is not UTF-8 text (bad byte at offset {error.start}); "
                "save it as UTF-8 (e.g. iconv -t UTF-8)"
            ) from None
        texts += [line for line in lines if line.strip()]
        if not texts:
            raise UsageError(f"--prompts-file {args.prompts_file} has no prompts (one per line)")
    if not texts:
        return Prompts(list(DEFAULT_PROMPTS), repeat=True)  # built-in prompts always cycle
    return Prompts(texts, repeat=args.repeat_prompts)


def tokenize_batch(tokenizer, prompts: Prompts, batch_size: int, input_max_len: int):
    from chatglm_bench.measure import Batch

    texts = prompts.texts
    if batch_size > len(texts) and not prompts.repeat:
        raise UsageError(
            f"--batch_size {batch_size} needs {batch_size} prompts but {len(texts)} were given; "
            "add prompts or pass --repeat-prompts"
        )
    rows = [texts[i % len(texts)] for i in range(batch_size)]
    encoded = [tokenizer.build_chat_input(text)["input_ids"][0].tolist() for text in rows]
    longest = max(len(ids) for ids in encoded)
    if longest > input_max_len:
        raise UsageError(
            f"a prompt has {longest} tokens, more than --input_max_len {input_max_len}; raise "
            "--input_max_len or shorten the prompt"
        )
    batch = tokenizer.pad(
        {"input_ids": encoded}, padding="max_length", max_length=input_max_len, return_tensors="pt"
    )
    return Batch(batch["input_ids"], batch["attention_mask"], batch["position_ids"])


def random_batch(batch_size: int, input_max_len: int, vocab: int, seed: int):
    import torch

    from chatglm_bench.measure import Batch

    generator = torch.Generator().manual_seed(seed + batch_size)
    ids = torch.randint(3, vocab, (batch_size, input_max_len), generator=generator)
    positions = torch.arange(input_max_len).repeat(batch_size, 1)
    return Batch(ids, torch.ones_like(ids), positions)


def ablation_plan(device_kind: str, graph_backend: str, with_graph: bool = True) -> List[tuple]:
    """(label, options): the baseline, each optimization added alone, then all of them.

    ``with_graph=False`` (``--ablation --execute_mode eager``) leaves graph mode out: for machines
    where compiling the model is not worth it (e.g. the 6B model on a small CPU)."""
    fast_attention = "npu" if device_kind == "npu" else "sdpa"
    fast_rmsnorm = "npu" if device_kind == "npu" else "fused"
    base = dict(
        attention_backend="math",
        rmsnorm_backend="math",
        kv_cache="tuple",
        exe_mode="eager",
        graph_backend=graph_backend,
    )
    steps = [
        ("baseline", {}),
        (f"+attention {fast_attention}", {"attention_backend": fast_attention}),
        (f"+rmsnorm {fast_rmsnorm}", {"rmsnorm_backend": fast_rmsnorm}),
        ("+static cache", {"kv_cache": "static"}),
        ("+graph mode", {"exe_mode": "dynamo"}),
        (
            "all",
            {
                "attention_backend": fast_attention,
                "rmsnorm_backend": fast_rmsnorm,
                "kv_cache": "static",
                "exe_mode": "dynamo",
            },
        ),
    ]
    if not with_graph:
        steps = [
            (label, {k: v for k, v in change.items() if k != "exe_mode"})
            for label, change in steps
            if label != "+graph mode"
        ]
    return [(label, {**base, **change}) for label, change in steps]


def build_plan(args, modes: List[str], switches: Dict[str, str], device) -> List[tuple]:
    """(label, fast-path options) of every configuration to time, in order."""
    if args.ablation:
        # Graph rows unless the user asked for eager only (flag or EXE_MODE).
        asked = args.execute_mode or os.environ.get("EXE_MODE")
        return ablation_plan(
            device.type, switches["graph_backend"], with_graph=not (asked and modes == ["eager"])
        )
    options = dict(
        attention_backend=switches["attention"],
        rmsnorm_backend=switches["rmsnorm"],
        kv_cache=switches["kv_cache"],
        graph_backend=switches["graph_backend"],
    )
    return [("run", {**options, "exe_mode": mode}) for mode in modes]


def validate_plan(plan: List[tuple], device, dtype) -> List[Dict[str, str]]:
    """Every kernel and compiler the plan names must exist here: one line now, not a traceback later.

    Returns, per plan entry, what will actually run (``auto`` resolved for this device and dtype)."""
    from types import SimpleNamespace

    import torch

    from modeling_chatglm import RuntimeOptions, _compile_kwargs, resolve_backends

    compilers = {"auto", "torchair", *torch._dynamo.list_backends(exclude_tags=())}
    resolved = []
    for label, options in plan:
        try:
            runtime = RuntimeOptions.from_config(SimpleNamespace(**options))
            attention, rmsnorm, _ = resolve_backends(runtime, device, dtype)
            compiler = "-"
            if runtime.exe_mode == "dynamo":
                if runtime.graph_backend not in compilers:
                    raise ValueError(
                        f"--graph_backend {runtime.graph_backend!r} is not a torch.compile backend "
                        f"here; use one of: {', '.join(sorted(compilers))}"
                    )
                backend = _compile_kwargs(runtime, device)["backend"]
                compiler = backend if isinstance(backend, str) else "torchair"
        except (RuntimeError, TypeError, ValueError) as error:
            raise UsageError(f"{label}: {error}" if label != "run" else str(error)) from None
        resolved.append(
            dict(
                options,
                attention_backend=attention,
                rmsnorm_backend=rmsnorm,
                kv_cache=runtime.cache_kind,
                graph_backend=compiler,
            )
        )
    return resolved


def model_shape(args, directory: Optional[Path]) -> Dict:
    """The architecture numbers the up-front checks need, without building the model."""
    if directory is None:
        return dict(PRESET_COMMON, **PRESETS[args.preset])
    from chatglm_bench.checkpoint import read_config
    from configuration_chatglm import ChatGLMConfig

    defaults = vars(ChatGLMConfig())
    config = read_config(directory)
    return {key: config.get(key, defaults.get(key)) for key in defaults}


def memory_estimate(shape: Dict, n_params: int, dtype, batch: int, tokens: int, world_size: int) -> int:
    """Bytes one rank needs: its weights, its KV cache and the prefill's working set.

    KV cache: layers x (K and V) x KV heads x head_dim x tokens x batch. Working set (one
    layer at a time): the hidden states and the SwiGLU intermediate of the whole prompt, the
    attention scores of the unfused kernel, and the float32 last-token logits."""
    import torch

    width = torch.empty((), dtype=dtype).element_size()
    groups = (
        shape["multi_query_group_num"] if shape.get("multi_query_attention") else shape["num_attention_heads"]
    )
    kv = shape["num_layers"] * 2 * groups * shape["kv_channels"] * tokens * batch * width
    prompt = batch * tokens
    hidden = prompt * (6 * shape["hidden_size"] + 3 * shape["ffn_hidden_size"]) * width
    scores = batch * shape["num_attention_heads"] * tokens * tokens * 4
    logits = batch * shape["padded_vocab_size"] * 4
    return (n_params * width + kv) // world_size + hidden + scores + logits


def available_memory(device) -> Optional[int]:
    """Free bytes on the device (CUDA/NPU) or the host's MemAvailable (CPU); None if unknown."""
    import torch

    if device.type in ("cuda", "npu"):
        return int(getattr(torch, device.type).mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(args, shape: Dict, n_params: int, dtype, device, env) -> None:
    """Refuse a batch that clearly cannot fit, with the numbers, before loading anything."""
    free = available_memory(device)
    if free is None:
        return
    # Ranks on one CPU node share its RAM.
    sharing = env.local_world_size if device.type == "cpu" else 1
    tokens = args.input_max_len + args.max_new_tokens
    for batch in sorted(set(args.batch_size), reverse=True):
        need = sharing * memory_estimate(shape, n_params, dtype, batch, tokens, env.world_size)
        if need > free:
            raise UsageError(
                f"--batch_size {batch} with {tokens} tokens needs about {need / 2**30:.1f} GiB "
                f"({str(dtype).replace('torch.', '')} weights, KV cache, activations) but {device.type} has "
                f"{free / 2**30:.1f} GiB free; lower --batch_size, --input_max_len or --max_new_tokens"
            )


def validate_quantize(levels: List[int], env, device, dtype) -> None:
    """--quantize needs one rank (AutoTP shards nn.Linear only) and a usable kernel here."""
    from modeling_chatglm import resolve_quant_kernel

    if any(levels) and env.world_size > 1:
        raise UsageError(
            "--quantize 8/4 runs on one rank only (DeepSpeed AutoTP shards nn.Linear layers, not "
            "quantized ones); drop --quantize or run without the launcher"
        )
    for bits in filter(None, levels):
        try:
            resolve_quant_kernel(None, device, dtype, bits)
        except (RuntimeError, TypeError, ValueError) as error:
            raise UsageError(str(error)) from None


def load_original_model(directory: Path, dtype):
    """The original implementation kept in the checkpoint dir (modeling_chatglm_orig.py)."""
    import importlib
    import shutil
    import tempfile

    check_baseline_source(directory)
    original = directory / "modeling_chatglm_orig.py"
    package_root = Path(tempfile.mkdtemp(prefix="chatglm_original_"))
    package = package_root / "chatglm_original"
    package.mkdir()
    (package / "__init__.py").write_text("")
    config_src = directory / "configuration_chatglm_orig.py"
    shutil.copy(
        config_src if config_src.is_file() else directory / "configuration_chatglm.py",
        package / "configuration_chatglm.py",
    )
    shutil.copy(original, package / "modeling_chatglm.py")
    if (directory / "quantization.py").is_file():
        shutil.copy(directory / "quantization.py", package / "quantization.py")
    sys.path.insert(0, str(package_root))
    try:
        modeling = importlib.import_module("chatglm_original.modeling_chatglm")
        config = modeling.ChatGLMConfig.from_pretrained(str(directory))
        return modeling.ChatGLMForConditionalGeneration.from_pretrained(
            str(directory), config=config, torch_dtype=dtype
        ).eval()
    except Exception as error:  # the original file breaks on newer transformers: say so in one line
        import transformers

        raise UsageError(
            f"--baseline: the original modeling_chatglm.py does not load on transformers "
            f"{transformers.__version__} ({type(error).__name__}: {error}); run the baseline "
            "with transformers 4.31-4.40"
        ) from None
    finally:
        sys.path.remove(str(package_root))


# ---------------------------------------------------------------------------------------------
# main: wiring only.
# ---------------------------------------------------------------------------------------------


def environment(args, device, dtype, env, source: str, hardware) -> Dict:
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("deepspeed", "torch_npu"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return {
        "versions": versions,
        "device": str(device),
        "device_name": hardware.device_name,
        "hardware_reference": vars(hardware),
        "dtype": str(dtype).replace("torch.", ""),
        "world_size": env.world_size,
        "model": source,
        "args": {k: v for k, v in vars(args).items() if k != "local_rank"},
    }


def _launch_rank() -> int:
    # The rank as the launcher set it, for deciding who reports an error (never raises).
    try:
        return int(os.environ.get("RANK", "0").strip() or 0)
    except ValueError:
        return 0


def _stdout_gone() -> None:
    # The reader of our stdout left (``| head -1``): send the rest to /dev/null and carry on,
    # so the run still finishes and writes --output (the recipe in Python's signal docs).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def say(*parts, **kwargs) -> None:
    """print() that survives a closed pipe on stdout."""
    try:
        print(*parts, **kwargs, flush=True)
    except BrokenPipeError:
        _stdout_gone()


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point: returns the process exit code (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    # Libraries log to stdout too (DeepSpeed); once a reader has closed it, logging must not
    # print its own tracebacks about that.
    logging.raiseExceptions = False
    try:
        return run(args)
    except UsageError as error:
        # Every rank meets the same bad input: rank 0 reports it (a failed rendezvous is each
        # rank's own, so each reports that).
        if _launch_rank() == 0 or getattr(error, "every_rank", False):
            print(f"benchmark_chatglm.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_gone()


def run(args) -> int:
    validate_numbers(args)
    modes = resolve_modes(args)
    switches = resolve_switches(args)
    output, plot = validate_outputs(args)
    directory = check_checkpoint(args.model_path) if args.model_path else None
    if directory is not None and args.baseline:
        check_baseline_source(directory)
    prompts = read_prompts(args) if directory else None

    import torch

    from chatglm_bench import distributed, report
    from chatglm_bench.hardware import hardware_reference
    from chatglm_bench.measure import measure

    env = distributed.detect_env()
    shape = model_shape(args, directory)
    if env.world_size > 1 and shape.get("multi_query_attention"):
        distributed.kv_groups_for(
            shape["num_attention_heads"], shape["multi_query_group_num"], env.world_size
        )
    seq_length = shape["seq_length"]
    if args.input_max_len + args.max_new_tokens > seq_length:
        raise UsageError(
            f"--input_max_len {args.input_max_len} + --max_new_tokens {args.max_new_tokens} exceeds the "
            f"model's context (seq_length={seq_length}); lower them or use a longer-context checkpoint"
        )
    device = resolve_device(args.device)
    n_params = checkpoint_params(directory) if directory else preset_params(args.preset)
    dtype = resolve_dtype(args.dtype, device, n_params)
    check_memory(args, shape, n_params, dtype, device, env)
    env = distributed.init_distributed(env, device.type)
    device = torch.device(env.device)
    plan = build_plan(args, modes, switches, device)
    resolved = validate_plan(plan, device, dtype)

    def say0(*parts):
        if env.is_rank0:
            say(*parts)

    if directory is not None:
        model = load_checkpoint_model(directory, dtype)
        from tokenization_chatglm import ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer(str(directory / "tokenizer.model"))
        source = str(directory)
        say0(f"model: {directory} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")
    else:
        torch.manual_seed(args.seed)
        model = build_preset_model(args.preset, dtype, args.seed)
        tokenizer = None
        source = f"preset {args.preset} (RANDOM WEIGHTS, timing only)"
        say0(
            f"model: preset '{args.preset}' with RANDOM weights and random token ids (timing only; "
            "pass --model_path for a real checkpoint)"
        )

    levels = [0 if q == "none" else int(q) for q in dict.fromkeys(args.quantize)]
    validate_quantize(levels, env, device, dtype)
    model = model.to(device)
    model.transformer.static_cache_len = args.input_max_len + args.max_new_tokens
    distributed.patch_torchair_for_hcom(env, device.type, [options for _, options in plan])
    model = distributed.shard_model(model, env, dtype)
    per_rank = distributed.gather_per_rank(distributed.rank_param_bytes(model), env)
    if env.world_size > 1:
        say0(
            "parameter bytes per rank: "
            + ", ".join(f"rank {i}: {b / 2**20:.1f} MiB" for i, b in enumerate(per_rank))
        )

    hardware = hardware_reference(device, dtype)
    batches = {}
    for size in args.batch_size:
        if tokenizer is not None:
            batches[size] = tokenize_batch(tokenizer, prompts, size, args.input_max_len).to(device)
        else:
            batches[size] = random_batch(
                size, args.input_max_len, model.config.padded_vocab_size, args.seed
            ).to(device)

    originals = [("original", mode) for mode in modes] if args.baseline else []

    progress = make_progress(
        env,
        len(args.batch_size)
        * (len(plan) + (len(args.quantize) - 1) * (1 if args.ablation else len(plan)) + len(originals))
        * args.iters
        * (args.max_new_tokens - 1),
    )
    records, answers = [], None
    for index, bits in enumerate(levels):
        if index:  # quantize() is one-way: every level starts from freshly built weights
            del model
            model = (
                load_checkpoint_model(directory, dtype)
                if directory
                else build_preset_model(args.preset, dtype, args.seed)
            ).to(device)
            model.transformer.static_cache_len = args.input_max_len + args.max_new_tokens
        if bits:
            model.quantize(bits)
        pairs = list(zip(plan, resolved))
        for (label, options), ran in pairs[-1:] if args.ablation and bits else pairs:
            if bits:
                label = f"int{bits}" if label == "run" else f"{label} + int{bits}"
            model.transformer.set_runtime_options(**options)
            for size in args.batch_size:
                record, steady = measure(
                    model,
                    batches[size],
                    args.max_new_tokens,
                    label=label,
                    options=ran,
                    warmup=args.warmup,
                    iters=args.iters,
                    device=device,
                    progress=progress.update if progress else None,
                )
                record.quantization = f"int{bits}" if bits else "none"
                records.append(record)
                if answers is None:
                    answers = steady.tokens
    if originals:
        original = load_original_model(directory, dtype).to(device)
        eager_encoder = original.transformer.encoder
        for _, mode in originals:
            compiled = mode == "dynamo"
            original.transformer.encoder = torch.compile(eager_encoder) if compiled else eager_encoder
            for size in args.batch_size:
                record, _ = measure(
                    original,
                    batches[size],
                    args.max_new_tokens,
                    label="original",
                    options=dict(
                        attention_backend="original",
                        rmsnorm_backend="original",
                        kv_cache="tuple",
                        exe_mode=mode,
                        graph_backend="inductor",
                    ),
                    warmup=args.warmup,
                    iters=args.iters,
                    device=device,
                    progress=progress.update if progress else None,
                )
                records.append(record)
    if progress:
        progress.close()

    if not env.is_rank0:
        return 0
    # Files first: a closed stdout (``| head``) must not cost the results.
    if output:
        report.write_json(
            output,
            {
                "environment": environment(args, device, dtype, env, source, hardware),
                "parameter_bytes_per_rank": per_rank,
                "results": [r.as_dict() for r in records],
            },
        )
    if plot:
        report.write_plot(
            plot, records, f"{source} · {hardware.device_name} · {str(dtype).replace('torch.', '')}"
        )
    say(
        f"\ndevice: {hardware.device_name} ({device}), dtype {str(dtype).replace('torch.', '')}, world size "
        f"{env.world_size}, input {args.input_max_len} tokens, {args.max_new_tokens} new tokens, "
        f"{args.iters} timed runs"
    )
    say(
        f"hardware reference ({hardware.source}): "
        f"{report._fmt(hardware.bandwidth_gbs)} GB/s, {report._fmt(hardware.tflops, 2)} TFLOP/s\n"
    )
    say(report.latency_table(records, hardware))
    if args.ablation:
        say("\nablation (speed-up vs baseline):")
        say(report.ablation_table(records))
    if tokenizer is not None and answers is not None:
        say(f"\nanswers (greedy, batch {answers.shape[0]}, first {answers.shape[1]} tokens):")
        for row in answers.tolist():
            say("  " + json.dumps(tokenizer.decode(row), ensure_ascii=False))
    if output:
        say(f"\nwrote {output}")
    if plot:
        say(f"wrote {plot}")
    return 0


def make_progress(env, total_steps: int):
    """A progress bar over decode steps, on rank 0, for runs long enough to need one."""
    if not env.is_rank0 or total_steps < 256:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total_steps, desc="decode steps", unit="step", mininterval=1.0, leave=False)


if __name__ == "__main__":
    sys.exit(main())
