"""ChatGLM2/ChatGLM3 model: a drop-in, faster ``modeling_chatglm.py``.

Copy this file (with ``configuration_chatglm.py`` and ``tokenization_chatglm.py``) into a downloaded
chatglm3-6b checkpoint directory in place of the originals; ``AutoModel.from_pretrained(dir,
trust_remote_code=True)`` then loads the checkpoint unchanged. Class, module and parameter names,
config fields and outputs are the original's; the arithmetic is the same model.

What is new, each switchable for an ablation (config field, else environment variable, else auto):
  attention   ``attention_backend`` / CHATGLM_ATTENTION = auto | npu | sdpa | math
  RMSNorm     ``rmsnorm_backend``   / CHATGLM_RMSNORM   = auto | npu | fused | math
  KV cache    ``kv_cache``          / CHATGLM_KV_CACHE  = auto | tuple | static  (auto: static in graph mode)
  graph mode  ``exe_mode``          / EXE_MODE          = eager | dynamo
  compiler    ``graph_backend``     / CHATGLM_GRAPH_BACKEND = auto | inductor | eager | aot_eager | ...
  int8/int4   ``quant_kernel``      / CHATGLM_QUANT_KERNEL = auto | cpu | cpu_dot | cpu_w8a8 | cuda | npu | math
              (kernels of ``model.quantize(8 | 4)``, see "Weight-only quantization")
  long prompt ``prefill_chunk``     / CHATGLM_PREFILL_CHUNK = auto (1024) | N tokens | 0 (off)
  int4 unpack ``int4_dequant``      / CHATGLM_INT4_DEQUANT = auto | compiled | eager  (CPU prefill)

Internally activations are batch-first, ``[batch, seq, hidden]``, and attention runs in BNSD
(``[batch, heads, seq, head_dim]``), the layout the fused NPU kernels and SDPA take; the public
outputs keep the original's layouts (hidden states ``[seq, batch, hidden]``, legacy cache
``[seq, batch, kv_heads, head_dim]``). A forward opens the cache, begins a step (the keep-mask,
built once) and runs ``ChatGLMModel.prefill`` or ``ChatGLMModel.decode_one_token`` (the layers
with their cache writes); in graph mode those two are compiled, once per model instance and
phase; masks, cache bookkeeping and every data-dependent decision stay outside them. The static
cache's capacity belongs to the instance (buckets), so the decode graph depends only on (batch,
capacity) and is replayed every step (CUDA graphs on CUDA, a static torchair graph on NPU), the
prefill graph serves any prompt length, and a decode step does no device-to-host sync.
"""

import ast
import bisect
import contextlib
import copy
import ctypes
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import mmap
import os
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, LayerNorm, MSELoss
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import logging

try:
    # As remote code, inside the checkpoint's package (transformers copies this relative import).
    from .configuration_chatglm import ChatGLMConfig
except ImportError:
    # Imported as a plain module (tests, scripts): the file beside us on sys.path. importlib keeps
    # transformers' import scanner from asking for a "configuration_chatglm" package.
    ChatGLMConfig = importlib.import_module("configuration_chatglm").ChatGLMConfig

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Run-time options: config field > environment variable > default; the config's own checks.
# ---------------------------------------------------------------------------------------------

_OPTION_SPECS = (
    # (config field, environment variable, allowed values, default)
    ("attention_backend", "CHATGLM_ATTENTION", ("auto", "npu", "sdpa", "math"), "auto"),
    ("rmsnorm_backend", "CHATGLM_RMSNORM", ("auto", "npu", "fused", "math"), "auto"),
    ("kv_cache", "CHATGLM_KV_CACHE", ("auto", "tuple", "static"), "auto"),
    ("exe_mode", "EXE_MODE", ("eager", "dynamo"), "eager"),
    (
        "quant_kernel",
        "CHATGLM_QUANT_KERNEL",
        ("auto", "cpu", "cpu_dot", "cpu_w8a8", "cuda", "npu", "math"),
        "auto",
    ),
    ("linear_backend", "CHATGLM_LINEAR", ("auto", "dot", "gemv", "aten"), "auto"),
    ("cpu_weights", "CHATGLM_CPU_WEIGHTS", ("auto", "copy", "mapped"), "auto"),
    ("huge_pages", "CHATGLM_HUGE_PAGES", ("auto", "off"), "auto"),
    ("int4_dequant", "CHATGLM_INT4_DEQUANT", ("auto", "compiled", "eager"), "auto"),
)
OPTION_CHOICES: Mapping[str, tuple] = MappingProxyType({spec[0]: spec[2] for spec in _OPTION_SPECS})
# A prompt longer than this runs through the cache in chunks of this many tokens: every prompt
# temporary (MLP intermediate, QKV, attention mask) is then bounded by chunk x context instead of
# growing with the prompt. Measured on the small preset (bf16, 2-core Xeon): see README "Long prompts".
PREFILL_CHUNK = 1024


def resolve_prefill_chunk(config) -> int:
    """Tokens per prefill chunk for ``config`` (its ``prefill_chunk``, else CHATGLM_PREFILL_CHUNK,
    else PREFILL_CHUNK; 0 = off)."""
    value, source = getattr(config, "prefill_chunk", None), "config.prefill_chunk"
    if value is None:
        value, source = os.environ.get("CHATGLM_PREFILL_CHUNK"), "CHATGLM_PREFILL_CHUNK"
    if value is None or value == "" or value == "auto":
        return PREFILL_CHUNK
    try:
        chunk = int(str(value).strip())
    except ValueError:
        chunk = -1
    # A 1-token chunk would be a decode step, where a padding token has nothing to attend to.
    if isinstance(value, bool) or chunk < 0 or chunk == 1:
        raise ValueError(
            f"{source}={value!r} is not valid; use a whole number of tokens per prefill chunk "
            "(at least 2), 0 for no chunking, or auto"
        )
    return chunk


@dataclass(frozen=True)
class RuntimeOptions:
    """The fast-path switches of one model instance (names = the config fields)."""

    attention_backend: str = "auto"
    rmsnorm_backend: str = "auto"
    kv_cache: str = "auto"
    exe_mode: str = "eager"
    quant_kernel: str = "auto"
    linear_backend: str = "auto"
    cpu_weights: str = "auto"  # auto/copy: copy weights out of a private file mapping; mapped: leave them
    huge_pages: str = "auto"  # auto: CPU weight copies and quantized weights in transparent huge pages; off
    int4_dequant: str = "auto"  # CPU int4 prefill unpacking: auto/compiled (inductor kernel) or eager
    graph_backend: Any = "auto"
    prefill_chunk: int = 0  # tokens per prefill chunk; 0 = the whole prompt at once

    @property
    def cache_kind(self) -> str:
        """The cache actually used: ``auto`` is static in graph mode (one decode graph for every
        step; a growing tuple cache would recompile as it grows) and the original's tuple cache
        in eager mode (what code written against the original expects)."""
        if self.kv_cache != "auto":
            return self.kv_cache
        return "static" if self.exe_mode == "dynamo" else "tuple"

    @classmethod
    def from_config(cls, config) -> "RuntimeOptions":
        values = {}
        for field, env_name, allowed, default in _OPTION_SPECS:
            value, source = getattr(config, field, None), f"config.{field}"
            if value is None:
                value, source = os.environ.get(env_name), env_name
            if value is None or value == "":
                value, source = default, None
            value = str(value).strip().lower()
            if value not in allowed:
                raise ValueError(f"{source}={value!r} is not valid; use one of: {', '.join(allowed)}")
            values[field] = value
        backend = getattr(config, "graph_backend", None)
        values["graph_backend"] = backend or os.environ.get("CHATGLM_GRAPH_BACKEND") or "auto"
        values["prefill_chunk"] = resolve_prefill_chunk(config)
        return cls(**values)


