"""Models: ours on a checkpoint's weights or a random-weight preset, the original implementation
(``--baseline``), and whether they fit in memory; :class:`ModelSource` hands each plan entry the
model it runs."""

import gc
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

from .checkpoint import check_baseline_source, load_error_message, loading_problem
from .cli import UsageError, dtype_name
from .plan import Entry
from .presets import build_preset_model


def load_checkpoint_model(directory: Path, dtype):
    """Our implementation on the checkpoint's weights (whatever modeling file the directory holds)."""
    from transformers.utils import logging as hf_logging

    from modeling_chatglm import ChatGLMForConditionalGeneration

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # A load report or progress bar would add lines around a one-line error.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # Mismatched sizes are reported in the loading info rather than raised, so that they
        # and the missing tensors are named here (the loader's report is hidden).
        model, info = ChatGLMForConditionalGeneration.from_pretrained(
            str(directory), torch_dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as error:  # anything from torch/safetensors/transformers: one line, not a traceback
        raise UsageError(load_error_message(directory, error)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    problem = loading_problem(directory, info)
    if problem:
        raise UsageError(problem)
    return model.eval()


def load_original_model(directory: Path, dtype):
    """The original implementation kept in the checkpoint dir (modeling_chatglm_orig.py)."""
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


def memory_estimate(shape: Dict, n_params: int, dtype, batch: int, tokens: int, world_size: int) -> int:
    """Bytes one rank needs: its weights, its KV cache and the prefill's working set.

    KV cache: layers x (K and V) x KV heads x head_dim x tokens x batch. Working set (one
    layer at a time): the hidden states of the whole prompt (in and out), the SwiGLU
    intermediate of one prefill chunk (the whole prompt when chunking is off), the attention
    scores of the unfused kernel over a chunk x the context, and the float32 last-token logits."""
    import types

    import torch

    from modeling_chatglm import resolve_prefill_chunk

    width = torch.empty((), dtype=dtype).element_size()
    chunk = resolve_prefill_chunk(types.SimpleNamespace(prefill_chunk=shape.get("prefill_chunk")))
    rows = min(chunk, tokens) if chunk else tokens
    groups = (
        shape["multi_query_group_num"] if shape.get("multi_query_attention") else shape["num_attention_heads"]
    )
    kv = shape["num_layers"] * 2 * groups * shape["kv_channels"] * tokens * batch * width
    hidden = batch * (2 * tokens + 4 * rows) * shape["hidden_size"] * width
    hidden += batch * rows * 3 * shape["ffn_hidden_size"] * width
    scores = batch * shape["num_attention_heads"] * rows * tokens * 4
    logits = batch * shape["padded_vocab_size"] * 4
    return (n_params * width + kv) // world_size + hidden + scores + logits


def available_memory(device) -> Optional[int]:
    """Free bytes on the device (CUDA/NPU) or the host's MemAvailable (CPU); None if unknown."""
    import torch

    if device.type in ("cuda", "npu"):
        return int(getattr(torch, device.type).mem_get_info(device)[0])
    from modeling_chatglm import memory_available_bytes

    available = memory_available_bytes()
    if available is not None:
        return available
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(batch_sizes, tokens: int, shape: Dict, n_params: int, dtype, device, env) -> None:
    """Refuse a batch that clearly cannot fit, with the numbers, before loading anything."""
    free = available_memory(device)
    if free is None:
        return
    # Ranks on one CPU node share its RAM.
    sharing = env.local_world_size if device.type == "cpu" else 1
    for batch in sorted(set(batch_sizes), reverse=True):
        need = sharing * memory_estimate(shape, n_params, dtype, batch, tokens, env.world_size)
        if need > free:
            raise UsageError(
                f"--batch_size {batch} with {tokens} tokens needs about {need / 2**30:.1f} GiB "
                f"({dtype_name(dtype)} weights, KV cache, activations) but {device.type} has "
                f"{free / 2**30:.1f} GiB free; lower --batch_size, --input_max_len or --max_new_tokens"
            )


class ModelSource:
    """The model each plan entry runs.

    ``model`` is ours, ready on its device (sharded under tensor parallelism); ``rebuild()`` makes
    a fresh copy for each quantization level after the first (``quantize()`` is one-way), and the
    original (``load_original()``) is loaded once, its encoder compiled for graph-mode entries."""

    def __init__(self, model, rebuild, load_original):
        self.model, self.rebuild, self.load_original = model, rebuild, load_original
        self.bits: Optional[int] = None  # None: fresh weights, not yet used at any level
        self.original = self.original_encoder = None

    def __call__(self, entry: Entry):
        # One model in memory at a time: the 6B model in bf16 is half a 24 GiB machine's RAM, so
        # the one being replaced is released before the next is built or loaded.
        if entry.original:
            if self.model is not None:
                self.model, self.bits = None, None
                gc.collect()
            return self._original(entry.options["exe_mode"])
        if self.original is not None:
            self.original = self.original_encoder = None
            gc.collect()
        if self.model is None or (self.bits is not None and self.bits != entry.bits):
            self.model, self.bits = None, None
            gc.collect()
            self.model = self.rebuild()
        if self.bits is None and entry.bits:
            self.model.quantize(entry.bits)
        self.bits = entry.bits
        self.model.transformer.set_runtime_options(**entry.options)
        return self.model

    def _original(self, mode: str):
        import torch

        if self.original is None:
            self.original = self.load_original()
            self.original_encoder = self.original.transformer.encoder
        encoder = self.original_encoder
        self.original.transformer.encoder = torch.compile(encoder) if mode == "dynamo" else encoder
        return self.original


def build_model(directory: Optional[Path], preset: str, seed: int, dtype, device, tokens: int):
    """Ours, on the checkpoint's weights or with the preset's random weights, on ``device`` with
    a static cache of ``tokens`` positions (prompt + new tokens)."""
    if directory is not None:
        model = load_checkpoint_model(directory, dtype)
    else:
        model = build_preset_model(preset, dtype, seed, context=tokens)
    model = model.to(device)
    model.transformer.static_cache_len = tokens
    return model
