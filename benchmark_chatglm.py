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
        choices=("tuple", "static"),
        default="tuple",
        help="tuple: the original's growing cache; static: preallocated, updated in place",
    )
    run.add_argument(
        "--quantize",
        nargs="+",
        choices=("none", "8", "4"),
        default=["none"],
        help="weight-only quantization of the timed model (model.quantize(bits)); a list sweeps "
        "(with --ablation: the full ablation unquantized, then 'all' per bit width)",
    )
    run.add_argument("--attention", choices=ATTENTION, default="auto", help="attention kernel")
    run.add_argument("--rmsnorm", choices=RMSNORM, default="auto", help="RMSNorm kernel")
    run.add_argument(
        "--graph_backend",
        default="auto",
        help="torch.compile backend in dynamo mode (auto: torchair on npu, inductor elsewhere)",
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
    if args.execute_mode:
        return list(dict.fromkeys(args.execute_mode))
    env = os.environ.get("EXE_MODE", "").strip().lower()
    if env and env not in MODES:
        raise UsageError(f"EXE_MODE={env!r} is not valid; use one of: {', '.join(MODES)}")
    return [env or "eager"]


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
    return directory


def load_checkpoint_model(directory: Path, dtype):
    """Our implementation on the checkpoint's weights (whatever modeling file the directory holds)."""
    from modeling_chatglm import ChatGLMForConditionalGeneration

    return ChatGLMForConditionalGeneration.from_pretrained(str(directory), torch_dtype=dtype).eval()


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
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {error.strerror}") from None
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


def build_plan(args, modes: List[str], device) -> List[tuple]:
    """(label, fast-path options) of every configuration to time, in order."""
    if args.ablation:
        # Graph rows unless the user asked for eager only (flag or EXE_MODE).
        asked = args.execute_mode or os.environ.get("EXE_MODE")
        return ablation_plan(device.type, args.graph_backend, with_graph=not (asked and modes == ["eager"]))
    options = dict(
        attention_backend=args.attention,
        rmsnorm_backend=args.rmsnorm,
        kv_cache=args.kv_cache,
        graph_backend=args.graph_backend,
    )
    return [("run", {**options, "exe_mode": mode}) for mode in modes]


def validate_plan(plan: List[tuple], device, dtype) -> None:
    """Every kernel and compiler the plan names must exist here: one line now, not a traceback later."""
    from types import SimpleNamespace

    import torch

    from modeling_chatglm import RuntimeOptions, _compile_kwargs, resolve_backends

    compilers = {"auto", "torchair", *torch._dynamo.list_backends(exclude_tags=())}
    for label, options in plan:
        try:
            runtime = RuntimeOptions.from_config(SimpleNamespace(**options))
            resolve_backends(runtime, device, dtype)
            if runtime.exe_mode == "dynamo":
                if runtime.graph_backend not in compilers:
                    raise ValueError(
                        f"--graph_backend {runtime.graph_backend!r} is not a torch.compile backend "
                        f"here; use one of: {', '.join(sorted(compilers))}"
                    )
                _compile_kwargs(runtime, device)
        except (RuntimeError, TypeError, ValueError) as error:
            raise UsageError(f"{label}: {error}" if label != "run" else str(error)) from None


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

    original = directory / "modeling_chatglm_orig.py"
    if not original.is_file():
        raise UsageError(
            f"--baseline: {directory} has no modeling_chatglm_orig.py; run "
            "scripts/install_into_checkpoint.py on it (it keeps the original there)"
        )
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


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point: returns the process exit code (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"benchmark_chatglm.py: error: {error}", file=sys.stderr)
        return 2


def run(args) -> int:
    validate_numbers(args)
    modes = resolve_modes(args)
    from chatglm_bench import report

    output = report.check_writable(args.output, "--output")
    plot = report.check_writable(args.plot, "--plot")
    directory = check_checkpoint(args.model_path) if args.model_path else None
    prompts = read_prompts(args) if directory else None

    import torch

    from chatglm_bench import distributed
    from chatglm_bench.hardware import hardware_reference
    from chatglm_bench.measure import measure

    env = distributed.detect_env()
    device = resolve_device(args.device)
    env = distributed.init_distributed(env, device.type)
    device = torch.device(env.device)
    n_params = checkpoint_params(directory) if directory else preset_params(args.preset)
    dtype = resolve_dtype(args.dtype, device, n_params)
    plan = build_plan(args, modes, device)
    validate_plan(plan, device, dtype)

    def say(*parts):
        distributed.rank0_print(env, *parts)

    if directory is not None:
        try:
            model = load_checkpoint_model(directory, dtype)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load {directory}: {error}") from None
        from tokenization_chatglm import ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer(str(directory / "tokenizer.model"))
        source = str(directory)
        say(f"model: {directory} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")
    else:
        torch.manual_seed(args.seed)
        model = build_preset_model(args.preset, dtype, args.seed)
        tokenizer = None
        source = f"preset {args.preset} (RANDOM WEIGHTS, timing only)"
        say(
            f"model: preset '{args.preset}' with RANDOM weights and random token ids (timing only; "
            "pass --model_path for a real checkpoint)"
        )

    seq_length = model.config.seq_length
    if args.input_max_len + args.max_new_tokens > seq_length:
        raise UsageError(
            f"--input_max_len {args.input_max_len} + --max_new_tokens {args.max_new_tokens} exceeds the "
            f"model's context (seq_length={seq_length}); lower them or use a longer-context checkpoint"
        )

    levels = [0 if q == "none" else int(q) for q in dict.fromkeys(args.quantize)]
    validate_quantize(levels, env, device, dtype)
    model = model.to(device)
    model.transformer.static_cache_len = args.input_max_len + args.max_new_tokens
    model = distributed.shard_model(model, env, dtype)
    per_rank = distributed.gather_per_rank(distributed.rank_param_bytes(model), env)
    if env.world_size > 1:
        say(
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
        for label, options in plan[-1:] if args.ablation and bits else plan:
            if bits:
                label = f"int{bits}" if label == "run" else f"{label} + int{bits}"
            model.transformer.set_runtime_options(**options)
            for size in args.batch_size:
                record, steady = measure(
                    model,
                    batches[size],
                    args.max_new_tokens,
                    label=label,
                    options=options,
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
    print(
        f"\ndevice: {hardware.device_name} ({device}), dtype {str(dtype).replace('torch.', '')}, world size "
        f"{env.world_size}, input {args.input_max_len} tokens, {args.max_new_tokens} new tokens, "
        f"{args.iters} timed runs"
    )
    print(
        f"hardware reference ({hardware.source}): "
        f"{report._fmt(hardware.bandwidth_gbs)} GB/s, {report._fmt(hardware.tflops, 2)} TFLOP/s\n"
    )
    print(report.latency_table(records, hardware))
    if args.ablation:
        print("\nablation (speed-up vs baseline):")
        print(report.ablation_table(records))
    if tokenizer is not None and answers is not None:
        print(f"\nanswers (greedy, batch {answers.shape[0]}, first {answers.shape[1]} tokens):")
        for row in answers.tolist():
            print("  " + json.dumps(tokenizer.decode(row), ensure_ascii=False))
    if output:
        report.write_json(
            output,
            {
                "environment": environment(args, device, dtype, env, source, hardware),
                "parameter_bytes_per_rank": per_rank,
                "results": [r.as_dict() for r in records],
            },
        )
        print(f"\nwrote {output}")
    if plot:
        report.write_plot(
            plot, records, f"{source} · {hardware.device_name} · {str(dtype).replace('torch.', '')}"
        )
        print(f"wrote {plot}")
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