_SIZE_FIELDS = (
    "num_layers",
    "padded_vocab_size",
    "hidden_size",
    "ffn_hidden_size",
    "kv_channels",
    "num_attention_heads",
    "seq_length",
)
_FLAG_FIELDS = (
    "multi_query_attention",
    "add_bias_linear",
    "add_qkv_bias",
    "post_layer_norm",
    "apply_residual_connection_post_layernorm",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_problem(config) -> Optional[str]:
    """What is wrong with a ChatGLM config's architecture fields, or None: each size a positive
    integer, flags true/false, positive epsilon and rope_ratio, query heads a multiple of the KV
    groups, a head dim the half-dim rotary pairs can split (multiple of 4). A field an older
    config class lacks (chatglm2 has no rope_ratio) takes its default and is not checked."""
    present = dict(vars(config))

    for name in _SIZE_FIELDS:
        value = present.get(name)
        if not _is_int(value) or value < 1:
            return f"{name}={value!r} must be a positive integer"
    for name in _FLAG_FIELDS:
        if name in present and not isinstance(present[name], bool):
            return f"{name}={present[name]!r} must be true or false"
    for name in ("layernorm_epsilon", "rope_ratio"):
        value = present.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"{name}={value!r} must be a positive number"
    pre_seq_len = present.get("pre_seq_len")
    if pre_seq_len is not None and (not _is_int(pre_seq_len) or pre_seq_len < 1):
        return f"pre_seq_len={pre_seq_len!r} must be null or a positive integer"
    bits = present.get("quantization_bit") or 0
    if bits not in (0, 4, 8) or isinstance(bits, bool):
        return f"quantization_bit={bits!r} must be 0, 4 or 8"
    for name in ("quantization_group_size", "quantization_int8_group_size"):
        group_size = present.get(name)
        if group_size is not None and (not _is_int(group_size) or group_size < 0):
            return f"{name}={group_size!r} must be null or an integer >= 0"
    heads, groups = present["num_attention_heads"], present.get("multi_query_group_num")
    if present.get("multi_query_attention"):
        if not _is_int(groups) or groups < 1:
            return f"multi_query_group_num={groups!r} must be a positive integer"
        if heads % groups:
            return f"num_attention_heads={heads} must be a multiple of multi_query_group_num={groups}"
    if present["kv_channels"] % 4:
        return f"kv_channels={present['kv_channels']} must be a multiple of 4 (rotary pairs on half the head)"
    return None


def check_config(config) -> None:
    """Raise ``ValueError`` naming the first bad architecture field of ``config``."""
    problem = config_problem(config)
    if problem:
        raise ValueError(f"invalid ChatGLM config: {problem}")


# ---------------------------------------------------------------------------------------------
# Device capability probe (once, at import, never failing).
# ---------------------------------------------------------------------------------------------


def _optional_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # absent, or present but unusable (e.g. torch_npu without CANN)
        return None


_TORCH_NPU = _optional_import("torch_npu")


def torch_npu_present() -> bool:
    """Whether torch_npu imported when this file loaded: the one probe, the benchmark asks it too."""
    return _TORCH_NPU is not None


_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
_HAS_F_RMS_NORM = hasattr(F, "rms_norm")
# Dynamo's per-function limit on compiled variants; the config key was renamed in torch 2.6.
_RECOMPILE_LIMIT_NAME = (
    "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
)
GRAPH_RECOMPILE_LIMIT = 64
# The static cache's first capacity bucket; larger ones double it (up to seq_length).
STATIC_CACHE_MIN_LEN = 256
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The fused NPU kernels compute in half precision only.
_NPU_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def _mark_static_address(tensor: torch.Tensor) -> None:
    """Tell dynamo a KV buffer's address is fixed (CUDA graphs, torchair) without guarding on it:
    torch < 2.4 guards by default, which would recompile, and keep alive, every new cache."""
    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is None:
        return
    if "guard" in inspect.signature(mark).parameters:
        mark(tensor, guard=False)
    else:
        mark(tensor)


def _file_mapped_ranges() -> List[Tuple[int, int]]:
    """Address ranges of this process privately mapped from regular files (Linux
    ``/proc/self/maps``; empty elsewhere): where tensors loaded as views of an mmap-ed safetensors
    file live. Shared mappings are left out: pages shared with other processes on purpose."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(None, 5)
        private = len(fields) == 6 and fields[1].endswith("p")
        if private and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
            start, _, end = fields[0].partition("-")
            ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def memory_available_bytes() -> Optional[int]:
    """The host's MemAvailable (Linux /proc/meminfo) in bytes; None where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_HUGE_PAGE_BYTES = 2 << 20


@functools.lru_cache(maxsize=None)
def _transparent_huge_pages() -> bool:
    """Whether this kernel backs MADV_HUGEPAGE regions with transparent huge pages (Linux THP
    'always' or 'madvise')."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def _huge_page_empty_like(t: torch.Tensor) -> Optional[torch.Tensor]:
    """An uninitialised contiguous tensor like ``t`` in fresh anonymous memory that asks for
    transparent huge pages (2 MiB-aligned, MADV_HUGEPAGE), or None where that is not offered.

    A weight streamed from 4 KiB pages costs a TLB miss per page: on a 2-core EPYC VM a read of
    such memory ran at 29-32 GB/s and at 52-60 from huge pages (one layer's kernels: +5 to +50 %),
    and the 6B shape's bf16 decode took 445 ms/token from a 4 KiB copy against 349-402 from the
    checkpoint's file mapping, which that kernel (6.18) maps in 2 MiB folios."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < _HUGE_PAGE_BYTES:
        return None
    if not hasattr(mmap, "MADV_HUGEPAGE") or not _transparent_huge_pages():
        return None
    size = nbytes + _HUGE_PAGE_BYTES
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = ctypes.c_char.from_buffer(region)
        offset = -ctypes.addressof(view) % _HUGE_PAGE_BYTES
        del view  # (an exported buffer would pin the mapping's size)
        # Only the whole 2 MiB pages: the tail stays in small pages (no huge page half used).
        region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES)
        out = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return out.view(t.dtype).view(t.shape)


def _into_huge_pages(t: torch.Tensor) -> bool:
    """Move ``t``'s values into transparent huge pages (``_huge_page_empty_like``) where offered;
    whether it did."""
    fresh = _huge_page_empty_like(t)
    if fresh is None:
        return False
    fresh.copy_(t.detach())
    t.data = fresh
    return True


def move_weights_off_files(module: nn.Module, huge_pages: bool = True) -> int:
    """Copy every CPU parameter and buffer of ``module`` that is a view of a file mapping into
    ordinary process memory; returns the bytes copied.

    ``from_pretrained`` can leave the weights as views of the mmap-ed safetensors file (page-cache
    pages): a decode step streams them 13 % slower than the same weights in private memory (the
    6B shape in bf16 on a 2-core Xeon: 645 against 563 ms/token). Copies of 2 MiB and more go to
    transparent huge pages where the kernel offers them (``_huge_page_empty_like``), unless
    ``huge_pages`` is False. One tensor at a time, so the
    extra memory is one tensor's; skipped (weights left where they are) when the copies would not
    fit in the memory available, where the mapping is what lets the model run at all."""
    ranges = _file_mapped_ranges()
    if not ranges:
        return 0
    starts = [start for start, _ in ranges]

    def mapped(t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or t.numel() == 0:
            return False
        address = t.untyped_storage().data_ptr()
        i = bisect.bisect_right(starts, address) - 1
        return i >= 0 and address < ranges[i][1]

    unique = {id(t): t for m in module.modules() for t in (*m._parameters.values(), *m._buffers.values())}
    todo = [t for t in unique.values() if t is not None and mapped(t)]
    total = sum(t.numel() * t.element_size() for t in todo)
    available = memory_available_bytes()
    # The file's pages are clean page cache, reclaimed as the copies need room: the copies must
    # fit in what is available (page cache included), with a margin.
    if not todo or (available is not None and total > 0.9 * available):
        return 0
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    used = {bisect.bisect_right(starts, t.untyped_storage().data_ptr()) - 1 for t in todo}
    # Normal tensors even when the first forward runs under inference_mode (chat(), servers):
    # an inference-mode copy would break any later forward that autograd records.
    with torch.inference_mode(False), torch.no_grad():
        for t in todo:
            first = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
            last = first + t.numel() * t.element_size()
            if not (huge_pages and _into_huge_pages(t)):
                t.data = t.detach().clone(memory_format=torch.contiguous_format)
            # The pages wholly inside this tensor, right after its copy: the footprint stays the
            # model plus one tensor (a page shared with the next tensor would be read back).
            _page_out([(-(-first // page) * page, last // page * page)])
    _page_out([ranges[i] for i in sorted(used)])  # and what is left of those mappings
    return total


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; their contents stay as they were


@functools.lru_cache(maxsize=None)
def _libc_madvise():
    """libc's ``madvise``, looked up once (called per weight tensor); None where there is none."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _page_out(ranges: List[Tuple[int, int]]) -> None:
    """Hand the file pages a weight was copied from back to the kernel. The loader keeps the
    whole file mapped (transformers 5 holds one storage of the entire file), so its pages would
    stay resident, doubling the model's footprint (6B in bf16: 11.5 GB of file pages beside the
    12.5 GB copy on a 24 GiB machine). MADV_PAGEOUT only reclaims: a page read again is read
    back from the file (or, if modified, kept), so nothing can change under a reader."""
    madvise = _libc_madvise()
    if madvise is None:
        return
    for start, end in ranges:
        if end > start:
            madvise(start, end - start, _MADV_PAGEOUT)  # an older kernel says EINVAL: pages stay


def _require_torch_npu(what: str):
    if _TORCH_NPU is None:
        raise RuntimeError(
            f"{what} needs torch_npu, which cannot be imported here; install torch_npu and CANN "
            "(see requirements-npu.txt) or choose another backend (e.g. CHATGLM_ATTENTION=sdpa, "
            "CHATGLM_RMSNORM=fused)"
        )
    return _TORCH_NPU


# ---------------------------------------------------------------------------------------------
# Op implementations. Tensors in BNSD: q [b, heads, sq, d]; k, v [b, kv_heads, sk, d].
# keep, the one mask form every kernel takes: bool [b, 1, sq, sk] with True = attend (SDPA's
# polarity), or CAUSAL: query i sees keys 0 .. sk - sq + i (the last sq keys are the queries'
# own; for one query token that is every key). Built once per forward by the cache's ``begin``.
# ---------------------------------------------------------------------------------------------

CAUSAL = "causal"


def attention_keep_mask(query_slots, key_keep, query_keep=None):
    """The explicit keep-mask: bool ``[b, 1, s, kv]``, True = attend.

    ``query_slots`` [s]: the cache slot of each new token; ``key_keep`` [b, kv]: which slots hold
    real tokens. Causality compares slot numbers, which is a slice of the causal table
    ``slot <= query_slot`` without storing a ``max_len x max_len`` table (1 GiB at 32k).
    ``query_keep`` [b, s] (prompts without past only): a padding query row attends everywhere,
    as in the original, which keeps its softmax finite.
    """
    slots = torch.arange(key_keep.shape[1], device=key_keep.device)
    keep = (slots[None, :] <= query_slots[:, None])[None, None] & key_keep[:, None, None, :]
    if query_keep is not None:
        keep = keep | ~query_keep[:, None, :, None]
    return keep


@dataclass
class PaddedChunk:
    """The keep-mask of a padded prompt chunk after a past, factored: ``key_keep`` [b, past + c]
    (which slots hold real tokens), ``slots`` [c] (the chunk's own), ``query_keep`` [b, c]. The
    dense form is [b, 1, c, past + c]; the CPU kernel never builds it."""

    key_keep: torch.Tensor
    slots: torch.Tensor
    query_keep: torch.Tensor

    def dense(self) -> torch.Tensor:
        return attention_keep_mask(self.slots, self.key_keep, self.query_keep)


def _attention_math(q, k, v, keep):
    """Unfused baseline: explicit matmul + fp32 softmax, K/V heads repeated like the original."""
    if isinstance(keep, PaddedChunk):
        keep = keep.dense()
    heads, kv_heads, sq, sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.float()
    if keep is CAUSAL and sq > 1:
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if keep is not CAUSAL:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


# CPU flash attention that also returns each row's log-sum-exp (aten's kernel behind SDPA).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attention_chunk_after_past_cpu(q, k, v, key_keep=None):
    """Causal attention of a prompt chunk ``q`` [b, h, c, d] over ``k``/``v`` [b, g, past + c, d]
    (the past, then the chunk itself) without a [c, past + c] mask: the past with no mask (the
    heads sharing a KV head stacked along the query axis), the chunk over itself with the causal
    kernel, the two softmaxes merged by their log-sum-exps. Such a mask would make SDPA compute
    every masked pair and add the mask (1.6x slower per chunk, measured at 8k).

    ``key_keep`` [b, past + c] (a padded batch): the past part takes a per-key mask [b, 1, 1,
    past], the chunk part causal & real keys [b, 1, c, c], plus its diagonal, so that a padding
    query row (never read) still sees one key and stays finite."""
    batch, heads, new, head_dim = q.shape
    groups, past = k.shape[1], k.shape[2] - new
    past_mask = new_mask = None
    if key_keep is not None:
        hidden = torch.zeros((), dtype=q.dtype, device=q.device).fill_(float("-inf"))
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        past_mask = torch.where(key_keep[:, None, None, :past], zero, hidden)
        slots = torch.arange(new, device=q.device)
        causal = slots[None, :] <= slots[:, None]
        own = (causal[None] & key_keep[:, None, past:]) | (slots[None, :] == slots[:, None])[None]
        new_mask = torch.where(own[:, None], zero, hidden)
    stacked = q.reshape(batch, groups, heads // groups * new, head_dim)
    out_past, lse_past = _CPU_FLASH(stacked, k[:, :, :past], v[:, :, :past], attn_mask=past_mask)[:2]
    lse_past = lse_past.reshape(batch, heads, new)
    if key_keep is not None:  # a row with no real past key: the kernel reports lse 0, not -inf
        lse_past = lse_past.masked_fill(~key_keep[:, :past].any(-1)[:, None, None], float("-inf"))
    k_new, v_new = k[:, :, past:], v[:, :, past:]
    if groups != heads:
        k_new = k_new.repeat_interleave(heads // groups, dim=1)
        v_new = v_new.repeat_interleave(heads // groups, dim=1)
    if new_mask is None:
        out_new, lse_new = _CPU_FLASH(q, k_new, v_new, 0.0, True)[:2]
    else:
        out_new, lse_new = _CPU_FLASH(q, k_new, v_new, attn_mask=new_mask)[:2]
    # softmax over both parts = each part's softmax weighted by its share of the total mass.
    share = torch.sigmoid(lse_past - lse_new)[..., None]
    out_past = out_past.reshape(batch, heads, new, head_dim)
    return (out_new.float() + (out_past.float() - out_new.float()) * share).to(q.dtype)


def _attention_sdpa(q, k, v, keep):
    """``F.scaled_dot_product_attention`` without materialising repeated K/V heads."""
    batch, heads, sq, head_dim = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    if isinstance(keep, PaddedChunk):
        if q.device.type == "cpu" and _CPU_FLASH is not None:
            return _attention_chunk_after_past_cpu(q, k, v, keep.key_keep)
        keep = keep.dense()
    mask = None if keep is CAUSAL else keep
    if kv_heads != heads and sq == 1:
        # Decode: the query heads sharing a KV head become that head's "sequence" (the mask is
        # per batch row, so it broadcasts); one plain SDPA call, no repeat, on any torch.
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
        return out.reshape(batch, heads, 1, head_dim)
    extra = {}
    if kv_heads != heads:
        if _SDPA_HAS_GQA:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    # Branches, not is_causal=<expression>: with dynamic shapes the comparison is symbolic.
    if keep is CAUSAL and sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    if keep is CAUSAL and sq > 1 and q.device.type == "cpu" and _CPU_FLASH is not None:
        return _attention_chunk_after_past_cpu(q, k, v)
    if keep is CAUSAL and sq > 1:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)


_NPU_NO_BAND = 2147483647  # pre/next_tokens wide open: the explicit mask alone decides
_NPU_COMPRESSED_MASK = 2048  # the causal sparse modes take exactly this triangle (torch_npu docs)


def _attention_npu(q, k, v, keep):
    """Ascend fused kernels: the incremental (decode) kernel for one query token, the prompt kernel
    otherwise. Both take contiguous BNSD tensors (the aclnn docs reject non-contiguous inputs,
    the mask included), GQA via ``num_key_value_heads`` and a bool mask with True = masked."""
    npu = _require_torch_npu("attention_backend='npu'")
    if isinstance(keep, PaddedChunk):
        keep = keep.dense()
    heads, kv_heads, sq = q.shape[1], k.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    masked = None if keep is CAUSAL else (~keep).contiguous()
    if sq == 1:
        return npu.npu_incre_flash_attention(
            q,
            k,
            v,
            atten_mask=masked,
            num_heads=heads,
            scale_value=scale,
            input_layout="BNSD",
            num_key_value_heads=kv_heads,
        )
    sparse_mode = 0  # the explicit mask alone decides
    if masked is None:
        # Causal: the compressed mode ("rightDownCausal", the diagonal anchored bottom-right, so a
        # chunk after a past sees the whole past) with its fixed 2048 x 2048 triangle, instead of
        # an [s, s] mask (1 GiB at 32k). Without any mask the kernel would ignore the band.
        masked = torch.ones(_NPU_COMPRESSED_MASK, _NPU_COMPRESSED_MASK, dtype=torch.bool, device=q.device)
        masked, sparse_mode = masked.triu(1), 3
    return npu.npu_prompt_flash_attention(
        q,
        k,
        v,
        atten_mask=masked,
        num_heads=heads,
        scale_value=scale,
        pre_tokens=_NPU_NO_BAND,
        next_tokens=_NPU_NO_BAND,
        input_layout="BNSD",
        num_key_value_heads=kv_heads,
        sparse_mode=sparse_mode,
    )


# RMSNorm kernels take F.rms_norm's arguments (x, normalized_shape, weight, eps), so that
# "fused" is F.rms_norm itself.
def _rmsnorm_math(x, shape, weight, eps):
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return (weight * x).to(input_dtype)


def _rmsnorm_npu(x, shape, weight, eps):
    return _require_torch_npu("rmsnorm_backend='npu'").npu_rms_norm(x, weight, epsilon=eps)[0]


# Cache writers take Tensor.index_copy_'s arguments: (buffer [b, kv_heads, max_len, d], dim = 2,
# slots [s] (the same for every row), update [b, kv_heads, s, d]).
def _cache_write_npu(buffer, dim, slots, update):
    # scatter_update_ takes one start position per batch row on the given axis.
    starts = slots[:1].expand(buffer.shape[0]).contiguous()
    _require_torch_npu("kv_cache='static' on NPU").scatter_update_(buffer, starts, update.contiguous(), dim)


class ShardedLinear(nn.Linear):
    """This rank's part of a tensor-parallel projection (the model's tensor-parallel contract, with
    ``SelfAttention.replicate_kv_groups``): an ``nn.Linear`` over the rank's slice of the weight
    whose product then goes through ``combine``, which returns the layer's whole output (the
    all-reduce of a layer split along its input, the gather of one split along its output). Every
    linear backend runs the slice as it runs a whole layer (``gemv``, ``dot``: the one-row kernels,
    where a layer of another class gets its own forward), then combines."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], combine: Callable):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(F.linear(x, self.weight, self.bias))


# The layers the one-row kernels run themselves (anything else runs its own forward).
_PLAIN_LINEARS = (nn.Linear, ShardedLinear)


def _combined(linear: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return linear.combine(out) if type(linear) is ShardedLinear else out


def _gemv_eager(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.mv(weight, x) if bias is None else torch.addmv(bias, weight, x)


def _opaque_op(name: str, kernel: Callable, fake: Callable) -> Callable:
    """``kernel`` as one opaque op ``chatglm3::<name>`` for graph mode (``fake`` gives its output's
    shape): dynamo traces it with no graph break and inductor calls it as it is. Registered once
    per process: the file may be imported under several module names (trust_remote_code, tests).

    Defined with ``torch.library.Library`` and one kernel for every backend (the schema inferred
    from ``kernel``'s annotations): a call costs ~4 us over the kernel itself, where
    ``torch.library.custom_op``'s Python dispatch layers cost ~12 us (2-core Xeon, no_grad), paid
    by every projection of a compiled decode step (113 per chatglm3-6b token). Without
    ``infer_schema``/``register_fake``: ``custom_op``; without that either, ``kernel`` itself."""
    existing = getattr(getattr(torch.ops, "chatglm3", None), name, None)
    if existing is not None:
        return existing.default
    infer_schema = getattr(torch.library, "infer_schema", None)
    register_fake = getattr(torch.library, "register_fake", None)
    if infer_schema is not None and register_fake is not None:
        library = torch.library.Library("chatglm3", "FRAGMENT")
        library.define(name + infer_schema(kernel, mutates_args=()))
        library.impl(name, kernel, "CompositeExplicitAutograd")  # any backend: oneDNN-packed weights too
        register_fake(f"chatglm3::{name}")(fake)
        packet = getattr(torch.ops.chatglm3, name)  # cached by torch.ops for the process
        packet._chatglm3_library = library  # the registration lives as long as the Library object
        return packet.default
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return kernel
    op = custom_op(f"chatglm3::{name}", mutates_args=())(kernel)
    op.register_fake(fake)
    return op


# torch.mv in graph mode: inductor would decompose the matrix-vector product into a generated
# reduction that streams the weight at ~60 % of ATen's rate.
_GEMV = _opaque_op("gemv", _gemv_eager, lambda x, weight, bias: x.new_empty(weight.shape[0]))


def _linear_gemv(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One row (a batch-1 decode step) on a CPU: ATen's matrix-vector kernel (``torch.mv``),
    which reads a bf16/fp16 weight near the memory's streaming rate, where oneDNN's GEMM for one
    row reads it 20-30 % slower (27392x4096 bf16, 2-core Xeon: 8.6 ms against 10.3-11.8 ms).
    Anything else (several rows, a layer DeepSpeed or quantization replaced) runs the layer's
    own forward. Numerically the same product: fp32 accumulation, one rounding per output."""
    if x.shape[-1] != x.numel() or type(linear) not in _PLAIN_LINEARS:
        return linear(x)
    out = (
        _GEMV(x.reshape(-1), linear.weight, linear.bias)
        if _is_compiling()
        else _gemv_eager(x.reshape(-1), linear.weight, linear.bias)
    )
    return _combined(linear, out.view(*x.shape[:-1], out.shape[-1]))


# The int8 / int4 C kernels' next-tile prefetch (see the note above cg_dot8_x4 in
# _NATIVE_DOT_SOURCE): the largest four-row tile, in bytes, that prefetches the next one while it
# is read. "near": small tiles only (measured best on a 2-core EPYC Zen 4; from 16 KiB int8 tiles
# on it was slower there); "all": every tile (a 2-core EPYC Zen 5: int8 layers of 4096-wide rows
# 24-32 GB/s near against 34-50 all, int4 4096x13696 32-35 against 35-50). The bf16 kernel reads
# one row at a time and leaves prefetching to the hardware.
_DOT_PREFETCH = MappingProxyType({"near": 12288, "all": 2**62})
_DOT_PREFETCH_ENV = "CHATGLM_DOT_PREFETCH"


def _amd_family_in(info: str) -> int:
    """The family number of the first processor in ``info`` (/proc/cpuinfo's text) if it is an AMD
    one (Zen 4 is 25, Zen 5 26), else 0."""
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in info.splitlines()[:32])
        if value
    )
    if fields.get("vendor_id") != "AuthenticAMD":
        return 0
    try:
        return int(fields.get("cpu family", "0"))
    except ValueError:
        return 0


@functools.lru_cache(maxsize=None)
def _amd_cpu_family() -> int:
    """This machine's AMD CPU family (``_amd_family_in``), 0 elsewhere or unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            return _amd_family_in(f.read(1 << 16))
    except OSError:
        return 0


def _cpu_tuned_option(env: str, choices: Tuple[str, str], zen5: str) -> str:
    """The C kernels' setting ``env`` resolved to one of ``choices``: auto is ``zen5`` on AMD Zen 5
    and later, the other choice elsewhere; anything else is refused in one line."""
    option = (os.environ.get(env) or "auto").strip().lower()
    if option == "auto":
        return zen5 if _amd_cpu_family() >= 26 else next(c for c in choices if c != zen5)
    if option not in choices:
        raise ValueError(f"{env}={option!r} is not valid; use one of: auto, {', '.join(choices)}")
    return option


def _dot_prefetch_mode() -> str:
    """CHATGLM_DOT_PREFETCH resolved: near or all (auto: all on AMD Zen 5 and later, else near)."""
    return _cpu_tuned_option(_DOT_PREFETCH_ENV, ("near", "all"), "all")


def _dot_prefetch_tile() -> int:
    """Tile bytes up to which the int8 / int4 C kernels prefetch the next tile."""
    return _DOT_PREFETCH[_dot_prefetch_mode()]


# Rows per tile of the int8 / int4 C kernels. "wide": int8 four rows (cg_dot8_x4), int4 with a
# scale per 128-column block (the default group) eight (cg_dot4_x8: each activation vector serves
# eight rows, the block scales made 16 at a time), measured faster on a 2-core Xeon (int4
# 27392x4096 +2-6 %). "narrow": int8 two rows, int4 four (cg_dot4_x4), measured faster on a 2-core
# EPYC Zen 5, where fewer streams per thread read faster (interleaved rounds, median GB/s, int4
# 27392x4096 38.9 -> 41.4, 4096x13696 32.7 -> 39.5, 4608x4096 37.9 -> 41.2, 4096x4096 38.3 -> 41.5;
# int8 36.4 -> 39.3, 33.9 -> 35.4, 35.6 -> 37.8, 36.3 -> 40.1). auto: narrow on AMD Zen 5 and
# later, else wide (the other CPUs as measured or as before).
_DOT_TILES_ENV = "CHATGLM_DOT_TILES"


def _dot_tiles() -> str:
    """CHATGLM_DOT_TILES resolved: narrow or wide (auto: narrow on AMD Zen 5 and later, else wide)."""
    return _cpu_tuned_option(_DOT_TILES_ENV, ("narrow", "wide"), "narrow")


def _check_dot_settings() -> None:
    """Refuse a bad CHATGLM_DOT_* setting where the kernel is chosen, not at the first step."""
    _dot_prefetch_mode()
    _dot_tiles()


def _dot_gemv_eager(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [k] bf16 . weight [n, k] bf16 (contiguous, CPU) (+ bias [n] bf16): the cpu_dot library's
    bf16 kernel, float32 sums rounded once to bf16 (as ``torch.mv``'s)."""
    lib = _NativeDot.load()
    if lib is None:
        raise RuntimeError(_native_dot_error("linear_backend", "dot"))
    y = torch.empty(weight.shape[0], dtype=torch.bfloat16)
    lib.cg_gemv_bf16(
        x.data_ptr(),
        weight.shape[1],
        weight.data_ptr(),
        weight.shape[0],
        0 if bias is None else bias.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


_DOT_GEMV = _opaque_op("dot_gemv", _dot_gemv_eager, lambda x, weight, bias: x.new_empty(weight.shape[0]))


def _linear_dot(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One bf16 row (a batch-1 decode step) on a CPU through our C kernel (``cg_gemv_bf16`` in
    ``_NATIVE_DOT_SOURCE``: AVX512-BF16 ``vdpbf16ps``, one weight row at a time, each thread
    one sequential stream). On a CPU with AVX512-BF16 and no AMX (AMD Zen 4/5) ATen's ``mv`` and
    oneDNN's GEMM are compute-bound for one row; this reads the weight at the memory's rate. Anything
    else (several rows, other dtypes, a layer DeepSpeed or quantization replaced) runs the
    layer's own forward. Numerically a product in float32 sums (in another order than ATen's),
    rounded once per output."""
    weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
    if (
        x.shape[-1] != x.numel()
        or type(linear) not in _PLAIN_LINEARS
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or not weight.is_contiguous()
        or (bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()))
    ):
        return linear(x)
    row = x.reshape(-1).contiguous()
    out = _DOT_GEMV(row, weight, bias) if _is_compiling() else _dot_gemv_eager(row, weight, bias)
    return _combined(linear, out.view(*x.shape[:-1], out.shape[-1]))


# ---------------------------------------------------------------------------------------------
# The op tables and the one resolver: what runs a forward on a device and dtype.
# ---------------------------------------------------------------------------------------------

# The one place device kernels are chosen from (read-only: no module-level mutable state).
ATTENTION_BACKENDS: Mapping[str, Callable] = MappingProxyType(
    {"npu": _attention_npu, "sdpa": _attention_sdpa, "math": _attention_math}
)
# (resolve_backends refuses "fused" where torch has no F.rms_norm.)
RMSNORM_BACKENDS: Mapping[str, Callable] = MappingProxyType(
    {"npu": _rmsnorm_npu, "fused": getattr(F, "rms_norm", _rmsnorm_math), "math": _rmsnorm_math}
)
CACHE_WRITERS: Mapping[str, Callable] = MappingProxyType(
    {"npu": _cache_write_npu, "index_copy": torch.Tensor.index_copy_}
)
# aten: ``project(linear, x)`` is the call of the layer itself (its F.linear: oneDNN/MKL on a CPU).
LINEAR_BACKENDS: Mapping[str, Callable] = MappingProxyType(
    {"dot": _linear_dot, "gemv": _linear_gemv, "aten": nn.Module.__call__}
)
# Where auto picks the gemv: CPUs, for these weight dtypes (measured faster than oneDNN's GEMM).
_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def _auto_linear(kind: str, dtype: torch.dtype) -> str:
    """auto's dense projections. On a CPU, for bf16/fp16: the gemv (measured faster than oneDNN's
    GEMM for one row on Xeons, AMX included), except bf16 on a CPU with AVX512-BF16 but no AMX
    (AMD Zen 4/5), where ATen's mv is compute-bound (2-core EPYC Zen 4, 27392x4096: mv 7.0,
    oneDNN 13.4 GB/s): our ``dot`` kernel where it builds with AVX512-BF16, else oneDNN (aten)."""
    if kind != "cpu" or dtype not in _GEMV_DTYPES:
        return "aten"
    if dtype == torch.bfloat16 and _cpu_has_fast_half_gemm() and not _cpu_has_amx():
        return "dot" if _NativeDot.bf16_vectorised() else "aten"
    return "gemv"


def npu_chip_limits(chip: Optional[str]) -> Dict[str, Optional[str]]:
    """Which fused NPU kernels ``chip`` (``torch.npu.get_device_name()``) cannot run, and why.

    From the torch_npu / CANN docs and sources: on Atlas inference cards (Ascend310P*) the prompt
    and incremental attention kernels take ``num_key_value_heads`` = 0 only (no grouped KV, and
    ChatGLM3 has 2 KV groups) and ``scatter_update_`` is not offered; on Ascend950 both attention
    kernels are withdrawn ("no longer supported on Ascend950", eager and torchair alike).
    """
    name = chip or ""
    limits: Dict[str, Optional[str]] = {"attention": None, "cache_writer": None}
    if name.startswith("Ascend310P"):
        limits["attention"] = f"{name} runs the fused attention kernels without grouped KV heads only"
        limits["cache_writer"] = f"{name} has no scatter_update_"
    elif "Ascend950" in name or "Ascend910_95" in name:
        limits["attention"] = f"{name} no longer supports npu_prompt/incre_flash_attention"
    return limits


def _npu_chip_name(device: torch.device) -> Optional[str]:
    npu_module = getattr(torch, "npu", None) or getattr(_TORCH_NPU, "npu", None)
    get_name = getattr(npu_module, "get_device_name", None)
    if get_name is None:
        return None
    try:
        return str(get_name(device.index if device.index is not None else 0))
    except Exception:  # an unreadable name keeps the default choice
        return None


@dataclass(frozen=True, eq=False)
class Backends:
    """What runs a forward on one device and dtype, decided once by :func:`resolve_backends`
    (every fallback included, in ``fallbacks``). Modules read it at the call site
    (``step.backends.attend(q, k, v, keep)``); nothing is written into them."""

    device: str
    attention: str
    rmsnorm: str
    kv_cache: str
    cache_writer: str
    quant_kernel: str  # "none" for an unquantized model
    linear: str  # "gemv" (one-row steps on a CPU) or "aten" (the layers' own forward)
    compile: Optional[Mapping[str, Mapping[str, Any]]]  # phase -> torch.compile kwargs; None: eager
    fallbacks: tuple = ()
    attend: Callable = dataclasses.field(default=_attention_math, repr=False)
    normalize: Callable = dataclasses.field(default=_rmsnorm_math, repr=False)
    write: Callable = dataclasses.field(default=torch.Tensor.index_copy_, repr=False)
    project: Callable = dataclasses.field(default=nn.Module.__call__, repr=False)


def resolve_backends(
    options: RuntimeOptions,
    device,
    dtype: torch.dtype,
    chip: Optional[str] = None,
    bits: int = 0,
    grouped: bool = False,
) -> Backends:
    """The one resolver: kernels, cache writer, quantized-matmul kernel (for ``bits``-bit weights,
    0 = unquantized; ``grouped``: scales per group of input columns) and per-phase compile settings for tensors of ``dtype`` on ``device`` (a
    ``torch.device`` or its type name); ``chip`` is the NPU's name (looked up when omitted)."""
    kind = device if isinstance(device, str) else device.type
    if dtype not in _SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in _SUPPORTED_DTYPES)
        raise TypeError(
            f"dtype {str(dtype).replace('torch.', '')} is not supported on {kind}; "
            f"load the model with torch_dtype in ({names})"
        )
    attention, rmsnorm = options.attention_backend, options.rmsnorm_backend
    on_npu = kind == "npu"
    fallbacks = []
    limits = {"attention": None, "cache_writer": None}
    if on_npu:
        if chip is None and isinstance(device, torch.device):
            chip = _npu_chip_name(device)
        limits = npu_chip_limits(chip)
    if attention == "auto":
        attention = "npu" if on_npu and dtype in _NPU_KERNEL_DTYPES else "sdpa"
        if attention == "npu" and limits["attention"]:
            fallbacks.append(f"attention: sdpa instead of the fused NPU kernels ({limits['attention']})")
            attention = "sdpa"
    if rmsnorm == "auto":
        rmsnorm = "npu" if on_npu else ("fused" if _HAS_F_RMS_NORM else "math")
    if attention == "npu":
        _require_torch_npu("attention_backend='npu'")
        if limits["attention"]:
            raise ValueError(
                f"attention_backend='npu' cannot run here: {limits['attention']}; set "
                "CHATGLM_ATTENTION=sdpa (or auto)"
            )
        if on_npu and dtype not in _NPU_KERNEL_DTYPES:
            raise TypeError(
                "attention_backend='npu' runs in float16/bfloat16 only; load the model with "
                "torch_dtype=torch.float16 or set CHATGLM_ATTENTION=sdpa"
            )
    if rmsnorm == "npu":
        _require_torch_npu("rmsnorm_backend='npu'")
    if rmsnorm == "fused" and not _HAS_F_RMS_NORM:
        raise RuntimeError(
            f"rmsnorm_backend='fused' needs torch.nn.functional.rms_norm (torch >= 2.4; this is "
            f"torch {torch.__version__}); upgrade torch or set CHATGLM_RMSNORM=math"
        )
    writer = "index_copy"
    if attention == "npu":
        writer = "npu"
        if limits["cache_writer"]:
            fallbacks.append(
                f"static KV cache: index_copy_ instead of scatter_update_ ({limits['cache_writer']})"
            )
            writer = "index_copy"
    quant = "none"
    if bits:
        quant = resolve_quant_kernel(
            options.quant_kernel,
            device if isinstance(device, torch.device) else torch.device(kind),
            dtype,
            bits,
            grouped,
        )
        if options.quant_kernel == "auto" and quant == "math" and kind in QUANT_KERNELS:
            fallbacks.append(
                f"quant_kernel: math instead of {kind} (no {bits}-bit {kind} kernel for {dtype})"
            )
    linear = options.linear_backend
    if linear == "auto":
        linear = _auto_linear(kind, dtype)
    if linear in ("gemv", "dot") and kind != "cpu":
        raise ValueError(
            f"linear_backend={linear!r} is a CPU kernel (the model is on {kind}); set CHATGLM_LINEAR=aten (or auto)"
        )
    if linear == "dot" and _NativeDot.load() is None:
        raise ValueError(_native_dot_error("linear_backend", "dot"))
    if quant == "cpu_dot":
        _check_dot_settings()
    for note in fallbacks:
        logger.warning(note)
    compile_settings = None
    if options.exe_mode == "dynamo":
        compile_settings = MappingProxyType(
            {phase: compile_kwargs(options, kind, phase) for phase in ("prefill", "decode")}
        )
    return Backends(
        device=kind,
        attention=attention,
        rmsnorm=rmsnorm,
        kv_cache=options.cache_kind,
        cache_writer=writer,
        quant_kernel=quant,
        linear=linear,
        compile=compile_settings,
        fallbacks=tuple(fallbacks),
        attend=ATTENTION_BACKENDS[attention],
        normalize=RMSNORM_BACKENDS[rmsnorm],
        write=CACHE_WRITERS[writer],
        # On a CPU whose half GEMMs are slower than its fp32 ones the dot kernel's prefill runs
        # fp32 GEMMs (chosen here, outside any compiled region).
        project=_linear_dot_fp32_prefill
        if linear == "dot" and kind == "cpu" and not _cpu_half_prefill()
        else LINEAR_BACKENDS[linear],
    )


# ---------------------------------------------------------------------------------------------
# Rotary embedding (ChatGLM rotates the first half of each head, in interleaved pairs).
# ---------------------------------------------------------------------------------------------


def rotate_pairs(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, s, heads, d] on its first rot dims by ``factors`` [b, s, rot/2, 2, 2]
    (``[..., 0, :]`` = (cos, cos), ``[..., 1, :]`` = (-sin, sin); GLMTransformer.forward makes
    them from the rotary table once per forward): each pair (x0, x1) becomes (x0 cos - x1 sin,
    x1 cos + x0 sin), computed as pair * (cos, cos) + swapped pair * (-sin, sin). Every product
    and sum is rounded to x's dtype exactly as the original's four products and two sums are
    (negation is exact), in three arithmetic ops and a flip where the written-out form takes
    six, eight selects and a stack; the query and key heads of a layer go through one call (an eager decode step of the
    4-layer small model ran ~400 ATen ops, 160 of them rotary)."""
    b, s, heads, _ = x.shape
    half = factors.shape[-3]
    pairs = x[..., : 2 * half].reshape(b, s, heads, half, 2)
    factors = factors.unsqueeze(2)  # [b, s, 1, rot/2, 2, 2]: the same for every head
    rotated = pairs * factors[..., 0, :] + pairs.flip(-1) * factors[..., 1, :]
    return torch.cat((rotated.flatten(3), x[..., 2 * half :]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary table over all ``seq_length`` positions, base ``10000 * rope_ratio``."""

    def __init__(self, dim, rope_ratio=1, original_impl=False, device=None, dtype=None):
        super().__init__()
        # Saved in the checkpoints (never read in forward; kept so loading reports no stray keys).
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).to(dtype=dtype) / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.dim = dim
        self.original_impl = original_impl
        self.rope_ratio = rope_ratio

    @torch.no_grad()
    def reset_inv_freq(self) -> None:
        buffer = self.inv_freq
        if buffer.device.type != "meta":
            positions = torch.arange(0, self.dim, 2, device=buffer.device).float()
            buffer.copy_(1.0 / (10000 ** (positions / self.dim)))

    def forward_impl(self, seq_len: int, n_elem: int, dtype, device, base: int = 10000):
        base = base * self.rope_ratio
        theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float, device=device) / n_elem))
        positions = torch.arange(seq_len, dtype=torch.float, device=device)
        angles = torch.outer(positions, theta).float()
        table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # [seq, n_elem/2, 2]
        # The original rounds the table to the model's half dtype; same numbers, same rounding.
        if dtype in (torch.float16, torch.bfloat16, torch.int8):
            table = table.bfloat16() if dtype == torch.bfloat16 else table.half()
        return table

    def forward(self, max_seq_len, offset=0):
        return self.forward_impl(
            max_seq_len, self.dim, dtype=self.inv_freq.dtype, device=self.inv_freq.device
        )


# ---------------------------------------------------------------------------------------------
# Modules in call order (names and parameters exactly as in the original checkpoints).
# ---------------------------------------------------------------------------------------------


def _config_dtype(config) -> Optional[torch.dtype]:
    """The checkpoint's dtype from ``config.torch_dtype`` (``config.dtype`` in transformers 5)."""
    for name in ("dtype", "torch_dtype"):
        value = config.__dict__.get(name)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype):
            return value
    return None


def _config_to_kwargs(config):
    dtype = _config_dtype(config)
    return {} if dtype is None else {"dtype": dtype}


class Embedding(nn.Module):
    """Word embeddings, ``[batch, seq] -> [seq, batch, hidden]`` like the original, or
    ``[batch, seq, hidden]`` (our internal layout, no copy) with ``batch_first=True``."""

    def __init__(self, config, device=None):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.word_embeddings = nn.Embedding(
            config.padded_vocab_size, self.hidden_size, device=device, **_config_to_kwargs(config)
        )
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids, batch_first: bool = False):
        embeddings = self.word_embeddings(input_ids)
        if not batch_first:
            embeddings = embeddings.transpose(0, 1).contiguous()
        return embeddings.float() if self.fp32_residual_connection else embeddings


class RMSNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, device=None, dtype=None, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor, kernel: Callable = _rmsnorm_math):
        """``kernel``: the model's ``backends.normalize`` (the original's arithmetic by default)."""
        return kernel(hidden_states, (hidden_states.shape[-1],), self.weight, self.eps)


class _LayerNorm(LayerNorm):
    """LayerNorm for configs with ``rmsnorm=False``; takes (and ignores) RMSNorm's kernel."""

    def forward(self, hidden_states: torch.Tensor, kernel: Optional[Callable] = None):
        return super().forward(hidden_states)


class CoreAttention(nn.Module):
    """Softmax attention through the kernel the model's backends chose for the device."""

    def __init__(self, config, layer_number):
        super().__init__()
        self.apply_query_key_layer_scaling = config.apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = config.attention_softmax_in_fp32
        if self.apply_query_key_layer_scaling:
            self.attention_softmax_in_fp32 = True
        self.layer_number = max(1, layer_number)
        # The original's attributes, kept for code (and DeepSpeed's update_mp_params) that reads or
        # rewrites them; forward derives sizes from the tensors. Attention dropout is not applied
        # (every released config sets attention_dropout = 0.0).
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = projection_size
        self.hidden_size_per_attention_head = projection_size // config.num_attention_heads
        self.num_attention_heads_per_partition = config.num_attention_heads
        coeff = self.layer_number if self.apply_query_key_layer_scaling else None
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head) * (coeff or 1)
        self.coeff = coeff
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def forward(self, query_layer, key_layer, value_layer, keep, kernel: Callable = _attention_math):
        # q [b, heads, sq, d]; k, v [b, kv_heads, sk, d]; keep [b, 1, sq, sk] (True = attend) or
        # CAUSAL; kernel: the model's backends.attend -> context [b, sq, heads * d]
        context = kernel(query_layer, key_layer, value_layer, keep)
        b, heads, sq, d = context.shape
        return context.transpose(1, 2).reshape(b, sq, heads * d)


