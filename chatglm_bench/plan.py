"""Plan: what the benchmark times, resolved from the user's choices before anything is loaded.

Every entry of a plan is one configuration of one model (ours with its fast-path options and
quantization, or the original implementation for ``--baseline``); the measure loop times each
entry at every batch size. Each bad value raises a :class:`UsageError` here, where it is found.
"""

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

from .cli import UsageError


def _model_option_specs() -> Dict[str, Tuple[str, tuple, str]]:
    """The model's own option table (``_OPTION_SPECS`` of modeling_chatglm.py: config field ->
    (environment variable, allowed values, default)), read from the file without importing it,
    so that ``--help`` and one-line errors stay free of torch's start-up."""
    source = (Path(__file__).resolve().parents[1] / "modeling_chatglm.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "_OPTION_SPECS" for t in node.targets
        ):
            return {
                name: (env, allowed, default) for name, env, allowed, default in ast.literal_eval(node.value)
            }
    raise RuntimeError("modeling_chatglm.py has no _OPTION_SPECS table")


_SPECS = _model_option_specs()
MODES = _SPECS["exe_mode"][1]
ATTENTION = _SPECS["attention_backend"][1]
RMSNORM = _SPECS["rmsnorm_backend"][1]
LINEAR = _SPECS["linear_backend"][1]
KV_CACHES = _SPECS["kv_cache"][1]
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "npu", "cuda", "cpu")
QUANTIZE = ("none", "8", "4")
# The variables the model also reads, each read once here: (argparse dest, variable, allowed
# values or None for any, default). Resolved as the model resolves them: flag > variable > default.
VARIABLES = (
    ("execute_mode", _SPECS["exe_mode"][0], MODES, ""),
    ("attention", *_SPECS["attention_backend"]),
    ("rmsnorm", *_SPECS["rmsnorm_backend"]),
    ("linear", *_SPECS["linear_backend"]),
    ("kv_cache", *_SPECS["kv_cache"]),
    ("graph_backend", "CHATGLM_GRAPH_BACKEND", None, "auto"),
)
# What the original implementation runs as, for its rows of the tables.
ORIGINAL_OPTIONS = dict(
    attention_backend="original",
    rmsnorm_backend="original",
    linear_backend="original",
    kv_cache="tuple",
    graph_backend="inductor",
)


@dataclass
class Entry:
    """One configuration to time: ``options`` are set on the model, ``ran`` is what they resolve
    to on this device (the record's columns)."""

    label: str
    options: Dict[str, str]
    ran: Dict[str, str]
    bits: int = 0  # weight-only quantization: 0 (none), 8 or 4
    original: bool = False  # the checkpoint's original modeling file (--baseline)

    @property
    def quantization(self) -> str:
        return f"int{self.bits}" if self.bits else "none"


@dataclass
class Choices:
    """The user's run-wide choices after flags and variables are merged."""

    modes: List[str]
    switches: Dict[str, str]
    modes_asked: bool  # --execute_mode or EXE_MODE was given
    levels: List[int] = field(default_factory=list)


def check_numbers(args) -> None:
    if any(length < 1 for length in args.input_max_len):
        raise UsageError(f"--input_max_len values must be at least 1 (got {args.input_max_len})")
    for name in ("max_new_tokens", "iters"):
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


def resolve_choices(args) -> Choices:
    """Modes and fast-path switches: the flag, else the variable, else the default. A bad variable
    is an error even when a flag overrides it (the model reads the variable as well)."""
    chosen = {}
    for dest, name, allowed, default in VARIABLES:
        raw = os.environ.get(name, "").strip()
        value = raw.lower() if allowed else raw
        if raw and allowed and value not in allowed:
            raise UsageError(f"{name}={raw!r} is not valid; use one of: {', '.join(allowed)} (or unset it)")
        flag = getattr(args, dest)
        chosen[dest] = flag if flag is not None else (value or default)
    mode_flag = chosen.pop("execute_mode")
    modes = list(dict.fromkeys(mode_flag)) if isinstance(mode_flag, list) else [mode_flag or "eager"]
    levels = [0 if q == "none" else int(q) for q in dict.fromkeys(args.quantize)]
    return Choices(modes, chosen, modes_asked=bool(mode_flag), levels=levels)