class SelfAttention(nn.Module):
    """Fused QKV projection, rotary embedding, KV cache update, attention, output projection."""

    def __init__(self, config, layer_number, device=None):
        super().__init__()
        self.layer_number = max(1, layer_number)
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_attention_head = self.projection_size // config.num_attention_heads
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.multi_query_attention = config.multi_query_attention
        self.qkv_hidden_size = 3 * self.projection_size
        self.num_multi_query_groups_per_partition = config.num_attention_heads
        if self.multi_query_attention:
            self.num_multi_query_groups_per_partition = config.multi_query_group_num
            self.qkv_hidden_size = (
                self.projection_size + 2 * self.hidden_size_per_attention_head * config.multi_query_group_num
            )
        self.query_key_value = nn.Linear(
            config.hidden_size,
            self.qkv_hidden_size,
            bias=config.add_bias_linear or config.add_qkv_bias,
            device=device,
            **_config_to_kwargs(config),
        )
        self.core_attention = CoreAttention(config, self.layer_number)
        self.dense = nn.Linear(
            self.projection_size,
            config.hidden_size,
            bias=config.add_bias_linear,
            device=device,
            **_config_to_kwargs(config),
        )

    def forward(self, hidden_states, rotary_pos_emb, step: "_Step"):
        """``hidden_states`` [b, s, h]; ``rotary_pos_emb`` [b, s, rot/2, 2, 2] (the factors of
        :func:`rotate_pairs`); ``step.cache`` stores the new K/V and returns everything to attend
        to under ``step.keep``."""
        b, s, _ = hidden_states.shape
        d = self.hidden_size_per_attention_head
        heads = self.num_attention_heads_per_partition
        groups = self.num_multi_query_groups_per_partition
        project = step.backends.project
        mixed = project(self.query_key_value, hidden_states)
        query_key = mixed[..., : (heads + groups) * d].view(b, s, heads + groups, d)
        if rotary_pos_emb is not None:
            query_key = rotate_pairs(query_key, rotary_pos_emb)
        query, key = query_key[:, :, :heads], query_key[:, :, heads:]
        value = mixed[..., (heads + groups) * d :].view(b, s, groups, d)
        query = query.transpose(1, 2)  # [b, heads, s, d]
        key, value = key.transpose(1, 2), value.transpose(1, 2)  # [b, groups, s, d]
        key, value = step.cache.update(self.layer_number - 1, key, value)
        context = self.core_attention(query, key, value, step.keep, step.backends.attend)
        return project(self.dense, context)

    @torch.no_grad()
    def replicate_kv_groups(self, groups: int) -> None:
        """Give this layer ``groups`` KV groups, each a copy of the group its query heads read,
        so the layer computes exactly the same function (the tensor-parallel contract: with
        more ranks than KV groups every rank still owns whole groups).

        New group ``j`` copies old group ``j // (groups // old)``; query head ``h`` reads new
        group ``h // (heads // groups)``, which is the old group ``h // (heads // old)`` it read
        before. Call on the unsharded layer."""
        old, heads = self.num_multi_query_groups_per_partition, self.num_attention_heads_per_partition
        if groups % old or heads % groups:
            raise ValueError(f"cannot turn {old} KV groups into {groups} for {heads} query heads")
        repeat, d = groups // old, self.hidden_size_per_attention_head
        linear = self.query_key_value
        for name in ("weight", "bias"):
            param = getattr(linear, name)
            if param is None:
                continue
            q, k, v = param.split([heads * d, old * d, old * d], dim=0)
            k, v = (t.unflatten(0, (old, d)).repeat_interleave(repeat, dim=0).flatten(0, 1) for t in (k, v))
            setattr(linear, name, nn.Parameter(torch.cat([q, k, v]), requires_grad=param.requires_grad))
        linear.out_features = linear.weight.shape[0]
        self.num_multi_query_groups_per_partition = groups
        self.qkv_hidden_size = linear.out_features


class MLP(nn.Module):
    """SwiGLU: h -> 2 * ffn (gate, up) -> silu(gate) * up -> h."""

    def __init__(self, config, device=None):
        super().__init__()
        self.add_bias = config.add_bias_linear
        self.dense_h_to_4h = nn.Linear(
            config.hidden_size,
            config.ffn_hidden_size * 2,
            bias=self.add_bias,
            device=device,
            **_config_to_kwargs(config),
        )
        self.dense_4h_to_h = nn.Linear(
            config.ffn_hidden_size,
            config.hidden_size,
            bias=self.add_bias,
            device=device,
            **_config_to_kwargs(config),
        )

    def forward(self, hidden_states, project: Callable = nn.Module.__call__):
        """``project(linear, x)`` runs each projection (the resolved linear backend)."""
        gate, up = project(self.dense_h_to_4h, hidden_states).chunk(2, dim=-1)
        return project(self.dense_4h_to_h, F.silu(gate) * up)


class GLMBlock(nn.Module):
    """Pre-norm transformer layer: RMSNorm -> attention -> residual -> RMSNorm -> MLP -> residual."""

    def __init__(self, config, layer_number, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        norm_class = RMSNorm if config.rmsnorm else _LayerNorm
        self.input_layernorm = norm_class(
            config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=_config_dtype(config)
        )
        self.self_attention = SelfAttention(config, layer_number, device=device)
        self.hidden_dropout = config.hidden_dropout
        self.post_attention_layernorm = norm_class(
            config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=_config_dtype(config)
        )
        self.mlp = MLP(config, device=device)

    def forward(self, hidden_states, rotary_pos_emb, step: "_Step"):
        normed = self.input_layernorm(hidden_states, step.backends.normalize)
        attention_output = self.self_attention(normed, rotary_pos_emb, step)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden_states = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states, step.backends.normalize)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        mlp_output = self.mlp(normed, step.backends.project)
        return residual + F.dropout(mlp_output, p=self.hidden_dropout, training=self.training)


class GLMTransformer(nn.Module):
    """The stack of ``GLMBlock`` layers plus the final RMSNorm."""

    def __init__(self, config, device=None):
        super().__init__()
        self.post_layer_norm = config.post_layer_norm
        self.num_layers = config.num_layers
        self.layers = nn.ModuleList([GLMBlock(config, i + 1, device=device) for i in range(self.num_layers)])
        if self.post_layer_norm:
            norm_class = RMSNorm if config.rmsnorm else _LayerNorm
            self.final_layernorm = norm_class(
                config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=_config_dtype(config)
            )
        self.gradient_checkpointing = False

    def _get_layer(self, layer_number):
        return self.layers[layer_number]

    def forward(self, hidden_states, rotary_pos_emb, step: "_Step", output_hidden_states: bool = False):
        """``hidden_states`` [b, s, h] -> (hidden [b, s, h], every layer's input + the output, or None).
        ``rotary_pos_emb`` [b, s, rot/2, 2] (cos, sin): the layers get each pair's factors
        (:func:`rotate_pairs`), made once here, in the compiled region: as the compiled function's
        input their [.., 2, 2] strides met a chunk's storage offset by duck sizing and recompiled."""
        all_hidden_states = () if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training
        if rotary_pos_emb is not None:
            cos, sin = rotary_pos_emb[..., :1], rotary_pos_emb[..., 1:]
            rotary_pos_emb = torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), -2)
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if checkpointing:
                hidden_states = torch.utils.checkpoint.checkpoint(
                    layer, hidden_states, rotary_pos_emb, step, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, rotary_pos_emb, step)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if self.post_layer_norm:
            hidden_states = self.final_layernorm(hidden_states, step.backends.normalize)
        return hidden_states, all_hidden_states


def _mark_fresh(module: nn.Module) -> None:
    """Mark a module whose weights no released checkpoint carries (a new P-tuning prefix, a new
    classification head): ``_init_weights`` gives it torch's default initialisation, so it is
    the same on every transformers version (5.x builds modules on the meta device and leaves
    anything ``_init_weights`` skips as uninitialised memory)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            sub._chatglm_fresh = True


class PrefixEncoder(nn.Module):
    """P-tuning v2 prefix: ``[batch, pre_seq_len] -> [batch, pre_seq_len, layers * 2 * kv_heads * d]``."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * config.kv_channels * config.multi_query_group_num * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if self.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, kv_size),
            )
        _mark_fresh(self)

    def forward(self, prefix: torch.Tensor):
        past = self.embedding(prefix)
        return self.trans(past) if self.prefix_projection else past


# ---------------------------------------------------------------------------------------------
# KV caches and the step. A forward opens the cache (ChatGLMModel.open_cache, the one place
# that tells the legacy tuple, a transformers Cache and the static cache apart), ``begin``s a
# step (the keep-mask, built once, outside the compiled region), every attention layer calls
# ``update(layer, k, v) -> (k_all, v_all)`` (BNSD ``[b, kv_heads, seq, d]``), and ``end()``
# returns the public past_key_values.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Step:
    """What every layer of one forward reads: the cache, the keep-mask, the backends."""

    cache: Any  # TupleKVCache or StaticKVCache: update(layer, k, v)
    keep: Any  # bool [b, 1, s, kv], True = attend, or CAUSAL, or a PaddedChunk
    backends: Backends
    decode: bool  # one new token per row after a past


def _prompt_keep(slots, attention_mask):
    """The keep-mask of a prompt without past: CAUSAL unless it is padded (the one
    device-to-host sync of a generation, once per prompt)."""
    if attention_mask is None:
        return CAUSAL
    mask = attention_mask.bool()
    if bool(mask.all()):
        return CAUSAL
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "attention_mask is right-padded (a 0 after a 1); ChatGLM needs left padding: "
            "set tokenizer.padding_side = 'left' (the default of our tokenizer)"
        )
    return attention_keep_mask(slots, mask, mask)


@dataclass
class TupleKVCache:
    """The original's growing cache during one forward: ``layers`` is the legacy past (a tuple
    over layers of ``(k, v)``, each ``[seq, batch, kv_heads, d]``, or None per layer), extended
    by concatenation; ``end()`` returns it in exactly the original's format."""

    layers: list
    seq_len: int = 0
    new: int = 0  # tokens the current step writes

    def begin(self, slots, attention_mask, backends, full_attention_mask=None) -> _Step:
        """Start a forward writing ``slots`` [s] (past + 0 .. past + s - 1)."""
        new = self.new = slots.shape[0]
        if self.seq_len == 0:
            keep = _prompt_keep(slots, attention_mask)
        elif attention_mask is None:
            keep = CAUSAL
        elif new == 1:
            keep = attention_mask.bool()[:, None, None, :]
        else:
            mask = attention_mask.bool()
            keep = PaddedChunk(mask, slots, mask[:, -new:])
        if full_attention_mask is not None:  # the original's form, True = masked
            keep = ~full_attention_mask
        return _Step(self, keep, backends, new == 1 and self.seq_len > 0)

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        key, value = key.permute(2, 0, 1, 3), value.permute(2, 0, 1, 3)  # [s, b, g, d]
        past = self.layers[layer]
        if past is not None:
            key, value = torch.cat((past[0], key), dim=0), torch.cat((past[1], value), dim=0)
        self.layers[layer] = (key, value)
        return key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)

    def end(self):
        return tuple(self.layers)

    def resume(self) -> "TupleKVCache":
        """The cache after this step, to begin the next chunk of the same prompt (contiguous, as
        every later chunk's concatenation is: one chunk graph serves them all)."""
        layers = [(k.contiguous(), v.contiguous()) for k, v in self.layers]
        return TupleKVCache(layers, self.seq_len + self.new)


class StaticKVCache:
    """Preallocated per-layer K/V buffers ``[batch, kv_heads, max_len, head_dim]``, written in place.

    Every decode step sees the same shapes, so graph mode captures one decode graph per (batch,
    ``max_len``); the model keeps the buffers between generations and sizes them in buckets
    (``ChatGLMModel.static_cache_len``). ``key_keep`` ``[batch, max_len]`` is the cache's own
    mask buffer: True = the slot holds a real token (written, not padding), so a decode step's
    keep-mask is a view of it. Indexing (``cache[layer]``) returns the original's legacy
    ``(k, v)`` views ``[seq, batch, kv_heads, d]`` of the filled part, so code written against
    the tuple cache keeps working.

    Each forward returns a new ``StaticKVCache`` over the same buffers. Because the buffers are
    written in place, only the newest one may be continued: continuing an older one (branching
    two continuations from one past) is refused instead of silently reading overwritten slots.
    """

    def __init__(self, num_layers, batch_size, kv_heads, max_len, head_dim, dtype, device, writer=None):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_keep = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.batch_size, self.max_len = batch_size, max_len
        self.writer = writer or torch.Tensor.index_copy_
        self.seq_len = 0
        self.slots = None  # the slots the current forward writes
        # A prompt with no past attends to its own fresh K/V only (sparing a full-length
        # attention); any later step attends to the whole buffer.
        self.attend_buffer = False
        self.attend_len = max_len  # how much of the buffer a step attends to (a prompt chunk: less)
        self._buffers = types.SimpleNamespace(newest=self)  # shared by every view of the buffers
        for buffer in self.keys + self.values + [self.key_keep]:
            _mark_static_address(buffer)

    def view(self, seq_len: int) -> "StaticKVCache":
        """The cache over the same buffers holding ``seq_len`` positions, now the newest."""
        view = copy.copy(self)
        view.seq_len = seq_len
        self._buffers.newest = view
        return view

    def is_newest(self) -> bool:
        return self._buffers.newest is self

    def begin(self, slots, attention_mask, backends, full_attention_mask=None) -> _Step:
        """Start a forward writing ``slots`` [s]; fold ``attention_mask`` [b, past + s] (or, with
        none, "every new token is real") into the mask buffer."""
        past, new = self.seq_len, slots.shape[0]
        total = past + new
        self._buffers.newest = self
        self.slots = slots
        self.attend_buffer = past > 0
        self.attend_len = self.max_len
        if past == 0:
            keep = _prompt_keep(slots, attention_mask)
            self.key_keep.fill_(False)
        if attention_mask is not None:
            self.key_keep[:, :total].copy_(attention_mask)
        else:
            self.key_keep[:, past:total] = True
        if past:
            # Slots past the end may hold an abandoned (use_cache=False) forward's K/V.
            self.key_keep[:, total:] = False
            if new == 1:
                keep = self.key_keep[:, None, None, :]
            elif attention_mask is None and bool(self.key_keep[:, :past].all()):
                # Several new tokens after an unpadded past (a prompt chunk): causal over the
                # filled part of the buffer, no mask (the one sync is on the prompt path).
                keep, self.attend_len = CAUSAL, total
            else:  # several new tokens after a padded past (e.g. a later chunk of a padded prompt)
                query_keep = self.key_keep[:, past:total]
                keep, self.attend_len = PaddedChunk(self.key_keep[:, :total], slots, query_keep), total
        if full_attention_mask is not None:
            # The original's form (True = masked) over past + new positions; over the buffer
            # the unwritten slots beyond them stay hidden.
            keep = ~full_attention_mask
            if past:
                keep = F.pad(keep, (0, self.max_len - keep.shape[-1]), value=False)
        return _Step(self, keep, backends, new == 1 and past > 0)

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Write ``key``/``value`` ``[b, g, s, d]`` at this step's slots; return what the layer
        attends to: the whole buffers, or the fresh K/V for a prompt without past."""
        self.writer(self.keys[layer], 2, self.slots, key)
        self.writer(self.values[layer], 2, self.slots, value)
        if self.attend_buffer:
            length = self.attend_len
            if length == self.max_len:
                return self.keys[layer], self.values[layer]
            return self.keys[layer][:, :, :length], self.values[layer][:, :, :length]
        return key, value

    def end(self) -> "StaticKVCache":
        """The newest view, holding this step's positions too (``view`` spelled out: this runs
        every decode step)."""
        view = copy.copy(self)
        view.seq_len = self.seq_len + self.slots.shape[0]
        self._buffers.newest = view
        return view

    resume = end  # the next chunk of a prompt continues the newest view

    def matches(
        self, layers: int, batch_size: int, kv_heads: int, head_dim: int, dtype, device, writer
    ) -> bool:
        """Whether these buffers can hold another sequence of this shape (any capacity)."""
        b, g, _, d = self.keys[0].shape
        key = self.keys[0]
        mine = (len(self.keys), b, g, d, key.dtype, key.device, self.writer)
        return mine == (layers, batch_size, kv_heads, head_dim, dtype, device, writer)

    def copy_from_legacy(self, legacy) -> "StaticKVCache":
        """This cache holding a legacy tuple cache's positions (``[seq, batch, kv_heads, d]``)."""
        length = legacy[0][0].shape[0]
        for layer, (key, value) in enumerate(legacy):
            self.keys[layer][:, :, :length].copy_(key.permute(1, 2, 0, 3))
            self.values[layer][:, :, :length].copy_(value.permute(1, 2, 0, 3))
        self.key_keep.fill_(False)
        self.key_keep[:, :length] = True
        return self.view(length)

    def grown(self, new_max_len: int) -> "StaticKVCache":
        bigger = StaticKVCache(
            len(self.keys),
            self.batch_size,
            self.keys[0].shape[1],
            new_max_len,
            self.keys[0].shape[3],
            self.keys[0].dtype,
            self.keys[0].device,
            self.writer,
        )
        n = self.seq_len
        for old, new in zip(self.keys + self.values, bigger.keys + bigger.values):
            new[:, :, :n].copy_(old[:, :, :n])
        bigger.key_keep[:, :n].copy_(self.key_keep[:, :n])
        return bigger.view(n)

    def reorder(self, beam_idx: torch.Tensor) -> "StaticKVCache":
        n = self.seq_len
        for buffer in self.keys + self.values:
            buffer[:, :, :n].copy_(buffer[:, :, :n].index_select(0, beam_idx.to(buffer.device)))
        self.key_keep.copy_(self.key_keep.index_select(0, beam_idx.to(self.key_keep.device)))
        return self

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int):
        n = self.seq_len
        return (
            self.keys[layer][:, :, :n].permute(2, 0, 1, 3),
            self.values[layer][:, :, :n].permute(2, 0, 1, 3),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _legacy_from_hf(past):
    """A transformers ``Cache`` object as the legacy tuple cache (None when empty)."""
    if past.get_seq_length() == 0:
        return None
    if hasattr(past, "to_legacy_cache"):
        return tuple((k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)) for k, v in past.to_legacy_cache())
    raise TypeError(
        f"past_key_values of type {type(past).__name__} is not supported by ChatGLM; pass the "
        "tuple returned in outputs.past_key_values"
    )


def _mark_length_dynamic(hidden_states, rotary_pos_emb, step: "_Step") -> None:
    """Mark the new tokens' length (and a padded prompt's mask) dynamic, so that the first
    prefill graph serves every prompt length (unmarked, dynamo specialises on the first length
    and generalises only at the second). Marking only these dims, not ``dynamic=True``, keeps a
    length that happens to equal a model size (2 KV groups, head_dim, hidden) from being fused
    with it and specialised."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(hidden_states, 1)
    mark(rotary_pos_emb, 1)
    slots = getattr(step.cache, "slots", None)
    if slots is not None:
        mark(slots, 0)
    if isinstance(step.keep, torch.Tensor):
        mark(step.keep, 2)
        mark(step.keep, 3)
    if isinstance(step.keep, PaddedChunk):
        mark(step.keep.key_keep, 1)
        mark(step.keep.slots, 0)
        mark(step.keep.query_keep, 1)
    if isinstance(step.cache, TupleKVCache):  # a chunk after a past: any past length, one graph
        for layer in step.cache.layers:
            if layer is not None:
                mark(layer[0], 0)
                mark(layer[1], 0)


# ---------------------------------------------------------------------------------------------
# Graph-mode compile settings, per phase (prefill: dynamic length; decode: static shapes).
# ---------------------------------------------------------------------------------------------


def _raise_recompile_limit() -> None:
    """Raise dynamo's per-function limit on compiled variants once, process-wide (batch sizes,
    cache lengths and model instances each add a graph; the default 8 would turn a long-running
    process into a hard error under ``fullgraph=True``). Never lowers a limit set by the user."""
    config = torch._dynamo.config
    if getattr(config, _RECOMPILE_LIMIT_NAME) < GRAPH_RECOMPILE_LIMIT:
        setattr(config, _RECOMPILE_LIMIT_NAME, GRAPH_RECOMPILE_LIMIT)


def _torchair_backend(static_decode: bool):
    _require_torch_npu("the torchair graph backend")
    torchair = _optional_import("torchair")
    if torchair is None:
        raise RuntimeError(
            "EXE_MODE=dynamo on NPU needs torchair (shipped with torch_npu); reinstall torch_npu "
            "or set CHATGLM_GRAPH_BACKEND=eager"
        )
    config = torchair.CompilerConfig()
    # Ascend's own LLM recipes (torchair's npu_tuned_model/llm samples), for every phase: weights
    # (and, on torch >= 2.6, the mark_static_address'd KV buffers) at fixed addresses, which cuts
    # per-step input dispatch.
    config.experimental_config.frozen_parameter = True
    if static_decode and hasattr(config.experimental_config, "tiling_schedule_optimize"):
        # Those recipes' decode setting: with static shapes, tiling is computed on the device
        # (AI CPU) instead of by the host before every launch (torchair versions without the
        # option skip it).
        config.experimental_config.tiling_schedule_optimize = True
    return torchair.get_npu_backend(compiler_config=config)


def compile_kwargs(options: RuntimeOptions, device, phase: str = "prefill") -> Dict[str, Any]:
    """``torch.compile`` settings of one phase ("prefill" or "decode") on ``device`` (a
    ``torch.device`` or its type name), from one place. Decode over the static cache has static
    shapes (batch, capacity); the other phases let dynamo generalise what changes (the forward
    marks the prompt length dynamic before the first prefill: see _mark_length_dynamic)."""
    kind = device if isinstance(device, str) else device.type
    static_decode = phase == "decode" and options.cache_kind == "static"
    backend = options.graph_backend
    shapes = {"dynamic": False} if static_decode else {}
    if callable(backend):
        return {"backend": backend, **shapes}
    backend = str(backend)
    if backend == "auto":
        backend = "torchair" if kind == "npu" else "inductor"
    if backend == "torchair":
        return {"backend": _torchair_backend(static_decode), **shapes}
    if backend == "inductor" and kind == "cpu":
        # Freezing folds the weights into the graph and lets inductor prepack them for oneDNN.
        return {"backend": "inductor", "options": {"freezing": True}, **shapes}
    if backend == "inductor" and kind == "cuda" and static_decode:
        # CUDA graphs: one launch replays the whole decode step (inputs at fixed addresses:
        # the parameters and the static cache, marked with mark_static_address).
        return {"backend": "inductor", "mode": "reduce-overhead", **shapes}
    return {"backend": backend, **shapes}


# ---------------------------------------------------------------------------------------------
# The transformers face: the pre-trained base, ChatGLMModel, the heads, chat helpers.
# ---------------------------------------------------------------------------------------------

# transformers 5 renamed the outputs' ``past_key_values`` field to ``cache`` (keeping a deprecated
# alias); we fill whichever field this version has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def check_checkpoint_dir(path) -> None:
    """Clear errors for the local directories users point us at (hub ids pass through)."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return
    directory = Path(path)
    if not directory.exists():
        if os.path.isabs(path) or str(path).startswith("."):
            raise FileNotFoundError(
                f"checkpoint directory {path} does not exist; pass the folder holding the "
                "downloaded chatglm3-6b files (config.json, *.safetensors or *.bin)"
            )
        return
    if not directory.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the checkpoint directory that contains it")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; pass the chatglm3-6b checkpoint directory (the one with "
            "config.json and the weight shards)"
        )
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}); re-download the checkpoint") from None
    if model_type != "chatglm":
        raise ValueError(
            f"{config_file} has model_type={model_type!r}, not 'chatglm'; this file only runs "
            "ChatGLM2/ChatGLM3 checkpoints"
        )


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Weights loading and configuration shared by the ChatGLM heads."""

    is_parallelizable = False
    supports_gradient_checkpointing = True
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Checkpoint weights are never initialised (as in the original: they are loaded). Only
        what checkpoints lack is: the derived rotary buffer, and modules marked fresh."""
        if isinstance(module, RotaryEmbedding):
            module.reset_inv_freq()
        elif getattr(module, "_chatglm_fresh", False) and module.weight.device.type != "meta":
            module.reset_parameters()

    def _set_gradient_checkpointing(self, module=None, value=False, **kwargs):
        # transformers < 4.35 passes (module, value); newer ones (enable=..., gradient_checkpointing_func=...)
        enable = kwargs.get("enable", value)
        for sub in self.modules():
            if isinstance(sub, GLMTransformer):
                sub.gradient_checkpointing = bool(enable)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # We keep our own caches (legacy tuple or StaticKVCache); generate() must not make one.
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_checkpoint_dir(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_masks(self, input_ids, past_key_values, padding_mask=None):
        """The original's mask, bool ``[b, 1, seq, past + seq]`` with True = masked (kept for code
        that calls it; the model itself uses :func:`attention_keep_mask`)."""
        batch, seq = input_ids.shape
        past_len = 0 if past_key_values is None else len(past_key_values[0][0])
        mask = torch.ones(batch, seq, seq, device=input_ids.device).tril_()
        if past_len:
            mask = torch.cat((torch.ones(batch, seq, past_len, device=input_ids.device), mask), dim=-1)
        if padding_mask is not None:
            mask = mask * padding_mask.unsqueeze(1)
            if not past_len:
                mask -= padding_mask.unsqueeze(-1) - 1
        return (mask < 0.5).bool().unsqueeze(1)

    def get_position_ids(self, input_ids, device):
        batch_size, seq_length = input_ids.shape
        return torch.arange(seq_length, dtype=torch.long, device=device).unsqueeze(0).repeat(batch_size, 1)


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The ChatGLM transformer (embedding, layers, final norm) with the output projection attached."""

    def __init__(self, config, device=None, empty_init=True):
        super().__init__(config)
        check_config(config)
        build_device = torch.device("meta") if empty_init and device is None else device
        with torch.device(build_device) if build_device is not None else contextlib.nullcontext():
            self.embedding = Embedding(config)
            self.num_layers = config.num_layers
            self.multi_query_group_num = config.multi_query_group_num
            self.kv_channels = config.kv_channels
            self.seq_length = config.seq_length
            rotary_dim = (
                config.hidden_size // config.num_attention_heads
                if config.kv_channels is None
                else config.kv_channels
            )
            self.rotary_pos_emb = RotaryEmbedding(
                rotary_dim // 2,
                rope_ratio=getattr(config, "rope_ratio", 1),
                original_impl=getattr(config, "original_rope", True),
                dtype=_config_dtype(config),
            )
            self.encoder = GLMTransformer(config)
            self.output_layer = nn.Linear(
                config.hidden_size, config.padded_vocab_size, bias=False, **_config_to_kwargs(config)
            )
        # Like the original's skip_init: allocate without initialising. Inside an ambient meta
        # context (transformers' empty-weight loading) stay on meta: the loader fills the weights.
        if build_device is not None and build_device.type == "meta" and torch.empty(()).device.type != "meta":
            self.to_empty(device="cpu")
            self.rotary_pos_emb.reset_inv_freq()
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        if self.pre_seq_len is not None:
            for param in self.parameters():
                param.requires_grad = False
            self.prefix_encoder = PrefixEncoder(config)
            self.dropout = nn.Dropout(0.1)
        self.options = RuntimeOptions.from_config(config)
        # The static cache's smallest capacity bucket (None: STATIC_CACHE_MIN_LEN); its buffers
        # (_kv_store) stay with the instance between generations and grow by bucket.
        self.static_cache_len: Optional[int] = None
        self._kv_store: Optional[StaticKVCache] = None
        self._reserve: Optional[int] = None  # positions the running generate() will reach
        self._backend_key = None  # (device, dtype) that _backends, _rope and _phases serve
        self._backends: Optional[Backends] = None
        self._phases: Dict[str, Callable] = {}
        self._graphs: Dict[str, Callable] = {}  # the compiled phases (graph mode only)
        self._rope = None

    @property
    def prefix_tokens(self) -> torch.Tensor:
        # Made where it is used: a tensor built in __init__ would be a meta tensor under
        # transformers 5's empty-weight init, which no loader fills.
        return torch.arange(self.pre_seq_len, device=self.prefix_encoder.embedding.weight.device)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_prompt(self, batch_size, device, dtype=torch.half):
        prefix_tokens = self.prefix_tokens.unsqueeze(0).expand(batch_size, -1).to(device)
        past_key_values = self.prefix_encoder(prefix_tokens).type(dtype)
        past_key_values = past_key_values.view(
            batch_size, self.pre_seq_len, self.num_layers * 2, self.multi_query_group_num, self.kv_channels
        )
        past_key_values = self.dropout(past_key_values)
        return past_key_values.permute([2, 1, 0, 3, 4]).split(2)

    # --- backends, graphs and the static cache's capacity: state of this instance -----------

    def set_runtime_options(self, **changes) -> None:
        """Change fast-path switches of a built model (e.g. ``exe_mode="dynamo"``) for ablations.

        Takes the config field names; validates like the config; leaves ``self.config`` (and so
        what ``save_pretrained`` writes) untouched; drops compiled graphs, the static cache and
        the resolved backends."""
        fields = RuntimeOptions.__dataclass_fields__
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValueError(f"unknown runtime option(s) {unknown}; use: {', '.join(fields)}")
        merged = types.SimpleNamespace(**{**vars(self.options), **changes})
        self.options = RuntimeOptions.from_config(merged)
        self._backend_key = None
        self._graphs = {}
        self._kv_store = None

    @property
    def backends(self) -> Backends:
        """What runs this model on its weights' device and dtype (resolved now if not yet)."""
        weight = self.embedding.word_embeddings.weight
        if self._backend_key != (weight.device, weight.dtype):
            self._resolve(weight.device, weight.dtype)
        return self._backends

    def _resolve(self, device: torch.device, dtype: torch.dtype) -> Backends:
        """Resolve the backends for ``device``/``dtype`` and set up what depends on them: the
        quantized layers' kernels, the rotary table, the phase functions (compiled in graph
        mode: one per phase and instance, each with its phase's settings)."""
        bits = self.config.quantization_bit or 0
        grouped = bits == 8 and bool(getattr(self.config, "quantization_int8_group_size", 0))  # int8 only
        backends = resolve_backends(self.options, device, dtype, bits=bits, grouped=grouped)
        if device.type == "cpu" and self.options.cpu_weights != "mapped":
            moved = move_weights_off_files(self, self.options.huge_pages != "off")
            if moved:
                logger.info(f"copied {moved / 2**30:.2f} GiB of weights out of the checkpoint's file mapping")
        for module in self.modules():
            if isinstance(module, QuantizedLinear):
                module.int4_dequant = self.options.int4_dequant
                # The model's option, resolved for the layer's own bits and scales (auto differs).
                kernel = resolve_quant_kernel(
                    self.options.quant_kernel, device, dtype, module.bits, module.weight_scale.dim() == 2
                )
                module.select_kernel(device, dtype, kernel)
        self._rope = self.rotary_pos_emb(self.seq_length)
        self._phases = {"prefill": self.prefill, "decode": self.decode_one_token}
        self._graphs = {}
        if backends.compile is not None:
            _raise_recompile_limit()
            self._graphs = {
                phase: torch.compile(fn, fullgraph=True, **backends.compile[phase])
                for phase, fn in self._phases.items()
            }
            self._phases = self._graphs
        self._backends, self._backend_key = backends, (device, dtype)
        return backends

    def _capacity(self, needed: int) -> int:
        """The static cache's capacity bucket for ``needed`` positions: ``static_cache_len``
        (default 256) doubled until it holds them, at most ``seq_length``."""
        capacity = self.static_cache_len or STATIC_CACHE_MIN_LEN
        while capacity < needed:
            capacity *= 2
        return min(capacity, self.seq_length)

    def open_cache(self, past, batch_size: int, new_tokens: int, dtype, device, use_cache: bool):
        """The cache a forward of ``new_tokens`` per row continues: the only place that tells the
        legacy tuple, a transformers ``Cache`` and a :class:`StaticKVCache` apart."""
        if past is not None and not isinstance(past, (tuple, list, StaticKVCache)):
            past = _legacy_from_hf(past)
        if isinstance(past, StaticKVCache):
            if past._buffers.newest is not past:
                raise ValueError(
                    f"this static KV cache holds {past.seq_len} positions but its buffers were already "
                    "advanced by another call (static caches are written in place); continue from the "
                    "newest past_key_values, or use kv_cache='tuple' to branch several continuations "
                    "from one past"
                )
            if past.seq_len + new_tokens > past.max_len:
                past = self._kv_store = past.grown(self._capacity(past.seq_len + new_tokens))
            return past
        past_len = 0 if past is None else len(past[0][0])
        if self._backends.kv_cache != "static" or not use_cache:
            return TupleKVCache(list(past) if past is not None else [None] * self.num_layers, past_len)
        needed = min(max(past_len + new_tokens, self._reserve or 0), self.seq_length)
        attention = self.encoder.layers[0].self_attention
        shape = (
            self.num_layers,
            batch_size,
            attention.num_multi_query_groups_per_partition,
            attention.hidden_size_per_attention_head,
        )
        store, writer = self._kv_store, self._backends.write
        if store is None or not store.matches(*shape, dtype, device, writer) or store.max_len < needed:
            self._kv_store = store = None  # frees the old buffers before allocating new ones
            layers, batch, kv_heads, head_dim = shape
            capacity = self._capacity(needed)
            store = StaticKVCache(layers, batch, kv_heads, capacity, head_dim, dtype, device, writer)
            self._kv_store = store
        return store.copy_from_legacy(past) if past is not None else store.view(0)

    # --- the two phases (the compiled regions: pure tensor math) ---------------------------

    def prefill(self, hidden_states, rotary_pos_emb, step: "_Step", output_hidden_states: bool = False):
        """A prompt (or a chunk after a past), ``hidden_states`` [b, s, h], through every layer,
        writing its K/V. Compiled with a dynamic length: one graph serves every prompt length."""
        return self.encoder(hidden_states, rotary_pos_emb, step, output_hidden_states)

    def decode_one_token(self, hidden_states, rotary_pos_emb, step: "_Step"):
        """One new token per row, ``hidden_states`` [b, 1, h], after a past. Over the static cache
        every shape is fixed by (batch, capacity), so one graph is replayed every step."""
        hidden_states, _ = self.encoder(hidden_states, rotary_pos_emb, step)
        return hidden_states

    def forward(
        self,
        input_ids=None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.BoolTensor] = None,
        full_attention_mask: Optional[torch.BoolTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        """Embed -> open the cache -> begin the step -> prefill or decode_one_token -> end."""
        output_hidden_states = bool(
            output_hidden_states
            if output_hidden_states is not None
            else getattr(self.config, "output_hidden_states", False)
        )
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        decode_shaped = past_key_values is not None and input_ids is not None and input_ids.dim() == 2
        if not (decode_shaped and input_ids.shape[1] == 1):  # a decode step: _check_lengths only
            self._check_inputs(input_ids, inputs_embeds, position_ids, attention_mask, past_key_values)

        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            hidden_states = self.embedding(input_ids, batch_first=True)  # [b, s, h]
        else:
            hidden_states = inputs_embeds.transpose(0, 1)  # public layout is [s, b, h]
        batch_size, seq_length = hidden_states.shape[:2]
        device, dtype = hidden_states.device, hidden_states.dtype
        backends = self._backends if self._backend_key == (device, dtype) else self._resolve(device, dtype)
        if self.pre_seq_len is not None:
            if past_key_values is None:
                past_key_values = self.get_prompt(batch_size, device, dtype)
            if attention_mask is not None:
                attention_mask = torch.cat(
                    [attention_mask.new_ones((batch_size, self.pre_seq_len)), attention_mask], dim=-1
                )

        cache = self.open_cache(past_key_values, batch_size, seq_length, dtype, device, use_cache)
        past_len = cache.seq_len
        self._check_lengths(batch_size, seq_length, past_len, attention_mask, position_ids)
        if position_ids is None:
            offset = past_len - (self.pre_seq_len or 0)
            position_ids = (
                torch.arange(offset, offset + seq_length, device=device).unsqueeze(0).expand(batch_size, -1)
            )
        # Gathered here, not in the graph: a fresh tensor, so the decode graph never guards on
        # the strides of the caller's position_ids (a slice of a growing tensor in generate()).
        rotary_pos_emb = self._rope[position_ids]  # [b, s, rot/2, 2]
        chunk = self.options.prefill_chunk
        if chunk and seq_length > chunk and full_attention_mask is None and not self.training:
            hidden_states, all_hidden_states, cache = self._prefill_chunks(
                hidden_states, rotary_pos_emb, cache, attention_mask, chunk, output_hidden_states
            )
        else:
            slots = torch.arange(past_len, past_len + seq_length, device=device)
            step = cache.begin(slots, attention_mask, backends, full_attention_mask)
            all_hidden_states = None
            if step.decode and not output_hidden_states:
                hidden_states = self._phases["decode"](hidden_states, rotary_pos_emb, step)
            else:
                if self._graphs:
                    _mark_length_dynamic(hidden_states, rotary_pos_emb, step)
                hidden_states, all_hidden_states = self._phases["prefill"](
                    hidden_states, rotary_pos_emb, step, output_hidden_states
                )

        presents = cache.end() if use_cache else None
        hidden_states = hidden_states.transpose(0, 1)  # public layout [s, b, h]
        if all_hidden_states is not None:
            all_hidden_states = tuple(h.transpose(0, 1) for h in all_hidden_states)
        if not return_dict:
            return tuple(v for v in [hidden_states, presents, all_hidden_states, None] if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=None,
            **{_CACHE_FIELD: presents},
        )

    def _prefill_chunks(
        self, hidden_states, rotary_pos_emb, cache, attention_mask, chunk, output_hidden_states
    ):
        """A long prompt ``hidden_states`` [b, s, h], ``chunk`` tokens at a time through the cache:
        each chunk attends to the cache (the chunks before it) plus itself, so the result equals
        one pass while every temporary is bounded by chunk x context. Returns (hidden [b, s, h],
        every layer's input + the output or None, the cache after the last chunk)."""
        seq_length, past_len = hidden_states.shape[1], cache.seq_len
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # unpadded: every chunk is causal, with no mask at all
        output, layer_outputs = torch.empty_like(hidden_states), []
        for start in range(0, seq_length, chunk):
            stop = min(start + chunk, seq_length)
            if start:
                cache = cache.resume()
            slots = torch.arange(past_len + start, past_len + stop, device=hidden_states.device)
            mask = None if attention_mask is None else attention_mask[:, : past_len + stop]
            step = cache.begin(slots, mask, self._backends)
            part, rope = hidden_states[:, start:stop], rotary_pos_emb[:, start:stop]
            if self._graphs:
                _mark_length_dynamic(part, rope, step)
            part, all_hidden = self._phases["prefill"](part, rope, step, output_hidden_states)
            output[:, start:stop] = part
            layer_outputs.append(all_hidden)
        all_hidden_states = None
        if output_hidden_states:
            all_hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*layer_outputs))
        return output, all_hidden_states, cache

    def _check_inputs(self, input_ids, inputs_embeds, position_ids, attention_mask, past) -> None:
        """Shapes of what the caller passed (always: no sync), and on a prompt (no cache yet) the
        values: token ids inside the vocabulary, positions inside the context, no all-zero mask
        row. Decode steps skip the value checks: they would cost a device-to-host sync per token,
        and their values follow from the prompt's."""
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3:
                raise ValueError(
                    f"inputs_embeds must be [seq, batch, hidden] (3-D), got shape {tuple(inputs_embeds.shape)}"
                )
            seq_length, batch_size = inputs_embeds.shape[:2]
        elif input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must be [batch, seq] (2-D), got shape {tuple(input_ids.shape)}; "
                    "for one sequence pass input_ids[None]"
                )
            if input_ids.is_floating_point():
                raise ValueError(f"input_ids must hold integer token ids, not {input_ids.dtype}")
            batch_size, seq_length = input_ids.shape
        else:
            return  # forward says what is missing
        if seq_length == 0 or batch_size == 0:
            raise ValueError(f"the input is empty ({batch_size} rows of {seq_length} tokens)")
        if position_ids is not None and tuple(position_ids.shape) != (batch_size, seq_length):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)} but must be [batch, seq] = "
                f"[{batch_size}, {seq_length}], like input_ids"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be [batch, past + seq] (2-D, 1 = token, 0 = padding), got "
                f"shape {tuple(attention_mask.shape)}"
            )
        hf_cache = past is not None and not isinstance(past, (tuple, list, StaticKVCache))
        if past is not None and not (hf_cache and past.get_seq_length() == 0):
            return  # a decode step (or a continued prompt)
        if input_ids is not None and inputs_embeds is None:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.padded_vocab_size:
                raise ValueError(
                    f"input_ids holds token id {low if low < 0 else high} but the model's vocabulary "
                    f"has ids 0..{self.config.padded_vocab_size - 1} (padded_vocab_size); is the "
                    "tokenizer this checkpoint's?"
                )
        if position_ids is not None:
            low, high = int(position_ids.min()), int(position_ids.max())
            if low < 0 or high >= self.seq_length:
                raise ValueError(
                    f"position_ids holds {low if low < 0 else high}, outside the model's positions "
                    f"0..{self.seq_length - 1} (seq_length)"
                )
        if attention_mask is not None and attention_mask.shape[-1] == seq_length:
            empty = (~attention_mask.bool().any(dim=-1)).nonzero()
            if len(empty):
                raise ValueError(
                    f"attention_mask row {int(empty[0, 0])} is all zeros (a prompt with no tokens, only "
                    "padding); drop that row or give it at least one token"
                )

    def _check_lengths(self, batch_size, seq_length, past_len, attention_mask, position_ids=None) -> None:
        """The lengths every forward must agree on (no device sync): the context, the mask over
        past + new tokens, the positions of the new tokens."""
        total = past_len + seq_length
        if position_ids is not None and tuple(position_ids.shape) != (batch_size, seq_length):
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)} but must be [batch, seq] = "
                f"[{batch_size}, {seq_length}], like input_ids"
            )
        if total > self.seq_length:
            raise ValueError(
                f"input of {seq_length} tokens after {past_len} cached ones needs {total} positions, "
                f"more than the model's context (seq_length={self.seq_length}); shorten the prompt or "
                "max_new_tokens, or use a longer-context checkpoint (e.g. chatglm3-6b-32k)"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch_size, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but must be "
                f"[batch, past + seq] = [{batch_size}, {total}]; pass the mask of the whole sequence so far"
            )


class InvalidScoreLogitsProcessor(LogitsProcessor):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., 5] = 5e4
        return scores