def npu_available() -> bool:
    import importlib.util

    import torch

    if importlib.util.find_spec("torch_npu") is None:
        return False  # not installed: no need to load the model file (and transformers) to ask
    from modeling_chatglm import torch_npu_present

    return torch_npu_present() and hasattr(torch, "npu") and torch.npu.is_available()


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


def resolve_dtype(choice: str, device, n_params: int) -> Tuple[object, str]:
    """(dtype, why): ``auto`` is float16 on npu, bfloat16 on cuda (float16 without bf16), and on
    a CPU bfloat16 when float32 weights would not fit in half the RAM or the CPU has native bf16
    units (AVX512-BF16 or AMX), float32 on the others (without those units 16-bit GEMMs are far
    slower). Decided from the device's capabilities alone, so identical runs pick the same dtype
    (a GEMV timed at start-up flipped under load)."""
    import torch

    if choice != "auto":
        return getattr(torch, choice), "--dtype"
    if device.type == "npu":
        return torch.float16, "auto: npu"
    if device.type == "cuda":
        return (
            (torch.bfloat16, "auto: cuda")
            if torch.cuda.is_bf16_supported()
            else (torch.float16, "auto: cuda")
        )
    from .hardware import cpu_bf16_units

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * n_params >= ram / 2:
        return torch.bfloat16, "auto: float32 weights would not fit in half the RAM"
    units = cpu_bf16_units()
    if not units:
        return torch.float32, "auto: no AVX512-BF16/AMX on this CPU"
    return torch.bfloat16, f"auto: native bf16 on this CPU ({' '.join(units)})"