def _chat_history(history) -> List[Dict]:
    """chat()'s history as chatglm3 keeps it: None is empty; chatglm2's ``[(query, answer), ...]``
    pairs become a user and an assistant turn (in a new list); anything else than role/content
    dicts is a ValueError naming the entry. A chatglm3 list is returned itself, so chat() appends
    to the caller's list as the original does."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of turns, got {type(history).__name__}")
    turns: List[Dict] = []
    for i, entry in enumerate(history):
        if isinstance(entry, dict) and isinstance(entry.get("role"), str) and "content" in entry:
            turns.append(entry)
        elif isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(t, str) for t in entry):
            query, answer = entry
            turns.append({"role": "user", "content": query})
            turns.append({"role": "assistant", "metadata": "", "content": answer})
        else:
            raise ValueError(
                f"history[{i}] is {entry!r}; each turn is a dict with 'role' and 'content' "
                "(chatglm3) or a (query, answer) pair of strings (chatglm2)"
            )
    return history if len(turns) == len(history) and isinstance(history, list) else turns


@contextlib.contextmanager
def _static_cache_reserve(transformer, length: int):
    """Tell the model how many positions one generation reaches, restoring the previous value."""
    previous = transformer._reserve
    transformer._reserve = length
    try:
        yield
    finally:
        transformer._reserve = previous


def _requested_length(model, args, kwargs) -> int:
    """Total sequence length a ``generate`` call can reach (prompt + new tokens)."""
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if input_ids is None:
        input_ids = kwargs.get("inputs")
    prompt = input_ids.shape[-1] if input_ids is not None else 0
    config = kwargs.get("generation_config") or model.generation_config
    max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if max_new is not None:
        return prompt + max_new
    return kwargs.get("max_length", getattr(config, "max_length", None) or model.config.seq_length)


def _parse_tool_call(code: str) -> Dict[str, Any]:
    """Parse ``tool_call(a=1, b="x")`` safely (the original ran ``eval`` on model output)."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"the model's tool call is not valid Python: {code!r} ({error.msg})") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "tool_call" and not call.args):
        raise ValueError(f"expected tool_call(name=value, ...) in the model's answer, got {code!r}")
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _saved_output_layer(value):
    """config ``quantization_output_layer`` as ``quantize(output_layer=...)`` takes it: true,
    false or 8 as saved; absent (THUDM's pre-quantized checkpoints): unquantized."""
    if value is None:
        return False
    if isinstance(value, bool) or (_is_int(value) and value == 8):
        return value
    raise ValueError(
        f"config.json: quantization_output_layer={value!r} is not valid; it must be true, false "
        "or 8 (as quantize() saves it); fix or remove the field"
    )


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM with its language-model head (``transformer.output_layer``), ``generate`` and chat."""

    def __init__(self, config, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = getattr(config, "max_length", None) or config.seq_length
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.config = config
        self.quantized = False
        if self.config.quantization_bit:
            # As the original: a checkpoint saved quantized is built quantized (empty int8
            # storage the loader fills). Absent fields mean THUDM's layout: blocks only, int4
            # with one scale per output channel.
            self.quantize(
                self.config.quantization_bit,
                empty_init=True,
                output_layer=_saved_output_layer(getattr(config, "quantization_output_layer", None)),
                group_size=getattr(config, "quantization_group_size", None) or 0,
                int8_group_size=getattr(config, "quantization_int8_group_size", None) or 0,
            )
        self.post_init()

    # --- generation plumbing (independent of the transformers version) ---------------------

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, standardize_cache_format=False, **kwargs
    ):
        model_kwargs.pop("cache", None)
        model_kwargs["past_key_values"] = outputs.get(_CACHE_FIELD)
        if model_kwargs.get("attention_mask") is not None:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if model_kwargs.get("position_ids") is not None:
            position_ids = model_kwargs["position_ids"]
            model_kwargs["position_ids"] = torch.cat([position_ids, position_ids[..., -1:] + 1], dim=-1)
        model_kwargs["is_first_forward"] = False
        return model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        position_ids=None,
        use_cache=None,
        is_first_forward=True,
        cache=None,
        **kwargs,
    ):
        # position_ids None: the model's own 0, 1, ... after the past (the original's positions).
        past_key_values = past_key_values if past_key_values is not None else cache
        if not is_first_forward and past_key_values is not None:
            input_ids = input_ids[:, -1:]
            if position_ids is not None:
                position_ids = position_ids[..., -1:]
        return {
            "input_ids": input_ids,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "return_last_logit": True,
            "use_cache": use_cache if use_cache is not None else getattr(self.config, "use_cache", True),
        }

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; a static cache opened by its prompt gets a capacity bucket
        that holds the whole run (prompt + new tokens), so it never grows mid-generation."""
        with _static_cache_reserve(self.transformer, _requested_length(self, args, kwargs)):
            return super().generate(*args, **kwargs)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        return_last_logit: Optional[bool] = False,
    ):
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        transformer_outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        hidden_states = transformer_outputs[0]  # [s, b, h]
        if return_last_logit:
            hidden_states = hidden_states[-1:]
        project = self.transformer._backends.project  # resolved by the forward above
        lm_logits = project(self.transformer.output_layer, hidden_states).transpose(0, 1).contiguous()

        loss = None
        if labels is not None:
            lm_logits = lm_logits.to(torch.float32)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss(ignore_index=-100)(
                shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1)
            )
            lm_logits = lm_logits.to(hidden_states.dtype)
            loss = loss.to(hidden_states.dtype)

        if not return_dict:
            output = (lm_logits,) + tuple(transformer_outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=lm_logits,
            hidden_states=transformer_outputs.hidden_states,
            attentions=transformer_outputs.attentions,
            **{_CACHE_FIELD: transformer_outputs.get(_CACHE_FIELD)},
        )

    @staticmethod
    def _reorder_cache(past, beam_idx: torch.LongTensor):
        if isinstance(past, StaticKVCache):  # the HF beam-search hook, outside any forward
            return past.reorder(beam_idx)
        return tuple(
            (
                layer_past[0].index_select(1, beam_idx.to(layer_past[0].device)),
                layer_past[1].index_select(1, beam_idx.to(layer_past[1].device)),
            )
            for layer_past in past
        )

    def quantize(
        self,
        bits: int,
        empty_init: bool = False,
        device=None,
        output_layer: Any = None,
        group_size: Optional[int] = None,
        int8_group_size: Optional[int] = None,
    ):
        """Weight-only quantization in place (the original's signature); returns the model.

        ``bits``: 8 or 4; 0 does nothing. int4 layers have one scale per ``group_size`` input
        columns (default 128, or 64/32 where 128 does not divide every layer); int8 layers (all
        of them under ``quantize(8)``, and the output layer by default) one per
        ``int8_group_size`` (default 32, llama.cpp Q8_0's block, or 64/128 likewise); 0 = one
        scale per output channel, THUDM's layout. Replaces
        query_key_value, dense, dense_h_to_4h and dense_4h_to_h of every block, and the output
        layer: ``output_layer`` None (default) int8, True the blocks' bits, False unquantized
        (THUDM's int4 layout), 8 int8. ``empty_init`` allocates
        empty int8 storage for a loader to fill; ``device`` places the quantized weights.
        The kernel follows config ``quant_kernel`` / CHATGLM_QUANT_KERNEL (auto by device).
        """
        return quantize_model(self, bits, empty_init, device, output_layer, group_size, int8_group_size)

    # --- chat helpers ---------------------------------------------------------------------

    def _chat_max_length(self, max_length: Optional[int]) -> int:
        # The original's default, 8192, would generate past a shorter context and then fail.
        if max_length is None:
            return min(8192, self.config.seq_length)
        if not _is_int(max_length) or max_length < 1:
            raise ValueError(f"max_length={max_length!r} must be a positive integer (prompt + answer tokens)")
        return max_length

    def process_response(self, output, history, parse_tool_calls: bool = True):
        """Split the model's answer into (content, history); tool calls become dicts (with
        ``parse_tool_calls=False`` a tool call's text stays text: a call still being streamed
        is not yet valid code)."""
        content = ""
        history = copy.deepcopy(history)
        for response in output.split("<|assistant|>"):
            metadata, content = response.split("\n", maxsplit=1) if "\n" in response else ("", response)
            if not metadata.strip():
                content = content.strip()
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                content = content.replace("[[训练时间]]", "2023年")
            else:
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                if history[0]["role"] == "system" and "tools" in history[0]:
                    if not parse_tool_calls:
                        continue
                    code = "\n".join(content.split("\n")[1:-1])
                    content = {"name": metadata.strip(), "parameters": _parse_tool_call(code)}
                else:
                    content = {"name": metadata.strip(), "content": content}
        return content, history

    @torch.inference_mode()
    def chat(
        self,
        tokenizer,
        query: str,
        history: List[Dict] = None,
        role: str = "user",
        max_length: Optional[int] = None,
        num_beams=1,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        logits_processor=None,
        **kwargs,
    ):
        """One chat turn: returns (response, history). ``max_length`` (prompt + answer) defaults
        to the original's 8192 bounded by the model's context (``seq_length``); ``history`` takes
        chatglm3's ``[{"role": ..., "content": ...}]`` or chatglm2's ``[(query, answer)]``."""
        history = _chat_history(history)
        max_length = self._chat_max_length(max_length)
        logits_processor = LogitsProcessorList() if logits_processor is None else logits_processor
        logits_processor.append(InvalidScoreLogitsProcessor())
        gen_kwargs = {
            "max_length": max_length,
            "num_beams": num_beams,
            "do_sample": do_sample,
            "top_p": top_p,
            "temperature": temperature,
            "logits_processor": logits_processor,
            **kwargs,
        }
        inputs = tokenizer.build_chat_input(query, history=history, role=role).to(self.device)
        eos_token_id = [
            tokenizer.eos_token_id,
            tokenizer.get_command("<|user|>"),
            tokenizer.get_command("<|observation|>"),
        ]
        outputs = self.generate(**inputs, **gen_kwargs, eos_token_id=eos_token_id)
        outputs = outputs.tolist()[0][len(inputs["input_ids"][0]) : -1]
        response = tokenizer.decode(outputs)
        history.append({"role": role, "content": query})
        return self.process_response(response, history)

    @torch.inference_mode()
    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: List[Dict] = None,
        role: str = "user",
        past_key_values=None,
        max_length: Optional[int] = None,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        logits_processor=None,
        return_past_key_values=False,
        **kwargs,
    ):
        """Yield (response, history[, past_key_values]) as the answer grows (``max_length`` and
        ``history`` as in :meth:`chat`)."""
        history = _chat_history(history)
        max_length = self._chat_max_length(max_length)
        logits_processor = LogitsProcessorList() if logits_processor is None else logits_processor
        logits_processor.append(InvalidScoreLogitsProcessor())
        eos_token_id = [
            tokenizer.eos_token_id,
            tokenizer.get_command("<|user|>"),
            tokenizer.get_command("<|observation|>"),
        ]
        gen_kwargs = {
            "max_length": max_length,
            "do_sample": do_sample,
            "top_p": top_p,
            "temperature": temperature,
            "logits_processor": logits_processor,
            **kwargs,
        }
        if past_key_values is None:
            inputs = tokenizer.build_chat_input(query, history=history, role=role)
        else:
            inputs = tokenizer.build_chat_input(query, role=role)
        inputs = inputs.to(self.device)
        if past_key_values is not None:
            past_length = len(past_key_values[0][0]) - (self.transformer.pre_seq_len or 0)
            inputs["position_ids"] = inputs["position_ids"] + past_length
            attention_mask = inputs["attention_mask"]
            inputs["attention_mask"] = torch.cat(
                (attention_mask.new_ones(1, past_length), attention_mask), dim=1
            )
        history.append({"role": role, "content": query})
        prompt_length = len(inputs["input_ids"][0])
        response = None
        for outputs in self.stream_generate(
            **inputs,
            past_key_values=past_key_values,
            eos_token_id=eos_token_id,
            return_past_key_values=return_past_key_values,
            **gen_kwargs,
        ):
            if return_past_key_values:
                outputs, past_key_values = outputs
            text = tokenizer.decode(outputs.tolist()[0][prompt_length:-1])
            if text and text[-1] != "�":
                response = text
                content, new_history = self.process_response(response, history, parse_tool_calls=False)
                yield (
                    (content, new_history, past_key_values)
                    if return_past_key_values
                    else (content, new_history)
                )
        if response is not None:
            # A tool call is parsed once complete, and yielded as chat() returns it.
            content, new_history = self.process_response(response, history)
            if isinstance(content, dict) and "parameters" in content:
                yield (
                    (content, new_history, past_key_values)
                    if return_past_key_values
                    else (content, new_history)
                )

    @torch.inference_mode()
    def stream_generate(
        self,
        input_ids,
        generation_config: Optional[GenerationConfig] = None,
        logits_processor: Optional[LogitsProcessorList] = None,
        stopping_criteria: Optional[StoppingCriteriaList] = None,
        prefix_allowed_tokens_fn=None,
        return_past_key_values=False,
        **kwargs,
    ):
        """Yield the growing ``input_ids`` after every new token (greedy or sampling).

        A small loop of our own over public logits processors, so it does not depend on
        ``GenerationMixin`` internals that change between transformers releases.
        """
        if prefix_allowed_tokens_fn is not None:
            raise NotImplementedError(
                "stream_generate does not support prefix_allowed_tokens_fn; use generate()"
            )
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**kwargs)
        model_kwargs["use_cache"] = generation_config.use_cache
        prompt_length = input_ids.shape[-1]
        if kwargs.get("max_new_tokens") is not None:
            max_length = prompt_length + generation_config.max_new_tokens
        else:
            max_length = generation_config.max_length or self.config.seq_length
        with _static_cache_reserve(self.transformer, max_length):
            eos = generation_config.eos_token_id
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            eos_tensor = torch.tensor(eos, device=input_ids.device) if eos else None

            processors = LogitsProcessorList(logits_processor or [])
            if generation_config.repetition_penalty not in (None, 1.0):
                processors.insert(0, RepetitionPenaltyLogitsProcessor(generation_config.repetition_penalty))
            if generation_config.do_sample:
                if generation_config.temperature not in (None, 1.0):
                    processors.append(TemperatureLogitsWarper(generation_config.temperature))
                if generation_config.top_k not in (None, 0):
                    processors.append(TopKLogitsWarper(generation_config.top_k))
                if generation_config.top_p not in (None, 1.0):
                    processors.append(TopPLogitsWarper(generation_config.top_p))
            criteria = StoppingCriteriaList(stopping_criteria or [])

            unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            while True:
                model_inputs = self.prepare_inputs_for_generation(input_ids, **model_kwargs)
                outputs = self(
                    **model_inputs, return_dict=True, output_attentions=False, output_hidden_states=False
                )
                scores = processors(input_ids, outputs.logits[:, -1, :].float())
                if generation_config.do_sample:
                    next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    next_tokens = torch.argmax(scores, dim=-1)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
                model_kwargs = self._update_model_kwargs_for_generation(outputs, model_kwargs)
                if eos_tensor is not None:
                    unfinished = unfinished * (~torch.isin(next_tokens, eos_tensor)).long()
                yield (input_ids, outputs.get(_CACHE_FIELD)) if return_past_key_values else input_ids
                stop = bool(criteria(input_ids, scores).all()) if len(criteria) else False
                if unfinished.max() == 0 or input_ids.shape[-1] >= max_length or stop:
                    break


class ChatGLMForSequenceClassification(ChatGLMPreTrainedModel):
    """ChatGLM with a classification head on the last position (left padding puts a real token there)."""

    def __init__(self, config, empty_init=True, device=None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config, empty_init=empty_init, device=device)
        self.classifier_head = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        _mark_fresh(self.classifier_head)
        self.dropout = (
            nn.Dropout(config.classifier_dropout) if config.classifier_dropout is not None else None
        )
        self.config = config
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        full_attention_mask: Optional[torch.Tensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.LongTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        transformer_outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            full_attention_mask=full_attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        pooled = transformer_outputs[0][-1]  # last position, [b, h]
        if self.dropout is not None:
            pooled = self.dropout(pooled)
        logits = self.classifier_head(pooled.to(self.classifier_head.weight.dtype))

        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif self.num_labels > 1 and labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss_fct = MSELoss()
                loss = (
                    loss_fct(logits.squeeze().float(), labels.squeeze())
                    if self.num_labels == 1
                    else loss_fct(logits.float(), labels)
                )
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits.float(), labels.view(-1, self.num_labels))

        if not return_dict:
            output = (logits,) + tuple(transformer_outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=transformer_outputs.hidden_states,
            attentions=transformer_outputs.attentions,
            **{_CACHE_FIELD: transformer_outputs.get(_CACHE_FIELD)},
        )


# ---------------------------------------------------------------------------------------------
# Weight-only quantization.
#
# The stored layout (state_dict, save_pretrained; the same on every device, and THUDM's own for
# its int4/int8 checkpoints, so those load unchanged):
#   weight        int8. 8 bits: [out, in]. 4 bits: [out, in // 2], two signed nibbles per byte,
#                 column 2j in the high nibble and 2j + 1 in the low one (THUDM's packing).
#   weight_scale  the model's float dtype. [out]: one scale per output channel (int8, and THUDM's
#                 int4); [out, in // group]: int4 grouped along the input (ours, group 128).
#   bias          as in nn.Linear.
# Symmetric: w = q * scale. Each kernel derives its own packed copy from this when the device and
# dtype are known (outside any compiled region) and keeps it beside the stored tensors.
# ---------------------------------------------------------------------------------------------

QUANT_GROUP_SIZE = 128  # default int4 group; divides every chatglm3-6b input width (4096, 13696)
INT8_GROUP_SIZE = 32  # default int8 group: llama.cpp Q8_0's block
# Rows from which the CPU kernel leaves the weight-only GEMV kernels for "dequantize into a reused
# buffer + ordinary GEMM" (prefill). Measured crossover on a 2-core AVX2 EPYC, 4096x13696 int8:
# 64 rows 166 ms (int8pack) vs 179 ms (dequantize + fp32 GEMM); 128 rows 375 vs 320 ms.
_CPU_GEMV_MAX_ROWS = 64
_OPTION_ENV = MappingProxyType({spec[0]: spec[1] for spec in _OPTION_SPECS})


def _layer_option(field: str, option: Optional[str]) -> Tuple[str, str]:
    """A quantized layer's own ``field`` option, checked: ``option`` (from config.<field>), else
    its environment variable, else auto; returns (value, where it came from)."""
    source = f"config.{field}"
    if option is None:
        option, source = os.environ.get(_OPTION_ENV[field]) or "auto", _OPTION_ENV[field]
    option = str(option).strip().lower()
    allowed = OPTION_CHOICES[field]
    if option not in allowed:
        raise ValueError(f"{source}={option!r} is not valid; use one of: {', '.join(allowed)}")
    return option, source


def _int4_to_unsigned_nibbles(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8) & 15


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] holding values in [-8, 7] -> int8 [out, in // 2] in THUDM's nibble order."""
    nibbles = _int4_to_unsigned_nibbles(q.contiguous())
    return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).contiguous().view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 [out, in // 2] -> int8 [out, in] in [-8, 7]."""
    packed = packed.contiguous().view(torch.int8)
    # THUDM's own extraction, in int8 throughout (2x faster than widening first): an arithmetic
    # right shift sign-extends the high nibble; the low one is shifted up first.
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).flatten(1)


# int4 scale candidates per group, as fractions of the group's largest value. With the signed
# maximum mapped to -8 (llama.cpp Q4_0's trick) the group uses all 16 levels; shrinking the scale
# a little clips the rare extreme value but refines all others. Each group keeps the candidate
# with the smallest squared error (on random weights: logits error 34 % -> 27 %, top-1 agreement
# 0.34 -> 0.84 on the small preset, against absmax / 7 alone).
_INT4_SCALE_CANDIDATES = (1.0, 0.95, 0.9, 0.85)
_QUANTIZE_ROWS_PER_CHUNK = 2048  # bounds the float temporaries of a 6B-sized layer


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 0):
    """Round-to-nearest symmetric quantization of a float [out, in] weight.

    Returns ``(q, scale)`` in the stored layout, one scale per group of ``group_size`` input
    columns (0 = one per output channel, THUDM's layout): 8 bits absmax / 127; 4 bits the
    least-squares scale among ``_INT4_SCALE_CANDIDATES``. Scales are rounded
    to the weight's dtype *before* dividing, so q matches the scale that is kept.
    """
    out_features, in_features = weight.shape
    group = group_size or in_features
    qs, scales = [], []
    for start in range(0, out_features, _QUANTIZE_ROWS_PER_CHUNK):
        rows = weight[start : start + _QUANTIZE_ROWS_PER_CHUNK].detach().float()
        groups = rows.view(rows.shape[0], in_features // group, group)
        if bits == 8:
            candidates = [groups.abs().amax(-1) / 127]
        else:
            peak = torch.gather(groups, -1, groups.abs().argmax(-1, keepdim=True))[..., 0]
            candidates = [peak * (ratio / -8) for ratio in _INT4_SCALE_CANDIDATES]
        best_q = best_scale = best_error = None
        for scale in candidates:
            scale = scale.to(weight.dtype).float()
            safe = torch.where(scale != 0, scale, torch.ones_like(scale))
            q = torch.round(groups / safe[..., None]).clamp_(
                -128 if bits == 8 else -8, 127 if bits == 8 else 7
            )
            error = (q * scale[..., None] - groups).pow_(2).sum(-1)
            if best_q is None:
                best_q, best_scale, best_error = q, scale, error
            else:
                better = error < best_error
                best_q = torch.where(better[..., None], q, best_q)
                best_scale = torch.where(better, scale, best_scale)
                best_error = torch.minimum(error, best_error)
        qs.append(best_q.view(rows.shape[0], in_features).to(torch.int8))
        scales.append(best_scale)
    q, scale = torch.cat(qs), torch.cat(scales)
    if bits == 4:
        q = pack_int4(q)
    if not group_size:
        scale = scale[:, 0]
    return q, scale.to(weight.dtype)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored layout -> float32 [out, in] (the arithmetic every kernel is tested against)."""
    q = (unpack_int4(weight) if bits == 4 else weight).float()
    if scale.dim() == 1:
        return q * scale.float()[:, None]
    out_features, groups = scale.shape
    return (q.view(out_features, groups, -1) * scale.float()[..., None]).view(out_features, -1)


class DequantScratch:
    """One float buffer per thread, shared by all quantized layers of a model and reused for
    every prefill GEMM. Per thread: two threads prefilling on one model at once (a server) would
    otherwise write their weight chunks into the same memory and get each other's products. A
    copy of the model (``copy.deepcopy``, pickling) starts with no buffer."""

    def __init__(self):
        self._local = threading.local()

    @property
    def buffer(self) -> Optional[torch.Tensor]:
        """This thread's buffer (None before its first prefill)."""
        return getattr(self._local, "buffer", None)

    def get(self, shape, dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffer
        stale = buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.numel() < numel
        # A buffer made under torch.inference_mode cannot be written outside it (a prompt under
        # inference_mode, then generate() under no_grad): a new one then.
        if stale or (buffer.is_inference() and not torch.is_inference_mode_enabled()):
            self._local.buffer = buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def __reduce__(self):
        return (DequantScratch, ())


def _divisor_group(layer, allowed) -> Optional[int]:
    """The largest kernel group size in ``allowed`` that splits both the input width and the
    layer's own groups (a per-channel scale is repeated, exactly, over the kernel's groups)."""
    stored = layer.in_features if layer.weight_scale.dim() == 1 else layer.group_size
    for group in allowed:
        if stored % group == 0 and layer.in_features % group == 0:
            return group
    return None


def _scales_per_group(layer, group: int) -> torch.Tensor:
    """The layer's scales as [out, in // group] for a kernel group dividing the stored one."""
    scale = layer.weight_scale
    if scale.dim() == 1:
        scale = scale[:, None]
    repeat = layer.in_features // group // scale.shape[1]
    return scale.repeat_interleave(repeat, dim=1)


class _MathKernel:
    """Reference on any device: dequantize the whole weight (fp32 arithmetic), then a matmul."""

    @staticmethod
    def prepare(layer, dtype):
        return ()

    @staticmethod
    def matmul(layer, x):
        weight = dequantize_weight(layer.weight, layer.weight_scale, layer.bits).to(x.dtype)
        return F.linear(x, weight)


def _cpu_has_fast_half_gemm() -> bool:
    # oneDNN reports native bf16 (AVX512-BF16/AMX class) CPUs; elsewhere (e.g. AVX2) a bf16 GEMM
    # runs ~5x slower than fp32 and the prefill dequantizes to fp32 instead.
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:
        return False


def _cpu_half_prefill() -> bool:
    """Whether a CPU prompt runs half GEMMs (a quantized layer dequantized to the activations'
    half dtype; a bf16 layer on the ``dot`` backend as it is), else fp32 ones: where oneDNN
    reports native half GEMMs and the CPU has AMX or is an AMD one. An Intel CPU with AVX512-BF16 but no AMX gains nothing per cycle from bf16
    dot products over fp32 FMAs, and oneDNN's bf16 GEMM measured slower than its fp32 one there
    (a 2-core Xeon, family 6 model 207, AMX not exposed; 128x4096 by 27392x4096: bf16 177 ms
    against fp32 120 ms; the int8 and int4 layer's prefill 206 -> 132 and 196 -> 126 ms)."""
    return _cpu_has_fast_half_gemm() and (_cpu_has_amx() or _amd_cpu_family() > 0)


def _cpu_has_amx() -> bool:
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:
        return False


# Bytes of alignment torch's AVX-512 int8/int4 CPU kernels assume for their operands: they
# segfault on a weight or an activation at any other address (a safetensors file aligns its tensors
# to 8 bytes only, and a view can start anywhere). torch's CPU allocator aligns to this.
_KERNEL_ALIGNMENT = 64


def _kernel_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous and 64-byte aligned, else a fresh (aligned) contiguous copy."""
    if _is_compiling():  # inductor allocates its own (aligned) buffers
        return t.contiguous()
    if t.is_contiguous() and t.data_ptr() % _KERNEL_ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


# Output channels dequantized at a time on the prefill path: bounds the reused buffer (4096 x
# 13696 fp32 = 224 MB for the 6B model, instead of 449 MB for a whole dense_h_to_4h) while each
# GEMM stays large enough to run at full speed.
_DEQUANT_CHUNK_ROWS = 4096


def _int4_halves(weight: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stored int4 [rows, in // 2] -> float32 (even, odd): the weight's even input columns (the
    bytes' high nibbles) and its odd ones, each [rows, in // 2] in byte order, with the values
    :func:`dequantize_weight` gives them. A GEMM of ``[x[:, 0::2], x[:, 1::2]]`` against
    ``[even, odd]`` is the layer's product, and each half is a plain elementwise function of the
    contiguous bytes, which a compiler vectorises (interleaving the two nibbles of a byte, the
    stored order, is what made unpacking slow).

    Float arithmetic throughout, exact on integers: ``floor(b / 16)`` is the arithmetic shift that
    sign-extends the high nibble, and ``((b + 8) mod 16) - 8`` the sign-extended low one."""
    rows = weight.shape[0]
    groups = scale.shape[1] if scale.dim() == 2 else 1
    b = weight.view(rows, groups, -1).float()
    high = torch.floor(b * 0.0625)
    shifted = b + 8
    low = shifted - torch.floor(shifted * 0.0625) * 16 - 8
    s = scale.float().view(rows, groups, 1)
    return (high * s).view(rows, -1), (low * s).view(rows, -1)


def _int4_halves_into(weight, scale, even: torch.Tensor, odd: torch.Tensor) -> None:
    high, low = _int4_halves(weight, scale)
    even.copy_(high)
    odd.copy_(low)


def _native_int4_halves_into(weight, scale, even: torch.Tensor, odd: torch.Tensor) -> bool:
    """``_int4_halves_into`` by the cpu_dot library's one-pass loop (``cg_dequant``), bitwise the
    same values, where that library is loaded and the operands suit it (CPU; contiguous weight
    and scales; even / odd: float32 or bf16 rows of unit stride, equally spaced); whether it ran.
    4096x4096 to bf16 on a 2-core EPYC Zen 5: 1.3 ms against 2.4 for the inductor kernel."""
    lib = _NativeDot.lib
    if (
        lib is None
        or weight.device.type != "cpu"
        or even.dtype not in (torch.float32, torch.bfloat16)
        or odd.dtype != even.dtype
        or scale.dtype not in (torch.float32, torch.bfloat16)
        or not (weight.is_contiguous() and scale.is_contiguous())
        or even.stride(-1) != 1
        or odd.stride() != even.stride()
        or even.shape != weight.shape
        or odd.shape != weight.shape
    ):
        return False
    _native_dequant(lib, 4, weight, scale, even, odd)
    return True


def _native_dequant(
    lib, bits: int, weight, scale, even: torch.Tensor, odd: Optional[torch.Tensor] = None
) -> None:
    """``lib``'s ``cg_dequant`` on checked operands: int8 into ``even``, int4 into ``even`` and ``odd``."""
    lib.cg_dequant(
        bits,
        weight.data_ptr(),
        weight.shape[0],
        weight.shape[1],
        scale.data_ptr(),
        int(scale.dtype == torch.bfloat16),
        scale.shape[1] if scale.dim() == 2 else 1,
        even.data_ptr(),
        None if odd is None else odd.data_ptr(),
        even.stride(0),
        int(even.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )


class _Int4Unpacker:
    """``_int4_halves_into`` in one pass over the bytes: ``auto`` by our C loop where the cpu_dot
    library is loaded (``_native_int4_halves_into``), else (and ``compiled``) as an inductor
    kernel (1.8 ms for a 4096 x 4096 layer against 44 ms in eager ops on a 2-core Xeon),
    compiled at the first prefill once per input width (the row count is dynamic), or the same
    function in eager ops (``eager``).

    ``auto`` falls back to eager, with one warning, where inductor cannot compile here (no C++
    compiler, an old torch); ``compiled`` makes that an error."""

    _compiled = None
    failure: Optional[str] = None  # why the compiled kernel is not used (auto), once known
    limit_warned = False

    @classmethod
    def run(cls, mode: str, weight, scale, even, odd) -> None:
        if mode == "auto" and _native_int4_halves_into(weight, scale, even, odd):
            return
        if mode == "eager" or not cls._run_compiled(mode, weight, scale, even, odd):
            _int4_halves_into(weight, scale, even, odd)

    @classmethod
    def _run_compiled(cls, mode: str, weight, scale, even, odd) -> bool:
        """The compiled kernel on these operands; False where the eager ops must run instead."""
        if cls.failure is not None:
            if mode == "compiled":
                raise RuntimeError(cls._error())
            return False
        if cls._compiled is None:
            _raise_recompile_limit()  # one variant per input width and dtype; models add widths
            logger.info("int4 prefill: compiling the unpacking kernel (once per input width)")
            cls._compiled = torch.compile(_int4_halves_into, fullgraph=True, dynamic=False)
        for t in (weight, scale, even, odd):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # one kernel per input width, any row count
        try:
            cls._compiled(weight, scale, even, odd)
            return True
        except Exception as exc:  # the compiler's own failure, not a wrong input (checked before)
            if type(exc).__name__ == "FailOnRecompileLimitHit":  # more widths than dynamo keeps
                if not cls.limit_warned:
                    cls.limit_warned = True
                    logger.warning(
                        "int4 prefill: more layer widths in this process than dynamo's recompile "
                        "limit; those past it unpack in eager ops (raise torch._dynamo.config."
                        f"{_RECOMPILE_LIMIT_NAME} to compile them)"
                    )
                return False
            first_line = (str(exc).strip().splitlines() or [""])[0]
            cls.failure = f"{type(exc).__name__}: {first_line}"
            if mode == "compiled":
                raise RuntimeError(cls._error()) from None
            logger.warning(
                f"int4 prefill: unpacking in eager ops (slower) because inductor could not compile "
                f"its kernel here ({cls.failure}); set CHATGLM_INT4_DEQUANT=eager to skip the attempt"
            )
            return False

    @classmethod
    def _error(cls) -> str:
        return (
            f"int4_dequant='compiled' needs inductor to compile its CPU kernel, which failed here "
            f"({cls.failure}); install a C++ compiler (g++) or set CHATGLM_INT4_DEQUANT=eager (or auto)"
        )


def _even_odd_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` [m, in] with its columns reordered to match :func:`_int4_halves` (even, then odd)."""
    return torch.cat((x[:, 0::2], x[:, 1::2]), dim=1)


def _dequantized_gemm(layer, x, gemm_dtype, int4_dequant: str = "eager"):
    """Prefill path: the weight dequantized to ``gemm_dtype`` and ordinary GEMMs.

    int8's per-output-channel scale commutes with the GEMM, so its weight is only converted and
    the scale applied to the output (grouped int8 is multiplied out). int4 is unpacked into its even and odd input columns
    (:func:`_int4_halves`) against the activation's columns in that order. The weight goes
    through one reused buffer, ``_DEQUANT_CHUNK_ROWS`` output channels at a time, in graph mode
    too (one opaque op): a compiled graph that dequantized the whole weight allocated a new
    temporary of its size per layer and prefill (the 6B model: int8 6.0 s, int4 11.2 s against
    2.7 and 2.1 s in eager mode on a 2-core Xeon)."""
    if _is_compiling():
        return _DEQUANTIZED_GEMM(x, layer.weight, layer.weight_scale, layer.bits, gemm_dtype, int4_dequant)
    return _chunked_dequantized_gemm(
        x, layer.weight, layer.weight_scale, layer.bits, gemm_dtype, int4_dequant, layer.scratch
    )


def _chunked_gemm(xg: torch.Tensor, out_features: int, in_features: int, scratch, fill) -> torch.Tensor:
    """xg [m, in] times a weight [out, in] that ``fill(chunk, start, stop)`` writes, rows
    ``start:stop`` at a time (``_DEQUANT_CHUNK_ROWS``), into one reused ``scratch`` buffer of
    xg's dtype: [m, out] in that dtype."""
    rows = min(_DEQUANT_CHUNK_ROWS, out_features)
    buffer = scratch.get((rows, in_features), xg.dtype, xg.device)
    out_t = torch.empty(out_features, xg.shape[0], dtype=xg.dtype, device=xg.device)  # [out, m]
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        chunk = buffer[: stop - start]
        fill(chunk, start, stop)
        torch.mm(chunk, xg.t(), out=out_t[start:stop])
    return out_t.t()


def _chunked_dequantized_gemm(x, weight, scale, bits: int, gemm_dtype, int4_dequant: str, scratch):
    out_features = weight.shape[0]
    in_features = weight.shape[1] * (2 if bits == 4 else 1)
    xg = x.to(gemm_dtype)
    if bits == 4:
        xg = _even_odd_columns(xg)
    half = in_features // 2
    grouped_int8 = bits == 8 and scale.dim() == 2  # the scale does not commute with the GEMM
    if grouped_int8:
        scale = scale.to(gemm_dtype).contiguous()

    def fill(chunk, start, stop):
        if grouped_int8:
            _dequantize_int8_groups(weight[start:stop], scale[start:stop], chunk)
        elif bits == 8:
            chunk.copy_(weight[start:stop])
        else:
            _Int4Unpacker.run(
                int4_dequant, weight[start:stop], scale[start:stop], chunk[:, :half], chunk[:, half:]
            )

    out = _chunked_gemm(xg, out_features, in_features, scratch, fill)
    if bits == 8 and scale.dim() == 1:
        out = out * scale.to(gemm_dtype)
    return out.to(x.dtype).contiguous()


def _dequantize_int8_groups(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = grouped int8 ``weight`` times its scales (``scale`` already in ``out``'s dtype):
    the cpu_dot library's one-pass loop where that library is loaded (4096x4096 to bf16: 1.6 ms
    against 2.9 in the eager ops on a 2-core EPYC Zen 4, the same values), else a conversion and an
    in-place multiply (1.4x faster than one mixed-dtype multiply)."""
    lib = _NativeDot.lib
    if (
        lib is not None
        and out.dtype in (torch.float32, torch.bfloat16)
        and scale.dtype == out.dtype
        and weight.device.type == "cpu"
        and all(t.is_contiguous() for t in (weight, scale, out))
    ):
        _native_dequant(lib, 8, weight, scale, out)
        return
    out.copy_(weight)
    out.view(out.shape[0], scale.shape[1], -1).mul_(scale[:, :, None])


_GRAPH_PREFILL_SCRATCH = DequantScratch()  # the opaque op's buffer (an op cannot take the layer)


def _dequantized_gemm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    gemm_dtype: torch.dtype,
    unpack: str,
) -> torch.Tensor:
    return _chunked_dequantized_gemm(x, weight, scale, bits, gemm_dtype, unpack, _GRAPH_PREFILL_SCRATCH)


_DEQUANTIZED_GEMM = _opaque_op(
    "dequantized_gemm",
    _dequantized_gemm_op,
    lambda x, weight, scale, bits, gemm_dtype, unpack: x.new_empty(x.shape[0], weight.shape[0]),
)

_DENSE_PREFILL_SCRATCH = DequantScratch()  # the fp32 copy of a chunk of a dense weight (prefill)


def _fp32_prefill_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [m, in] . weight [out, in] (+ bias), half dtypes on a CPU, in fp32 GEMMs: the weight
    converted to fp32 ``_DEQUANT_CHUNK_ROWS`` rows at a time into one reused buffer, the fp32
    sums (+ bias) rounded once to x's dtype, as a half GEMM rounds its fp32 accumulators. For
    prefill where half GEMMs are the slower (``_cpu_half_prefill``): 128x4096 by 27392x4096 on
    a 2-core Xeon without AMX, 122 ms against 177 for oneDNN's bf16 GEMM."""
    out = _chunked_gemm(
        x.float(),
        *weight.shape,
        _DENSE_PREFILL_SCRATCH,
        lambda chunk, start, stop: chunk.copy_(weight[start:stop]),
    )
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).contiguous()


_FP32_PREFILL_GEMM = _opaque_op(
    "fp32_prefill_gemm", _fp32_prefill_gemm, lambda x, weight, bias: x.new_empty(x.shape[0], weight.shape[0])
)


def _linear_dot_fp32_prefill(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``dot`` backend where half GEMMs are slower than fp32 ones (an Intel CPU with
    AVX512-BF16 but no AMX): a prompt of ``_CPU_GEMV_MAX_ROWS`` rows or more in
    :func:`_fp32_prefill_gemm`, anything else as :func:`_linear_dot`."""
    weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
    if (
        x.dim() < 2
        or x.numel() // x.shape[-1] < _CPU_GEMV_MAX_ROWS
        or type(linear) not in _PLAIN_LINEARS
        or x.dtype not in _GEMV_DTYPES
        or weight.dtype != x.dtype
        or (bias is not None and bias.dtype != x.dtype)
    ):
        return _linear_dot(linear, x)
    rows = x.reshape(-1, x.shape[-1])
    product = _FP32_PREFILL_GEMM if _is_compiling() else _fp32_prefill_gemm
    out = product(rows, weight, bias)
    return _combined(linear, out.view(*x.shape[:-1], out.shape[-1]))


def _resolve_int4_dequant(option: Optional[str]) -> str:
    """The layer's ``int4_dequant`` (None: CHATGLM_INT4_DEQUANT), checked; ``auto`` once the
    compiled kernel is known not to build here is ``eager``."""
    option, _ = _layer_option("int4_dequant", option)
    if option == "auto" and _Int4Unpacker.failure is not None:
        return "eager"
    return option


class _CpuKernel:
    """``torch._weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` for few rows (decode).

    Both are vectorised for bf16 activations only (fp32 runs 5-10x slower), so other activation
    dtypes are rounded to bf16 for the product (accumulation is fp32 inside). From
    ``_CPU_GEMV_MAX_ROWS`` rows (prefill) the weight is dequantized into a reused buffer and an
    ordinary GEMM runs: fp32 unless a half one is the faster (``_cpu_half_prefill``). int8 needs only a conversion
    (its per-output-channel scale is applied to the GEMM's output); int4 is unpacked into even
    and odd input columns (``_Int4Unpacker``) for a half GEMM, and stays on the int4 kernel on a
    CPU without fast half GEMMs (where that kernel measured as fast as unpacking plus an fp32
    GEMM) and on an AMX CPU whose unpacking runs in eager ops (the kernel is faster there).
    """

    GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts

    @staticmethod
    def prepare(layer, dtype):
        half = _cpu_half_prefill()
        if layer.bits == 8 and layer.weight_scale.dim() == 2:
            # Grouped int8, which torch's kernel does not take (cpu_dot does): every row count
            # dequantizes for a GEMM.
            return (None, half)
        if layer.bits == 8:
            # The kernel reads the stored weight itself: realign it in place when it is not (a
            # copy, once, replacing e.g. an mmap-ed checkpoint view; no second copy is kept).
            layer.weight.data = _kernel_aligned(layer.weight.data)
            return (layer.weight_scale.to(torch.bfloat16), half)
        group = _divisor_group(layer, _CpuKernel.GROUPS)
        if group is None:
            raise ValueError(
                f"the cpu int4 kernel needs in_features ({layer.in_features}) and the group size to "
                f"be multiples of 32; quantize with group_size=32 or set CHATGLM_QUANT_KERNEL=math"
            )
        unsigned = (unpack_int4(layer.weight).to(torch.int32) + 8).contiguous()
        packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        scales = _scales_per_group(layer, group).t().contiguous()  # [in // group, out]
        # The kernel computes (q - 8) * scale + zero; symmetric int4 has zero = 0.
        scales_and_zeros = torch.stack((scales, torch.zeros_like(scales)), dim=-1).to(torch.bfloat16)
        # Prefill from 64 rows: unpacking (one compiled pass, _Int4Unpacker) + a half GEMM,
        # 4096x4096 at 128 rows on a 2-core Sapphire Rapids VM: 5.3 ms against 28.5 ms for the
        # int4 kernel's own AMX path. Unpacked in eager ops (44 ms there) the AMX kernel is faster.
        mode = _resolve_int4_dequant(layer.int4_dequant)
        dequantize_prefill = _cpu_has_fast_half_gemm() and (mode != "eager" or not _cpu_has_amx())
        # fp32 where a half GEMM is not the faster one (_cpu_half_prefill): the int4 kernel
        # itself measured slower still there (27392x4096 at 128 rows: 216 ms, bf16 193, fp32 125).
        gemm_dtype = None if half else torch.float32
        return (packed, scales_and_zeros, group, mode, gemm_dtype, dequantize_prefill)

    @staticmethod
    def matmul(layer, x):
        state = layer._kernel_state
        if x.shape[0] >= _CPU_GEMV_MAX_ROWS or state[0] is None:
            if layer.bits == 8:
                return _dequantized_gemm(layer, x, x.dtype if state[-1] else torch.float32)
            if state[-1]:  # int4: dequantize for prefill (only with fast half GEMMs)
                return _dequantized_gemm(layer, x, state[4] or x.dtype, state[3])
        xb = _kernel_aligned(x.to(torch.bfloat16))
        if layer.bits == 8:
            out = torch._weight_int8pack_mm(xb, layer.weight, state[0])
        else:
            packed, scales_and_zeros, group = state[:3]
            out = torch._weight_int4pack_mm_for_cpu(xb, packed, group, scales_and_zeros)
        return out.to(x.dtype)


def _onednn_int8_linear_present() -> bool:
    onednn = torch.ops.onednn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(onednn, "qlinear_pointwise")
        and hasattr(onednn, "qlinear_prepack")
    )


def _w8a8_linear_eager(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero_points: torch.Tensor
) -> torch.Tensor:
    # Per token: each row's absmax maps to 127. oneDNN is told the activation scale is 1 and
    # returns the int32 sums times the weight's per-channel scale (fp32); the row scale is applied
    # to that (exact: both scales factor out of the dot product). Activations go in as uint8 with
    # zero point 128 (q + 128, exact for q in [-127, 127]): oneDNN's u8 x s8 path measured 10-25 %
    # faster than its s8 x s8 one here.
    row_scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-30) / 127  # [m, 1]
    xq = (torch.round(x.float() / row_scale).clamp_(-127, 127) + 128).to(torch.uint8)
    out = torch.ops.onednn.qlinear_pointwise(
        xq, 1.0, 128, packed, weight_scale, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return (out * row_scale).to(x.dtype)


# The W8A8 product as one opaque op in graph mode: called bare, inductor's own lowering of
# onednn.qlinear_pointwise insists on a weight it packed itself (a graph constant), which ours is not.
_W8A8_LINEAR = (
    _opaque_op(
        "w8a8_linear",
        _w8a8_linear_eager,
        lambda x, packed, weight_scale, zero_points: x.new_empty(x.shape[0], weight_scale.shape[0]),
    )
    if _onednn_int8_linear_present()
    else None
)


class _CpuDynamicInt8Kernel:
    """int8 activations x int8 weights (W8A8, what llama.cpp's Q8_0 does): each row of ``x`` is
    quantized on the fly to int8 with its own absmax scale (per token), and oneDNN's int8 GEMM
    (``onednn.qlinear_pointwise``: VNNI/AMX dot products where the CPU has them) runs on a weight
    prepacked once for one-row (decode) activations. In graph mode the product is one custom op
    (see ``_W8A8_LINEAR``).
    """

    @staticmethod
    def prepare(layer, dtype):
        if layer.bits != 8:
            raise ValueError("the cpu_w8a8 kernel is int8 only; use cpu (or auto) for int4")
        if layer.weight_scale.dim() == 2:
            raise ValueError(
                f"the cpu_w8a8 kernel takes one int8 scale per output channel, not groups of "
                f"{layer.group_size}; quantize with int8_group_size=0, or use cpu_dot (or auto)"
            )
        weight = _kernel_aligned(layer.weight.data)
        packed = torch.ops.onednn.qlinear_prepack(weight, [1, layer.in_features])  # own copy
        zero_points = torch.zeros(layer.out_features, dtype=torch.int64)
        return (packed, layer.weight_scale.float(), zero_points)

    @staticmethod
    def matmul(layer, x):
        return (_W8A8_LINEAR if _is_compiling() else _w8a8_linear_eager)(x, *layer._kernel_state)


# The cpu_dot kernel's C source, compiled once per process at first use (``_NativeDot``).
_NATIVE_DOT_SOURCE = r"""
/* chatglm3 int8 / int4 layers x int8 activations: integer dot products (AVX-512 VNNI, AVX2, or
   plain C), for the few rows of a decode step. Built by modeling_chatglm.py at first use. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#if !defined(CG_PATH)
#  if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#    define CG_PATH 2
#  elif defined(__AVX2__) && defined(__FMA__)
#    define CG_PATH 1
#  else
#    define CG_PATH 0
#  endif
#endif
#if CG_PATH > 0
#  include <immintrin.h>
#endif

int cg_path(void) { return CG_PATH; }

static inline float cg_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline float cg_scale(const void *s, int bf16, int64_t i) {
    return bf16 ? cg_bf16(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}

/* One row of x (k floats) -> int8 per block of `block` columns: q (split: the even columns in
   q[0, k/2), the odd ones in q[k/2, k)), the block's scale (absmax / 127) and the sum of its q.
   Rounding is to nearest, ties to even, on x * (127 / absmax) in float32. */
static void cg_quantize_row(const float *x, int64_t k, int64_t block, int split,
                            int8_t *q, float *scale, int32_t *sum) {
    int64_t half = k / 2;
    for (int64_t b = 0; b < k / block; b++) {
        const float *xb = x + b * block;
#if CG_PATH == 2
        __m512 vmax = _mm512_setzero_ps();
        for (int64_t i = 0; i < block; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
        float amax = _mm512_reduce_max_ps(vmax);
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        __m512 vinv = _mm512_set1_ps(inv);
        __m512i vsum = _mm512_setzero_si512();
        if (split) {
            const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
            for (int64_t i = 0; i < block; i += 32) {
                __m512 a = _mm512_loadu_ps(xb + i), c = _mm512_loadu_ps(xb + i + 16);
                __m512i qe = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, even, c), vinv));
                __m512i qo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, odd, c), vinv));
                vsum = _mm512_add_epi32(vsum, _mm512_add_epi32(qe, qo));
                _mm_storeu_si128((__m128i *)(q + (b * block + i) / 2), _mm512_cvtsepi32_epi8(qe));
                _mm_storeu_si128((__m128i *)(q + half + (b * block + i) / 2), _mm512_cvtsepi32_epi8(qo));
            }
        } else {
            for (int64_t i = 0; i < block; i += 16) {
                __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), vinv));
                vsum = _mm512_add_epi32(vsum, v);
                _mm_storeu_si128((__m128i *)(q + b * block + i), _mm512_cvtsepi32_epi8(v));
            }
        }
        scale[b] = amax / 127.f;
        sum[b] = _mm512_reduce_add_epi32(vsum);
#else
        float amax = 0.f;
        for (int64_t i = 0; i < block; i++) { float a = fabsf(xb[i]); amax = a > amax ? a : amax; }
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t s = 0;
        for (int64_t i = 0; i < block; i++) {
            int32_t v = (int32_t)nearbyintf(xb[i] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            s += v;
            int64_t col = b * block + i;
            if (split) q[(col & 1) * half + col / 2] = (int8_t)v; else q[col] = (int8_t)v;
        }
        scale[b] = amax / 127.f;
        sum[b] = s;
#endif
    }
}

#if CG_PATH >= 1
static inline float cg_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if CG_PATH == 2
/* a in lane 0 and b in lane 8, zero elsewhere; a in lanes 0-7 and b in lanes 8-15. */
static inline __m512i cg_two_lanes(int32_t a, int32_t b) {
    return _mm512_inserti64x4(_mm512_zextsi128_si512(_mm_cvtsi32_si128(a)),
                              _mm256_zextsi128_si256(_mm_cvtsi32_si128(b)), 1);
}
static inline __m512 cg_two_halves(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}
#endif

/* int8 weight [n, k] x int8 activations in blocks of 32. ws: the row's scales, one per `group`
   columns (a multiple of 32); per output channel (group == k) the caller applies it instead.
   AVX2, else plain C (AVX-512 runs cg_dot8_rows for every row). */
static inline float cg_scale8(const void *ws, int bf16, int64_t group, int64_t k, int64_t b) {
    return group == k ? 1.f : cg_scale(ws, bf16, b * 32 / group);
}
static float cg_dot8(const int8_t *w, const int8_t *q, const float *xs, const int32_t *xsum,
                     const void *ws, int bf16, int64_t group, int64_t k) {
#if CG_PATH == 1
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / 32; b++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * 32));
        __m256i qv = _mm256_loadu_si256((const __m256i *)(q + b * 32));
        /* |w| (u8, up to 128) times q with w's sign: pairs stay within int16. */
        __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(qv, wv));
        __m256i d = _mm256_madd_epi16(p, ones);
        __m256 s = _mm256_set1_ps(xs[b] * cg_scale8(ws, bf16, group, k, b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc);
    }
    (void)xsum;
    return cg_hsum256(acc);
#else
    float acc = 0.f;
    for (int64_t b = 0; b < k / 32; b++) {
        int32_t d = 0;
        for (int64_t i = 0; i < 32; i++) d += (int32_t)w[b * 32 + i] * (int32_t)q[b * 32 + i];
        acc += (float)d * xs[b] * cg_scale8(ws, bf16, group, k, b);
    }
    (void)xsum;
    return acc;
#endif
}

/* int4 weight [n, k/2] in THUDM's order (byte j: column 2j in the high nibble, 2j+1 in the low,
   both signed) x int8 activations split into even/odd columns, in blocks of `bc` columns (128, or
   64 where the width or the group is not a multiple of 128); ws: the row's scales, one per
   `group` columns (a multiple of bc). 32 bytes (64 columns) at a time: AVX2, else plain C. */
static float cg_dot4_any(const int8_t *w, const int8_t *qe, const int8_t *qo, const float *xs,
                         const int32_t *xsum, const void *ws, int bf16, int64_t group, int64_t k, int64_t bc) {
    int64_t chunks = k / 64, per_block = bc / 64;
    float acc_s = 0.f;
#if CG_PATH >= 1
    const __m256i flip = _mm256_set1_epi8((char)0x88), low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
#endif
    for (int64_t c = 0; c < chunks; c++) {
        int64_t b = c / per_block, o = c * 32;
        float s = xs[b] * cg_scale(ws, bf16, c * 64 / group);
        if (c % per_block == 0) acc_s -= 8.f * (float)xsum[b] * s; /* the nibbles' +8, once a block */
#if CG_PATH >= 1
        __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + o)), flip);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low), lo = _mm256_and_si256(v, low);
        __m256i p = _mm256_add_epi16(
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(qe + o))),
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(qo + o))));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(s), acc);
#else
        int32_t d = 0;
        for (int64_t i = 0; i < 32; i++) {
            int32_t hi = ((w[o + i] >> 4) & 15), lo = (w[o + i] & 15); /* q + 8 after the xor below */
            hi ^= 8; lo ^= 8;
            d += hi * qe[o + i] + lo * qo[o + i];
        }
        acc_s += (float)d * s;
#endif
    }
#if CG_PATH >= 1
    acc_s += cg_hsum256(acc);
#endif
    return acc_s;
}

#if CG_PATH == 2
/* The same for bc = 128 with 64-byte vectors (AVX-512 VNNI), one row. */
static float cg_dot4(const int8_t *w, const int8_t *qe, const int8_t *qo, const float *xs,
                     const int32_t *xsum, const void *ws, int bf16, int64_t group, int64_t k) {
    int64_t blocks = k / 128, per_group = group / 128;
    const __m512i flip = _mm512_set1_epi8((char)0x88), low = _mm512_set1_epi8(0x0F);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t g = 0, b = 0; g < blocks / per_group; g++) {
        float sg = cg_scale(ws, bf16, g);
        for (int64_t e = b + per_group; b < e; b++) {
            /* Each nibble xor 8 is q + 8 (0..15); the sum is w.q + 8 * sum(q), removed up front. */
            __m512i d = _mm512_zextsi128_si512(_mm_cvtsi32_si128(-8 * xsum[b]));
            __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + b * 64)), flip);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low), lo = _mm512_and_si512(v, low);
            d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512((const void *)(qe + b * 64)));
            __m512i d2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(qo + b * 64)));
            __m512 s = _mm512_set1_ps(xs[b] * sg);
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), s, acc1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

#if CG_PATH == 2
/* Scales i .. i+15 of ws (bf16 or float) as floats; the lanes outside mask m are zero. */
static inline __m512 cg_scales16(const void *ws, int bf16, int64_t i, __mmask16 m) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)ws + i)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)ws + i);
}

/* The weight scales of blocks b0 .. b0 + span - 1 (span <= 16) of a row whose scales start at
   ws[row], one scale per `per` blocks: lane i holds block b0 + i's; the lanes from span on are
   zero. */
static inline __m512 cg_block_scales(const void *ws, int bf16, int64_t row, int64_t b0, int64_t span, int64_t per) {
    __mmask16 m = (__mmask16)((1u << span) - 1u);
    if (per == 1) return cg_scales16(ws, bf16, row + b0, m);
    int32_t at[16];
    int64_t first = b0 / per, last = (b0 + span - 1) / per;
    for (int i = 0; i < 16; i++) at[i] = (int32_t)((b0 + (i < span ? i : 0)) / per - first);
    return _mm512_maskz_permutexvar_ps(m, _mm512_loadu_si512((const void *)at),
                                       cg_scales16(ws, bf16, row + first, (__mmask16)((1u << (last - first + 1)) - 1u)));
}