def ablation_plan(device, dtype, graph_backend: str, with_graph: bool = True) -> List[Tuple[str, Dict]]:
    """(label, options): the baseline, each optimization added alone, then all of them; the
    optimizations are what the model's own ``auto`` picks for ``dtype`` on ``device``.

    ``with_graph=False`` (``--ablation --execute_mode eager``) leaves graph mode out: for machines
    where compiling the model is not worth it (e.g. the 6B model on a small CPU)."""
    import modeling_chatglm as modeling

    try:
        auto = modeling.resolve_backends(modeling.RuntimeOptions(), device, dtype)
    except (RuntimeError, TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    fast_attention, fast_rmsnorm, fast_linear = auto.attention, auto.rmsnorm, auto.linear
    base = dict(
        attention_backend="math",
        rmsnorm_backend="math",
        linear_backend="aten",
        kv_cache="tuple",
        exe_mode="eager",
        graph_backend=graph_backend,
    )
    steps = [
        ("baseline", {}),
        (f"+attention {fast_attention}", {"attention_backend": fast_attention}),
        (f"+rmsnorm {fast_rmsnorm}", {"rmsnorm_backend": fast_rmsnorm}),
        *([(f"+linear {fast_linear}", {"linear_backend": fast_linear})] if fast_linear != "aten" else []),
        ("+static cache", {"kv_cache": "static"}),
        ("+graph mode", {"exe_mode": "dynamo"}),
        (
            "all",
            {
                "attention_backend": fast_attention,
                "rmsnorm_backend": fast_rmsnorm,
                "linear_backend": fast_linear,
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


def option_sets(ablation: bool, choices: Choices, device, dtype) -> List[Tuple[str, Dict]]:
    """(label, fast-path options) of every configuration of our model, in order."""
    switches = choices.switches
    if ablation:
        # Graph rows unless the user asked for eager only (flag or EXE_MODE).
        eager_only = choices.modes_asked and choices.modes == ["eager"]
        return ablation_plan(device, dtype, switches["graph_backend"], with_graph=not eager_only)
    options = dict(
        attention_backend=switches["attention"],
        rmsnorm_backend=switches["rmsnorm"],
        linear_backend=switches["linear"],
        kv_cache=switches["kv_cache"],
        graph_backend=switches["graph_backend"],
    )
    return [("run", {**options, "exe_mode": mode}) for mode in choices.modes]


def resolve_options(label: str, options: Dict[str, str], device, dtype, compilers) -> Dict[str, str]:
    """What ``options`` run as here (``auto`` resolved); a kernel or compiler missing here is a
    UsageError now, not a traceback later."""
    import modeling_chatglm as modeling

    try:
        runtime = modeling.RuntimeOptions.from_config(SimpleNamespace(**options))
        chosen = modeling.resolve_backends(runtime, device, dtype)
        compiler = "-"
        if runtime.exe_mode == "dynamo":
            if runtime.graph_backend not in compilers:
                raise ValueError(
                    f"--graph_backend {runtime.graph_backend!r} is not a torch.compile backend "
                    f"here; use one of: {', '.join(sorted(compilers))}"
                )
            backend = modeling.compile_kwargs(runtime, device)["backend"]
            compiler = backend if isinstance(backend, str) else "torchair"
    except (RuntimeError, TypeError, ValueError) as error:
        raise UsageError(f"{label}: {error}" if label != "run" else str(error)) from None
    return dict(
        options,
        attention_backend=chosen.attention,
        rmsnorm_backend=chosen.rmsnorm,
        linear_backend=chosen.linear,
        kv_cache=runtime.cache_kind,
        graph_backend=compiler,
    )


def check_quantize(levels: List[int], world_size: int, device, dtype) -> None:
    """--quantize needs one rank (AutoTP shards nn.Linear only) and a usable kernel here."""
    from modeling_chatglm import resolve_quant_kernel

    if any(levels) and world_size > 1:
        raise UsageError(
            "--quantize 8/4 runs on one rank only (DeepSpeed AutoTP shards nn.Linear layers, not "
            "quantized ones); drop --quantize or run without the launcher"
        )
    for bits in filter(None, levels):
        try:
            resolve_quant_kernel(None, device, dtype, bits)
        except (RuntimeError, TypeError, ValueError) as error:
            raise UsageError(str(error)) from None


def build_plan(
    choices: Choices, device, dtype, world_size: int, ablation: bool, baseline: bool
) -> List[Entry]:
    """Every entry to time, in order: each option set per quantization level (with --ablation a
    quantized level adds only its 'all' row), then the original model per mode (--baseline)."""
    import torch

    compilers = {"auto", "torchair", *torch._dynamo.list_backends(exclude_tags=())}
    sets = option_sets(ablation, choices, device, dtype)
    resolved = [resolve_options(label, options, device, dtype, compilers) for label, options in sets]
    check_quantize(choices.levels, world_size, device, dtype)
    entries: List[Entry] = []
    for bits in choices.levels:
        pairs = list(zip(sets, resolved))
        for (label, options), ran in pairs[-1:] if ablation and bits else pairs:
            if bits:
                label = f"int{bits}" if label == "run" else f"{label} + int{bits}"
            entries.append(Entry(label, options, ran, bits))
    if baseline:
        for mode in choices.modes:
            options = dict(ORIGINAL_OPTIONS, exe_mode=mode)
            entries.append(Entry("original", options, options, original=True))
    return entries


def graph_options(entries: List[Entry]) -> List[Dict[str, str]]:
    """The option sets of our model, for the launcher's torchair check."""
    return [entry.options for entry in entries if not entry.original]


def context_check(input_max_len: int, max_new_tokens: int, seq_length: Optional[int]) -> None:
    if seq_length is not None and input_max_len + max_new_tokens > seq_length:
        raise UsageError(
            f"--input_max_len {input_max_len} + --max_new_tokens {max_new_tokens} exceeds the "
            f"model's context (seq_length={seq_length}); lower them or use a longer-context checkpoint"
        )