/* A tile (four rows) of at most `near_tile` bytes (the caller's, see _dot_prefetch_tile)
   prefetches the next tile while it is read, so the memory stays one tile ahead: four short
   streams (1-3 KiB rows) barely trained the hardware's prefetcher, and reading ran at half speed
   (2-core EPYC Zen 4, 2 threads: 65024x1024 int8 12 against 25 GB/s, 8192x2752 int8 20 against
   25-32, int4 27392x4096 15-19 against 26-30). There, from 16 KiB tiles on it was slower than
   without (int8 27392x4096 19-22 against 21-27 GB/s), so larger tiles prefetch 8 vectors ahead
   within their rows instead (int8 too since 2026-12-03, measured on a Xeon only); on a Zen 5
   every tile size gained from it (int8 4096-wide rows, 16 KiB tiles: 24-32 against 34-50 GB/s). */
/* `rows` (1, 2 or 4, a constant where it is inlined) output rows at a time (AVX-512; one for the
   rows a tile leaves, so that every row's sums are made by the same instructions): the
   activation block is loaded once for all of them, and independent accumulations keep the
   dot-product units busy. Each 64-byte vector holds two 32-column blocks (lanes 0-7, 8-15); every
   16 blocks each row's 16 products activation scale x weight scale are made in one vector, and a
   lane permutation gives each step its two. (w + 128) as u8 times q sums to w.q + 128 * sum(q):
   that is taken off per 16 blocks in float (-128 * sum(q) times the same products), not per
   step in the integer sums. Per step and row that is five vector operations where the scalar
   loads, conversions and broadcasts of two scales had been fourteen: in cache, one thread,
   128x4096, two rows 30 -> 57 GB/s, four 44 -> 64 (a 2-core EPYC Zen 5). The vector loads of the
   scales wait on memory where the scalar ones did not (the next row's scales had arrived by
   their step): the next tile's scales are prefetched at the start of each tile, without which
   the weight stream slowed (27392x4096, two rows, 48 against 41 GB/s). */
static inline __attribute__((always_inline)) void cg_dot8_rows(
    const int rows, const int8_t *w, int64_t k, const int8_t *q, const float *xs, const int32_t *xsum,
    const void *ws, int bf16, int64_t group, int64_t near_tile, float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), two = _mm512_set1_epi32(2);
    const __m512i pair0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    int64_t groups = k / group, blocks = k / 32, scale_bytes = rows * groups * (bf16 ? 2 : 4);
    int near = rows * k <= near_tile;
    __m512 acc[4];
    if (groups > 1)
        for (int64_t o = 0; o < scale_bytes; o += 64) _mm_prefetch((const char *)ws + scale_bytes + o, _MM_HINT_T0);
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        int64_t span = blocks - b0 < 16 ? blocks - b0 : 16; /* even: k is a multiple of 64 */
        __mmask16 m = (__mmask16)((1u << span) - 1u);
        __m512 xv = _mm512_maskz_loadu_ps(m, xs + b0), cs[4];
        for (int r = 0; r < rows; r++) /* groups == 1: one scale per output channel, the caller's */
            cs[r] = groups == 1 ? xv : _mm512_mul_ps(xv, cg_block_scales(ws, bf16, r * groups, b0, span, group / 32));
        __m512 corr = _mm512_mul_ps(_mm512_set1_ps(-128.f), _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, xsum + b0)));
        for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(cs[r], corr, acc[r]);
        __m512i sel = pair0; /* lanes 0-7: block b's product, 8-15: block b + 1's */
        for (int64_t c = 0; c < span; c += 2, sel = _mm512_add_epi32(sel, two)) {
            int64_t b = b0 + c;
            __m512i qv = _mm512_loadu_si512((const void *)(q + b * 32));
            /* The next tile (near_tile above), else 8 vectors ahead in each row, as the int4 rows:
               27392x4096 24.4 against 26.2 GB/s, 4096x13696 26.6 against 28.5 (2-core Xeon; 256
               bytes ahead gained nothing, 2048 lost at 4096-wide rows). */
            for (int r = 0; r < rows; r++)
                _mm_prefetch((const char *)(near ? w + rows * k + b * 32 * rows + r * 64 : w + r * k + b * 32 + 512),
                             _MM_HINT_T0);
            for (int r = 0; r < rows; r++) {
                __m512i wu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + r * k + b * 32)), flip);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, qv)),
                                         _mm512_permutexvar_ps(sel, cs[r]), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

static void cg_dot8_x4(const int8_t *w, int64_t k, const int8_t *q, const float *xs, const int32_t *xsum,
                       const void *ws, int bf16, int64_t group, int64_t near_tile, float *out) {
    cg_dot8_rows(4, w, k, q, xs, xsum, ws, bf16, group, near_tile, out);
}

static void cg_dot8_x2(const int8_t *w, int64_t k, const int8_t *q, const float *xs, const int32_t *xsum,
                       const void *ws, int bf16, int64_t group, int64_t near_tile, float *out) {
    cg_dot8_rows(2, w, k, q, xs, xsum, ws, bf16, group, near_tile, out);
}

/* int4 with one scale per 128-column block (the default group), eight rows at a time: each
   activation vector serves eight rows, and every 16 blocks each row's 16 products x scale * w
   scale are made in one vector (the same float products as one at a time) and broadcast from
   memory per block, where a scalar load, multiply and broadcast per block and row had made the
   loop compute-bound enough to slow the stream. `near`: prefetch the next tile (rows short
   enough that a four-row tile would), else 8 vectors ahead within each row. 2-core Xeon, GB/s,
   interleaved rounds: the vector scales on four rows, 27392x4096 24.9-25.8 -> 26.3-28.0,
   4096x13696 25.0-25.1 -> 25.6-25.8; then eight rows, 27392x4096 23.4-28.0 -> 28.1-28.4,
   4096x13696 26.5-26.7 -> 28.0-28.2, but 4608x4096 23.2-27.1 -> 26.0-26.1 (kept for the bigger
   layers' sake). */
static void cg_dot4_x8(const int8_t *w, int64_t k, const int8_t *qe, const int8_t *qo, const float *xs,
                       const int32_t *xsum, const void *ws, int64_t groups, int bf16, int near, float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x88), low = _mm512_set1_epi8(0x0F);
    int64_t stride = k / 2, blocks = k / 128;
    __m512 acc[8];
    float cs[8][16];
    for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        int64_t span = blocks - b0 < 16 ? blocks - b0 : 16;
        __mmask16 m = (__mmask16)((1u << span) - 1u);
        __m512 xv = _mm512_maskz_loadu_ps(m, xs + b0);
        for (int r = 0; r < 8; r++) _mm512_storeu_ps(cs[r], _mm512_mul_ps(xv, cg_scales16(ws, bf16, r * groups + b0, m)));
        for (int64_t c = 0; c < span; c++) {
            int64_t b = b0 + c;
            __m512i ev = _mm512_loadu_si512((const void *)(qe + b * 64));
            __m512i od = _mm512_loadu_si512((const void *)(qo + b * 64));
            __m512i init = _mm512_zextsi128_si512(_mm_cvtsi32_si128(-8 * xsum[b]));
            for (int r = 0; r < 8; r++) {
                _mm_prefetch((const char *)(near ? w + 8 * stride + b * 512 + r * 64 : w + r * stride + b * 64 + 512),
                             _MM_HINT_T0);
                __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + r * stride + b * 64)), flip);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low), lo = _mm512_and_si512(v, low);
                __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, hi, ev), lo, od);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(cs[r][c]), acc[r]);
            }
        }
    }
    for (int r = 0; r < 8; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* int4 with one scale per `per_group` 128-column blocks, four rows at a time. Each nibble made
   unsigned (q + 8) in one ternary-logic operation ((v & 0x0F) ^ 0x08), the +8's correction
   (-8 * sum(q) * scale) added per 16 blocks in float, and the rows' 16 products activation scale
   x weight scale made in one vector per 16 blocks, as the int8 rows (cg_dot8_rows), the next
   tile's scales prefetched: in cache, one thread, 128x4096, 35 -> 47 GB/s, and at memory speed
   27392x4096 46.5 -> 48.1, 4096x13696 44.3 -> 46.5 (2-core EPYC Zen 5, 150 interleaved rounds,
   medians). */
static void cg_dot4_x4(const int8_t *w, int64_t k, const int8_t *qe, const int8_t *qo, const float *xs,
                       const int32_t *xsum, const void *ws, int64_t groups, int bf16, int64_t per_group,
                       int64_t near_tile, float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(0x08);
    int64_t stride = k / 2, blocks = k / 128, scale_bytes = 4 * groups * (bf16 ? 2 : 4);
    int near = 4 * stride <= near_tile;
    __m512 acc[4];
    float cs[4][16];
    for (int64_t o = 0; o < scale_bytes; o += 64) _mm_prefetch((const char *)ws + scale_bytes + o, _MM_HINT_T0);
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        int64_t span = blocks - b0 < 16 ? blocks - b0 : 16;
        __mmask16 m = (__mmask16)((1u << span) - 1u);
        __m512 xv = _mm512_maskz_loadu_ps(m, xs + b0);
        __m512 corr = _mm512_mul_ps(_mm512_set1_ps(-8.f), _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, xsum + b0)));
        for (int r = 0; r < 4; r++) {
            __m512 c = _mm512_mul_ps(xv, cg_block_scales(ws, bf16, r * groups, b0, span, per_group));
            _mm512_storeu_ps(cs[r], c);
            acc[r] = _mm512_fmadd_ps(c, corr, acc[r]);
        }
        for (int64_t c = 0; c < span; c++) {
            int64_t b = b0 + c;
            __m512i ev = _mm512_loadu_si512((const void *)(qe + b * 64));
            __m512i od = _mm512_loadu_si512((const void *)(qo + b * 64));
            for (int r = 0; r < 4; r++) {
                /* int4 rows are half as long: without a prefetch 8 blocks ahead the four
                   streams ran at 16 GB/s against 21 (2-core Xeon). */
                _mm_prefetch((const char *)(near ? w + 4 * stride + b * 256 + r * 64 : w + r * stride + b * 64 + 512),
                             _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512((const void *)(w + r * stride + b * 64));
                __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low, eight, 0x6A);
                __m512i lo = _mm512_ternarylogic_epi32(v, low, eight, 0x6A);
                __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, ev), lo, od);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(cs[r][c]), acc[r]);
            }
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* Four rows, blocks of 64 columns (bc = 64): a 64-byte vector holds two blocks, lanes 0-7 the
   first and 8-15 the second; a last half vector (k % 128 == 64) is loaded zero-extended. */
static void cg_dot4_x4_fine(const int8_t *w, int64_t k, const int8_t *qe, const int8_t *qo, const float *xs,
                            const int32_t *xsum, const void *ws, int64_t groups, int bf16, int64_t group,
                            int64_t near_tile, float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x88), low = _mm512_set1_epi8(0x0F);
    int64_t stride = k / 2, blocks = k / 64;
    int near = 4 * stride <= near_tile;
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 2) {
        int whole = b + 1 < blocks;
        int64_t g0 = b * 64 / group, g1 = whole ? (b + 1) * 64 / group : g0;
        __m512i ev, od, init;
        if (whole) {
            ev = _mm512_loadu_si512((const void *)(qe + b * 32));
            od = _mm512_loadu_si512((const void *)(qo + b * 32));
            init = cg_two_lanes(-8 * xsum[b], -8 * xsum[b + 1]);
        } else {
            ev = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(qe + b * 32)));
            od = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(qo + b * 32)));
            init = _mm512_zextsi128_si512(_mm_cvtsi32_si128(-8 * xsum[b]));
        }
        float x0 = xs[b], x1 = whole ? xs[b + 1] : 0.f;
        for (int r = 0; r < 4; r++) {
            const int8_t *row = w + r * stride + b * 32;
            _mm_prefetch((const char *)(near ? w + 4 * stride + b * 128 + r * 64 : row + 512), _MM_HINT_T0);
            __m512i raw = whole ? _mm512_loadu_si512((const void *)row)
                                : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)row));
            __m512i v = _mm512_xor_si512(raw, flip);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low), lo = _mm512_and_si512(v, low);
            __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, hi, ev), lo, od);
            __m512 s = cg_two_halves(x0 * cg_scale(ws, bf16, r * groups + g0), x1 * cg_scale(ws, bf16, r * groups + g1));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

/* float32 -> bfloat16, rounded to nearest even (as torch's conversion, for finite values). */
static inline uint16_t cg_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* The same for any value: a NaN becomes torch's 0x7FC0. */
static inline uint16_t cg_to_bf16_any(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : cg_to_bf16(f);
}

/* One row of bf16 activations x a bf16 weight [n, k]: y[n] = x . w[j] (+ bias[j]) in float32
   sums, each rounded once to bf16. With AVX512-BF16 (`vdpbf16ps`: pairs of bf16 products added
   into float32 lanes) one weight row at a time, 128 columns a step into four accumulators: each
   thread reads one sequential stream, which the hardware prefetcher follows best (a 2-core EPYC
   Zen 5, 27392x4096 / 4096x13696 / 4608x4096 / 4096x4096, interleaved rounds: 9-16 % faster
   than four rows at a time with software prefetch). Elsewhere plain C (correct, not fast). */
#if CG_PATH == 2 && defined(__AVX512BF16__)
#  define CG_BF16 1
#else
#  define CG_BF16 0
#endif
int cg_bf16_path(void) { return CG_BF16; }

void cg_gemv_bf16(const uint16_t *x, int64_t k, const uint16_t *w, int64_t n, const uint16_t *bias,
                  uint16_t *y, int threads) {
#if CG_BF16
    int64_t wide = k / 128 * 128, full = k / 32 * 32;
    __mmask32 tail = (__mmask32)((1ull << (k - full)) - 1ull);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *row = w + j * k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < wide; c += 128) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row + c), (__m512bh)_mm512_loadu_si512(x + c));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(row + c + 32), (__m512bh)_mm512_loadu_si512(x + c + 32));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(row + c + 64), (__m512bh)_mm512_loadu_si512(x + c + 64));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(row + c + 96), (__m512bh)_mm512_loadu_si512(x + c + 96));
        }
        for (int64_t c = wide; c < full; c += 32)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row + c), (__m512bh)_mm512_loadu_si512(x + c));
        if (tail)
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, row + full),
                                  (__m512bh)_mm512_maskz_loadu_epi16(tail, x + full));
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        y[j] = cg_to_bf16_any(sum + (bias ? cg_bf16(bias[j]) : 0.f));
    }
#else
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n; j++) {
        float acc = 0.f;
        for (int64_t i = 0; i < k; i++) acc += cg_bf16(w[j * k + i]) * cg_bf16(x[i]);
        y[j] = cg_to_bf16_any(acc + (bias ? cg_bf16(bias[j]) : 0.f));
    }
#endif
}

/* Prefill's dequantized weight in one pass over the bytes (eager ops take a conversion and a
   multiply, and int4 an unpacking), each value q * scale in float32 (out_bf16 0) or bfloat16
   rounded to nearest even (1), one scale of ws per (row_bytes / groups) bytes of a row:
   - bits 8, grouped int8 [n, row_bytes] -> even [n, row_bytes];
   - bits 4, THUDM's int4 [n, row_bytes] (column 2i in a byte's high nibble, 2i+1 in its low
     one, both signed) -> even [n, row_bytes] (the high nibbles) and odd (the low ones), bitwise
     _int4_halves' values.
   Output rows are `stride` elements apart. The compiler vectorises the inner loops for the CPU
   it builds for. */
void cg_dequant(int bits, const int8_t *w, int64_t n, int64_t row_bytes, const void *ws, int ws_bf16,
                int64_t groups, void *even, void *odd, int64_t stride, int out_bf16, int threads) {
    int64_t span = row_bytes / groups;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n; j++) {
        for (int64_t g = 0; g < groups; g++) {
            float s = cg_scale(ws, ws_bf16, j * groups + g);
            const int8_t *src = w + j * row_bytes + g * span;
            int64_t at = j * stride + g * span;
            if (bits == 8 && out_bf16) {
                uint16_t *e = (uint16_t *)even + at;
                for (int64_t i = 0; i < span; i++) e[i] = cg_to_bf16((float)src[i] * s);
            } else if (bits == 8) {
                float *e = (float *)even + at;
                for (int64_t i = 0; i < span; i++) e[i] = (float)src[i] * s;
            } else if (out_bf16) {
                uint16_t *e = (uint16_t *)even + at, *o = (uint16_t *)odd + at;
                for (int64_t i = 0; i < span; i++) {
                    e[i] = cg_to_bf16((float)(src[i] >> 4) * s);
                    o[i] = cg_to_bf16((float)(((src[i] & 15) ^ 8) - 8) * s);
                }
            } else {
                float *e = (float *)even + at, *o = (float *)odd + at;
                for (int64_t i = 0; i < span; i++) {
                    e[i] = (float)(src[i] >> 4) * s;
                    o[i] = (float)(((src[i] & 15) ^ 8) - 8) * s;
                }
            }
        }
    }
}

/* The benchmark's read yardstick (chatglm_bench.hardware): one pass over `rows` rows of `row`
   bytes (a multiple of 64), read as the tiles above read a weight: four rows at a time, all
   threads, the next tile prefetched when it is at most `near_tile` bytes. Returns the sum of
   the bytes (unsigned), so that none is skipped and a test can check the pass. */
int64_t cg_stream_read(const int8_t *p, int64_t rows, int64_t row, int64_t near_tile, int threads) {
    int64_t total = 0;
    int near = 4 * row <= near_tile;
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int64_t t = 0; t < rows / 4; t++) {
        const int8_t *w = p + 4 * t * row;
#if CG_PATH == 2
        const __m512i zero = _mm512_setzero_si512();
        __m512i acc = zero;
        for (int64_t b = 0; b < row / 64; b++) {
            if (near)
                for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(w + 4 * row + b * 256 + r * 64), _MM_HINT_T0);
            for (int r = 0; r < 4; r++) /* eight byte sums per vector, in 64-bit lanes */
                acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_loadu_si512((const void *)(w + r * row + b * 64)), zero));
        }
        total += _mm512_reduce_add_epi64(acc);
#else
        (void)near;
        const uint8_t *u = (const uint8_t *)w;
        int64_t s = 0;
        for (int64_t i = 0; i < 4 * row; i++) s += u[i];
        total += s;
#endif
    }
    return total;
}

/* y[m, n] = x[m, k] . dequantized(w)[n, k]^T, activations quantized per block; 0 on success. */
int cg_gemm(int bits, const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n,
            const void *ws, int ws_bf16, int64_t group, float *y, int64_t near_tile, int narrow,
            int threads) {
    (void)near_tile; /* read by the AVX-512 tiles only */
    if (k % 64 || group % (bits == 8 ? 32 : 64) || k % group) return 1;
    int64_t block = bits == 8 ? 32 : (k % 128 || group % 128 ? 64 : 128), blocks = k / block;
    int8_t *q = (int8_t *)malloc((size_t)(m * k));
    float *xs = (float *)malloc((size_t)(m * blocks) * sizeof(float));
    int32_t *xsum = (int32_t *)malloc((size_t)(m * blocks) * sizeof(int32_t));
    if (!q || !xs || !xsum) { free(q); free(xs); free(xsum); return 2; }
    for (int64_t r = 0; r < m; r++)
        cg_quantize_row(x + r * k, k, block, bits == 4, q + r * k, xs + r * blocks, xsum + r * blocks);
    int64_t groups = k / group, row_bytes = bits == 8 ? k : k / 2;
    /* Rows [0, tile * tiles) go `tile` at a time (see _dot_tiles): int4 with a scale per
       128-column block 8 (cg_dot4_x8) or, `narrow`, 4; int8 4 or, `narrow`, 2; else four. */
    int64_t tile = bits == 4 && block == 128 && group == 128 ? (narrow ? 4 : 8) : (bits == 8 && narrow ? 2 : 4);
    int64_t tiles = CG_PATH == 2 ? n / tile : 0;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tiles + (n - tile * tiles); t++) {
        int64_t j = t < tiles ? tile * t : tile * tiles + (t - tiles);
        int64_t count = t < tiles ? tile : 1;
        const char *row_scale = (const char *)ws + j * groups * (ws_bf16 ? 2 : 4);
        for (int64_t r = 0; r < m; r++) {
            const int8_t *qr = q + r * k;
            float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#if CG_PATH == 2
            const float *xr = xs + r * blocks;
            const int32_t *sr = xsum + r * blocks;
            const int8_t *wj = w + j * row_bytes;
            if (count == 8) {
                cg_dot4_x8(wj, k, qr, qr + k / 2, xr, sr, row_scale, groups, ws_bf16, 4 * row_bytes <= near_tile, v);
            } else if (count == 2) {
                cg_dot8_x2(wj, k, qr, xr, sr, row_scale, ws_bf16, group, near_tile, v);
            } else if (count == 4) {
                if (bits == 8) cg_dot8_x4(wj, k, qr, xr, sr, row_scale, ws_bf16, group, near_tile, v);
                else if (block == 128)
                    cg_dot4_x4(wj, k, qr, qr + k / 2, xr, sr, row_scale, groups, ws_bf16, group / 128, near_tile, v);
                else cg_dot4_x4_fine(wj, k, qr, qr + k / 2, xr, sr, row_scale, groups, ws_bf16, group, near_tile, v);
            } else if (bits == 4 && block == 128) {
                v[0] = cg_dot4(wj, qr, qr + k / 2, xr, sr, row_scale, ws_bf16, group, k);
            } else if (bits == 8) {
                cg_dot8_rows(1, wj, k, qr, xr, sr, row_scale, ws_bf16, group, near_tile, v);
            } else
#endif
            {
                if (bits == 8)
                    v[0] = cg_dot8(w + j * row_bytes, qr, xs + r * blocks, xsum + r * blocks, row_scale, ws_bf16, group, k);
                else v[0] = cg_dot4_any(w + j * row_bytes, qr, qr + k / 2, xs + r * blocks, xsum + r * blocks,
                                        row_scale, ws_bf16, group, k, block);
            }
            for (int64_t i = 0; i < count; i++)
                y[r * n + j + i] = bits == 8 && groups == 1 ? v[i] * cg_scale(ws, ws_bf16, j + i) : v[i];
        }
    }
    free(q); free(xs); free(xsum);
    return 0;
}
"""

# The widths the cpu_dot kernel takes: int8 and int4 layers whose in_features (and, int4, scale
# group) are multiples of 64 columns.
_NATIVE_DOT_WIDTH = 64


def _native_dot_block(bits: int, in_features: int, group: int) -> int:
    """Columns of the activation the cpu_dot kernel rounds with one scale: int8 32 (llama.cpp
    Q8_0's block); int4 128 (one 64-byte vector of packed weights), or 64 where the width or the
    scale group is not a multiple of 128 (e.g. ffn 2752 with groups of 64)."""
    if bits == 8:
        return 32
    return 64 if in_features % 128 or group % 128 else 128


class _NativeDot:
    """The C kernel of ``cpu_dot``: built once per process with the system's C compiler ($CC,
    else cc) for this CPU (``-march=native``, OpenMP: the same libgomp torch loaded) into a
    private temporary directory, loaded, and the directory removed. Where that fails, ``failure``
    says why (auto then uses ``cpu``)."""

    lib = None
    failure: Optional[str] = None

    @staticmethod
    def build(defines: Tuple[str, ...] = ()):
        """Compile and load the kernel (``defines``: e.g. ``("CG_PATH=1",)``, the tests' way to
        run each instruction-set path); returns the library, or raises RuntimeError in one line."""
        import shutil
        import subprocess
        import tempfile

        compiler = os.environ.get("CC") or "cc"
        directory = tempfile.mkdtemp(prefix="chatglm3-dot-")
        try:
            source, library = os.path.join(directory, "dot.c"), os.path.join(directory, "dot.so")
            with open(source, "w") as f:
                f.write(_NATIVE_DOT_SOURCE)
            flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *[f"-D{d}" for d in defines]]
            try:
                done = subprocess.run(
                    [compiler, *flags, source, "-o", library], capture_output=True, text=True, timeout=300
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeError(
                    f"the C compiler {compiler!r} did not run ({type(exc).__name__}: {exc})"
                ) from None
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise RuntimeError(f"{compiler} failed: {first}")
            try:
                lib = ctypes.CDLL(library)
            except OSError as exc:
                raise RuntimeError(f"the built kernel did not load: {exc}") from None
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        lib.cg_path.restype = ctypes.c_int
        lib.cg_gemm.restype = ctypes.c_int
        lib.cg_dequant.restype = None
        lib.cg_bf16_path.restype = ctypes.c_int
        lib.cg_gemv_bf16.restype = None
        lib.cg_stream_read.restype = ctypes.c_int64
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.cg_gemm.argtypes = [
            ctypes.c_int,
            ptr,
            i64,
            i64,
            ptr,
            i64,
            ptr,
            ctypes.c_int,
            i64,
            ptr,
            i64,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.cg_dequant.argtypes = [
            ctypes.c_int,
            ptr,
            i64,
            i64,
            ptr,
            ctypes.c_int,
            i64,
            ptr,
            ptr,
            i64,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.cg_gemv_bf16.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ctypes.c_int]
        lib.cg_stream_read.argtypes = [ptr, i64, i64, i64, ctypes.c_int]
        return lib

    @classmethod
    def load(cls):
        """The process's kernel library, built at the first call; None where it cannot be."""
        if cls.lib is None and cls.failure is None:
            try:
                cls.lib = cls.build()
            except RuntimeError as exc:
                cls.failure = str(exc)
                # Once per process: auto then runs torch's (slower) kernels, and should say why.
                logger.warning(
                    f"our C kernels (quant_kernel cpu_dot, linear_backend dot) are unavailable here "
                    f"({cls.failure}); torch's kernels run instead (install a C compiler with OpenMP, "
                    "e.g. gcc, for the faster int8/int4 and bf16 decode)"
                )
        return cls.lib

    @classmethod
    def vectorised(cls) -> bool:
        """Whether the kernel built here uses AVX-512 VNNI dot products (auto picks it then)."""
        lib = cls.load()
        return lib is not None and lib.cg_path() == 2

    @classmethod
    def bf16_vectorised(cls) -> bool:
        """Whether its bf16 kernel (linear_backend 'dot') uses AVX512-BF16 here."""
        lib = cls.load()
        return lib is not None and lib.cg_bf16_path() == 1


def native_stream_read(buffer: torch.Tensor, row_bytes: int = 4096) -> Optional[int]:
    """One pass over ``buffer`` (a contiguous CPU tensor of a whole number of four-row tiles of
    ``row_bytes``) read as the int8 ``cpu_dot`` kernel streams a weight (``cg_stream_read``): the
    benchmark's read yardstick. Returns the bytes' sum, or None where the library is not built."""
    lib = _NativeDot.load()
    if lib is None:
        return None
    if not buffer.is_contiguous() or buffer.device.type != "cpu" or row_bytes % 64:
        raise ValueError(
            "native_stream_read takes a contiguous CPU tensor and rows of a multiple of 64 bytes"
        )
    nbytes = buffer.numel() * buffer.element_size()
    rows = nbytes // row_bytes // 4 * 4
    return lib.cg_stream_read(
        buffer.data_ptr(), rows, row_bytes, _dot_prefetch_tile(), torch.get_num_threads()
    )


def _native_dot_gemm(lib, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int, group: int):
    """``lib``'s product: x [m, in] (any float dtype) against the stored layer, fp32 [m, out]."""
    x = x.float().contiguous()
    out = x.new_empty(x.shape[0], weight.shape[0])
    if x.shape[0] == 0:  # an empty batch: nothing to compute (and no zero-byte allocation in C)
        return out
    status = lib.cg_gemm(
        bits,
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        weight.data_ptr(),
        weight.shape[0],
        scale.data_ptr(),
        int(scale.dtype == torch.bfloat16),
        group,
        out.data_ptr(),
        _dot_prefetch_tile(),
        int(_dot_tiles() == "narrow"),
        torch.get_num_threads(),
    )
    if status:
        raise RuntimeError(f"the cpu_dot kernel refused its operands (status {status}: shapes or memory)")
    return out


def _native_dot_op(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int, group: int
) -> torch.Tensor:
    # The op is registered by the first import of this file in the process (see _opaque_op), whose
    # _NativeDot may not have built the library yet: load() builds it on demand.
    lib = _NativeDot.load()
    if lib is None:
        raise RuntimeError(_native_dot_error())
    return _native_dot_gemm(lib, x, weight, scale, bits, group)


_NATIVE_DOT = _opaque_op(
    "native_dot",
    _native_dot_op,
    lambda x, weight, scale, bits, group: x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32),
)


class _CpuDotKernel:
    """int8 activations x int8 / int4 weights in integer dot products (AVX-512 VNNI ``vpdpbusd``,
    else AVX2, else plain C: ``_NATIVE_DOT_SOURCE``), what llama.cpp's Q8_0 / Q4_0 do, on the
    stored THUDM layout itself (no repacked copy). Each row of ``x`` is quantized to int8 per
    block (``_native_dot_block``: int8 32 columns, int4 128 or 64, inside a scale group),
    absmax / 127, rounded to nearest even; the block's integer sum is scaled once. From
    ``_CPU_GEMV_MAX_ROWS`` rows (prefill) the weight is dequantized for an ordinary GEMM, as in
    ``_CpuKernel``.

    Takes layers whose in_features (and int4 scale group, or per channel) are multiples of 64;
    ``QuantizedLinear.select_kernel`` gives any other layer the ``cpu`` kernel."""

    @staticmethod
    def takes(layer) -> bool:
        group = layer.group_size or layer.in_features
        group_unit = _NATIVE_DOT_WIDTH if layer.bits == 4 else _native_dot_block(8, layer.in_features, group)
        return layer.in_features % _NATIVE_DOT_WIDTH == 0 and group % group_unit == 0

    @staticmethod
    def prepare(layer, dtype):
        if _NativeDot.load() is None:
            raise RuntimeError(_native_dot_error())
        _check_dot_settings()
        half = _cpu_half_prefill()
        layer.weight.data = layer.weight.data.contiguous()
        scale = layer.weight_scale.data
        if scale.dtype not in (torch.float32, torch.bfloat16):
            scale = scale.float()
        scale = scale.contiguous()
        group = layer.group_size or layer.in_features
        mode = _resolve_int4_dequant(layer.int4_dequant) if layer.bits == 4 else "eager"
        # Prefill (64 rows and more) dequantizes for a GEMM, as the cpu kernel does: a half GEMM
        # where that is the faster (_cpu_half_prefill), else fp32 (on an AVX2 CPU unpacking plus an fp32 GEMM
        # measured as fast as torch's int4 kernel). An int4 layer whose unpacking runs in eager
        # ops on AMX (44 ms for 4096x4096) keeps the dot kernel for its rows instead.
        dequantize_prefill = layer.bits == 8 or mode != "eager" or not _cpu_has_amx()
        gemm_dtype = None if half else torch.float32
        return (scale, group, mode, gemm_dtype, dequantize_prefill)

    @staticmethod
    def matmul(layer, x):
        scale, group, mode, gemm_dtype, dequantize_prefill = layer._kernel_state
        if x.shape[0] >= _CPU_GEMV_MAX_ROWS and dequantize_prefill:
            return _dequantized_gemm(layer, x, gemm_dtype or x.dtype, mode)
        # Eager calls the kernel itself: even a light op dispatch costs more than a small layer.
        product = _NATIVE_DOT if _is_compiling() else _native_dot_op
        return product(x, layer.weight, scale, layer.bits, group).to(x.dtype)


def _native_dot_error(source: str = "quant_kernel", value: str = "cpu_dot") -> str:
    other = "CHATGLM_QUANT_KERNEL=cpu" if value == "cpu_dot" else "CHATGLM_LINEAR=aten (or auto)"
    return (
        f"{source}={value!r} builds a C kernel at first use, which failed here "
        f"({_NativeDot.failure}); install a C compiler with OpenMP (gcc) or set {other}"
    )


def _tinygemm_tiles(layer) -> Optional[int]:
    for tiles in (8, 4, 2):
        if layer.in_features % (tiles * 16) == 0 and layer.out_features % 8 == 0:
            return tiles
    return None


class _CudaKernel:
    """int4: ``torch._weight_int4pack_mm`` (tinygemm, bf16 activations); int8 and int4 shapes
    tinygemm cannot take: dequantize then matmul, which inductor fuses into one kernel in graph
    mode (gpt-fast's recipe). Written from the ops' documented contracts; not yet run on a GPU."""

    GROUPS = (256, 128, 64, 32)

    @staticmethod
    def prepare(layer, dtype):
        if layer.bits == 8:  # grouped int8: the reference path (dequantize, then a matmul)
            return (layer.weight_scale.to(dtype),) if layer.weight_scale.dim() == 1 else ()
        group, tiles = _divisor_group(layer, _CudaKernel.GROUPS), _tinygemm_tiles(layer)
        if group is None or tiles is None:
            return ()
        nibbles = _int4_to_unsigned_nibbles(unpack_int4(layer.weight) + 8)
        packed_u8 = ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).contiguous()
        packed = torch._convert_weight_to_int4pack(packed_u8, tiles)
        scales = _scales_per_group(layer, group).t().contiguous()
        scales_and_zeros = torch.stack((scales, torch.zeros_like(scales)), dim=-1).to(torch.bfloat16)
        return (packed, scales_and_zeros, group)

    @staticmethod
    def matmul(layer, x):
        state = layer._kernel_state
        if not state:
            return _MathKernel.matmul(layer, x)
        if layer.bits == 8:
            return F.linear(x, layer.weight.to(x.dtype)) * state[0]
        packed, scales_and_zeros, group = state
        out = torch._weight_int4pack_mm(x.to(torch.bfloat16), packed, group, scales_and_zeros)
        return out.to(x.dtype)


class _NpuKernel:
    """``torch_npu.npu_weight_quant_batchmatmul`` (W8A16 / W4A16): y = x @ ((w + offset) * scale),
    weight [in, out] (int8, or int32 carrying 8 int4 from ``npu_convert_weight_to_int4pack``),
    scale [out] per channel or [in // group, out] per group (group a multiple of 32 below in)."""

    @staticmethod
    def prepare(layer, dtype):
        npu = _require_torch_npu("the npu quantized-matmul kernel")
        if layer.bits == 8:
            # The transposed view of our [out, in] weight is the documented fast per-channel
            # input; per-group int8 takes the same [in, out] weight (Atlas A2/A3).
            packed = layer.weight.t()
        else:
            values = unpack_int4(layer.weight).to(torch.int32).t().contiguous()  # [in, out]
            packed = npu.npu_convert_weight_to_int4pack(values)
        if layer.weight_scale.dim() == 1:
            return (packed, layer.weight_scale.to(dtype), 0)
        group = layer.group_size
        if group % 32 or group >= layer.in_features:
            raise ValueError(
                f"npu_weight_quant_batchmatmul needs a group size that is a multiple of 32 below "
                f"in_features ({layer.in_features}), not {group}; quantize with {'int8_' if layer.bits == 8 else ''}group_size=128"
            )
        return (packed, layer.weight_scale.t().contiguous().to(dtype), group)

    @staticmethod
    def matmul(layer, x):
        weight, scale, group = layer._kernel_state
        return _TORCH_NPU.npu_weight_quant_batchmatmul(x, weight, scale, antiquant_group_size=group)


# The one place quantized-matmul kernels are chosen from (read-only).
QUANT_KERNELS: Mapping[str, Any] = MappingProxyType(
    {
        "cpu": _CpuKernel,
        "cpu_w8a8": _CpuDynamicInt8Kernel,
        "cpu_dot": _CpuDotKernel,
        "cuda": _CudaKernel,
        "npu": _NpuKernel,
        "math": _MathKernel,
    }
)


def _quant_kernel_available(name: str, bits: int) -> bool:
    if name == "cpu_w8a8":
        return bits == 8 and _onednn_int8_linear_present()
    if name == "cpu_dot":
        return _NativeDot.load() is not None
    if name == "cpu":
        ops = (
            ("_weight_int8pack_mm",)
            if bits == 8
            else ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
        )
        return all(hasattr(torch, op) for op in ops)
    if name == "cuda":
        return bits == 8 or (
            hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")
        )
    if name == "npu":
        return _TORCH_NPU is not None and hasattr(_TORCH_NPU, "npu_weight_quant_batchmatmul")
    return True


def _cpu_dot_auto(bits: int, grouped: bool = False) -> bool:
    """Whether auto picks ``cpu_dot`` here. int4 layers: where its kernel builds with AVX-512
    VNNI. Measured on a 2-core Xeon (27392x4096, one row, several runs): 19-21 GB/s against
    14.5-16 for torch's kernel, at about the same accuracy (teacher-forced decode, mean logits
    cosine against fp32: 0.94810 against 0.94838 on a 4-layer hidden-1024 checkpoint). Its AVX2
    path read less than torch's kernel on that CPU (6.5 GB/s) and is not measured on an AVX2-only
    CPU, so auto keeps ``cpu`` there. Grouped int8 layers (the default): wherever it builds, as
    torch has no kernel for their scales (``cpu`` dequantizes them per call). Per-channel int8
    (THUDM's layout) stays on weight-only ``cpu``: ``cpu_dot`` is faster (25-27 against 23 GB/s
    per layer) but its int8 activations cost a visible share of that layout's error (0.99935
    against 0.99949)."""
    if bits == 8 and grouped:
        return _NativeDot.load() is not None
    return bits == 4 and _NativeDot.vectorised()


def resolve_quant_kernel(
    option: Optional[str], device: torch.device, dtype: torch.dtype, bits: int, grouped: bool = False
) -> str:
    """The kernel name for ``option`` (config ``quant_kernel`` > CHATGLM_QUANT_KERNEL > auto) and
    ``bits``-bit layers (``grouped``: scales per group of input columns)."""
    option, source = _layer_option("quant_kernel", option)
    kind = device.type
    if option == "auto":
        if kind == "npu" and dtype not in _NPU_KERNEL_DTYPES:
            return "math"
        if kind == "cpu" and _cpu_dot_auto(bits, grouped):
            return "cpu_dot"
        return kind if kind in QUANT_KERNELS and _quant_kernel_available(kind, bits) else "math"
    # Like the attention backends, an explicit "npu" runs wherever torch_npu imports (the tests
    # run it on CPU against tests/npu_reference.py); cpu and cuda need their own device.
    home = option.split("_")[0]
    if home in ("cpu", "cuda") and home != kind:
        raise ValueError(
            f"{source}={option!r} runs on {home} tensors but the model is on {kind}; "
            "use auto (or math, the reference that runs anywhere)"
        )
    if option == "cpu_w8a8" and bits != 8:
        raise ValueError(f"{source}='cpu_w8a8' is an int8 kernel; use cpu (or auto) for {bits}-bit layers")
    if option == "cpu_dot" and _NativeDot.load() is None:
        raise RuntimeError(_native_dot_error(source))
    if not _quant_kernel_available(option, bits):
        raise RuntimeError(
            f"{source}={option!r} needs a kernel this torch {torch.__version__} lacks "
            f"({bits}-bit); upgrade torch (torch_npu on Ascend) or set CHATGLM_QUANT_KERNEL=math"
        )
    if option == "npu" and dtype not in _NPU_KERNEL_DTYPES:
        raise TypeError(
            "the npu quantized-matmul kernel takes float16/bfloat16 activations; load the model "
            "with torch_dtype=torch.float16 or set CHATGLM_QUANT_KERNEL=math"
        )
    return option


class QuantizedLinear(nn.Module):
    """Weight-only int8/int4 drop-in for ``nn.Linear`` (same call: ``y = layer(x)``).

    Holds the stored layout described above; ``select_kernel`` (called by the model when it
    knows the device and dtype, or at the first call) derives the chosen kernel's operands.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 0,
        bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedLinear supports 8 or 4 bits, not {bits!r}")
        group_size = int(group_size or 0)
        if (bits == 4 and in_features % 2) or (group_size and in_features % group_size):
            raise ValueError(
                f"int{bits} needs an in_features ({in_features}){' that is even and' if bits == 4 else ''} "
                f"divisible by the group size ({group_size}); pass a group_size that divides it "
                "(e.g. 32), or 0 for per-channel"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features * bits // 8, dtype=torch.int8, device=device),
            requires_grad=False,
        )
        scale_shape = (out_features, in_features // group_size) if group_size else (out_features,)
        self.weight_scale = nn.Parameter(
            torch.empty(scale_shape, dtype=dtype, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self.kernel_option: Optional[str] = None  # None: CHATGLM_QUANT_KERNEL, else auto
        self.int4_dequant: Optional[str] = None  # None: CHATGLM_INT4_DEQUANT, else auto
        self.scratch = DequantScratch()
        self.kernel_name: Optional[str] = None
        self._kernel_key = None
        self._kernel_state: tuple = ()
        self._kernel_matmul = None

    @classmethod
    def from_linear(
        cls, linear: nn.Module, bits: int, group_size: int = 0, empty_init: bool = False, device=None
    ):
        weight = linear.weight
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            bits,
            group_size,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        if not empty_init:
            q, scale = quantize_weight(weight, bits, layer.group_size)
            with torch.no_grad():
                layer.weight.copy_(q)
                layer.weight_scale.copy_(scale)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        return layer if device is None else layer.to(device)

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per-channel"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {group}"

    def select_kernel(self, device: torch.device, dtype: torch.dtype, name: Optional[str] = None) -> None:
        """Choose the kernel for activations of ``dtype`` on ``device`` (``name``: the model's
        resolved ``backends.quant_kernel``) and prepare its operands (repacking happens only
        when the choice, the device or the stored weight changed)."""
        name = name or resolve_quant_kernel(
            self.kernel_option, device, dtype, self.bits, self.weight_scale.dim() == 2
        )
        if name == "cpu_dot" and not _CpuDotKernel.takes(self):
            name = "cpu"  # a width or group its blocks do not divide (see _CpuDotKernel)

        def key():
            stored = (self.weight, self.weight_scale)
            return (name, device, dtype, self.int4_dequant, *[(t.data_ptr(), t._version) for t in stored])

        if key() == self._kernel_key:
            return
        with torch.no_grad():
            self._kernel_state = QUANT_KERNELS[name].prepare(self, dtype)
        # Taken after prepare, which may have realigned the stored weight.
        self.kernel_name, self._kernel_matmul, self._kernel_key = name, QUANT_KERNELS[name].matmul, key()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # THUDM's int4 checkpoints hold one scale per output channel; a grouped layer takes it
        # repeated over its groups (exact: the same w = q * scale).
        scale = state_dict.get(prefix + "weight_scale")
        if scale is not None and scale.dim() == 1 and self.weight_scale.dim() == 2:
            state_dict[prefix + "weight_scale"] = scale[:, None].expand(self.weight_scale.shape).contiguous()
        self._kernel_key = self._kernel_matmul = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_matmul is None:  # used outside ChatGLMModel, or reloaded since
            self.select_kernel(x.device, x.dtype)
        out = self._kernel_matmul(self, x.reshape(-1, self.in_features))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


_INT4_MIN_GROUP = 32  # the smallest group the int4 kernels take (cpu, cuda: 32..256; npu: k * 32)


def _int4_kernels_take(linear) -> bool:
    """Whether an int4 kernel takes this layer's input width (a multiple of the smallest group)."""
    return linear.in_features % _INT4_MIN_GROUP == 0


def _default_group_size(widths, bits: int = 4) -> int:
    """int4: QUANT_GROUP_SIZE, or the largest smaller power of two (>= 32) dividing every width;
    int8: INT8_GROUP_SIZE, or the smallest larger one (<= 128) likewise."""
    for group in (QUANT_GROUP_SIZE, 64, 32) if bits == 4 else (INT8_GROUP_SIZE, 64, 128):
        if all(width % group == 0 for width in widths):
            return group
    return 0  # per output channel


def _group_size_argument(name: str, value) -> None:
    if value is not None and (not _is_int(value) or value < 0):
        raise ValueError(
            f"quantize({name}={value!r}): use a positive integer dividing every such layer's "
            "input width (e.g. 128, 64, 32), or 0 for one scale per output channel"
        )


# The linear layers quantize() replaces in every GLMBlock, as in THUDM's quantization.py.
_QUANTIZED_BLOCK_LINEARS = (
    ("self_attention", "query_key_value"),
    ("self_attention", "dense"),
    ("mlp", "dense_h_to_4h"),
    ("mlp", "dense_4h_to_h"),
)


def _output_layer_bits(bits: int, output_layer) -> int:
    """Bits of the output layer for ``quantize(bits, output_layer=...)``. None (default) is int8
    for both widths: under int4 blocks it is the layer a decode step reads most of after them
    (the 6B vocabulary: 266 M weights, in bf16 15 % of int4's bytes per token), and int8 per
    channel adds a small fraction of int4's logits error (llama.cpp too keeps this tensor wider
    than Q4_0). True: the blocks' bits; False: unquantized (THUDM's int4 layout); 8: int8."""
    if output_layer is None:
        return 8
    if isinstance(output_layer, bool):
        return bits if output_layer else 0
    if _is_int(output_layer) and output_layer == 8:
        return 8
    raise ValueError(
        f"quantize(output_layer={output_layer!r}): use True (the blocks' bits), False (unquantized) "
        "or 8 (int8), or leave it out (int8)"
    )


def quantize_model(
    model,
    bits: int,
    empty_init: bool = False,
    device=None,
    output_layer: Any = None,
    group_size: Optional[int] = None,
    int8_group_size: Optional[int] = None,
):
    """``ChatGLMForConditionalGeneration.quantize``: replace the block linears (and the output
    layer, int8 by default) of ``model`` by :class:`QuantizedLinear` layers in place; returns
    ``model``."""
    if bits == 0:
        return model
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"quantize(bits={bits!r}): use 8 or 4 (weight-only int8/int4), or 0 for none")
    if model.quantized:
        if model.config.quantization_bit == bits:
            logger.info("Already quantized.")
            return model
        raise ValueError(
            f"the model is already quantized to {model.config.quantization_bit} bits; reload the "
            f"unquantized checkpoint to quantize it to {bits}"
        )
    output_bits = _output_layer_bits(bits, output_layer)
    targets = [
        (block, names) for block in model.transformer.encoder.layers for names in _QUANTIZED_BLOCK_LINEARS
    ]
    if bits == 4:
        _group_size_argument("group_size", group_size)
    _group_size_argument("int8_group_size", int8_group_size)
    for block, (parent_name, name) in targets:
        linear = getattr(getattr(block, parent_name), name)
        if not isinstance(linear, nn.Linear) or isinstance(linear, ShardedLinear):
            raise TypeError(
                f"quantize() found {type(linear).__name__} at {parent_name}.{name}, not a plain nn.Linear "
                "(e.g. after DeepSpeed AutoTP sharding); quantize before sharding is not "
                "supported either: run quantized models on one rank"
            )
    # A width no int4 kernel takes stays int8 (llama.cpp likewise keeps such a tensor in a wider
    # format): decided from the shapes alone, so a saved model reloads with the same layout.
    int8_names = sorted(
        {
            f"{p}.{n}"
            for b, (p, n) in targets
            if bits == 4 and not _int4_kernels_take(getattr(getattr(b, p), n))
        }
    )
    if output_bits == 4 and not _int4_kernels_take(model.transformer.output_layer):
        int8_names.append("output_layer")
    if int8_names:
        logger.warning(
            f"quantize(4): {', '.join(int8_names)} stay int8: no int4 kernel takes their input "
            f"width (it must be a multiple of {_INT4_MIN_GROUP}); every other layer is int4"
        )

    def layer_bits(parent_name, name):
        return 8 if f"{parent_name}.{name}" in int8_names else bits

    output_layer_bits = 8 if "output_layer" in int8_names else output_bits
    layers = [(f"{p}.{n}", getattr(getattr(b, p), n), layer_bits(p, n)) for b, (p, n) in targets]
    if output_bits:
        layers.append(("output_layer", model.transformer.output_layer, output_layer_bits))
    groups = {}
    for layer_bits_, argument, name in (
        (4, group_size, "group_size"),
        (8, int8_group_size, "int8_group_size"),
    ):
        widths = [linear.in_features for _, linear, b in layers if b == layer_bits_]
        groups[layer_bits_] = group = (
            0
            if bits == 8 and layer_bits_ == 4
            else (_default_group_size(widths, layer_bits_) if argument is None else int(argument))
        )
        for label, linear, b in layers:
            if b == layer_bits_ and group and linear.in_features % group:
                raise ValueError(
                    f"{name}={group} does not divide {label}'s in_features ({linear.in_features}); "
                    f"pass one that does (e.g. 32), or 0 for per-channel"
                )
    scratch = DequantScratch()  # one prefill buffer for the whole model
    option = getattr(model.config, "quant_kernel", None)
    huge_pages = _layer_option("huge_pages", getattr(model.config, "huge_pages", None))[0] != "off"

    def convert(linear, layer_bits):
        layer = QuantizedLinear.from_linear(
            linear, layer_bits, groups[layer_bits], empty_init=empty_init, device=device
        )
        layer.scratch, layer.kernel_option = scratch, option
        if huge_pages and not empty_init:  # a CPU layer's int8/int4 weight, streamed every step
            _into_huge_pages(layer.weight)
        return layer

    with torch.no_grad():
        for block, (parent_name, name) in targets:
            parent = getattr(block, parent_name)
            setattr(parent, name, convert(getattr(parent, name), layer_bits(parent_name, name)))
        if output_bits:
            model.transformer.output_layer = convert(model.transformer.output_layer, output_layer_bits)
    model.quantized = True
    model.config.quantization_bit = bits
    model.config.quantization_group_size = groups[4]
    model.config.quantization_int8_group_size = groups[8]
    # true: the blocks' bits; false: unquantized; 8: int8 under int4 blocks
    model.config.quantization_output_layer = True if output_bits == bits else (output_bits or False)
    model.transformer._backend_key = None  # kernels are chosen at the next forward
    return model
