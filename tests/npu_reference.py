"""CPU reference semantics for the torch_npu ops that the NPU branch of the model calls.

There is no NPU in CI, so the model's NPU branch runs on CPU against these functions, installed
as a stand-in ``torch_npu`` (and ``torchair``) module by :func:`install_fake_torch_npu`. Each op
follows its *documented* behaviour, written from the documentation alone, and rejects what the
documentation says the kernel rejects, so a call that would fail or misbehave on the device fails
here too. Each op is registered as an opaque ``torch.library`` custom op, exactly as the real
torch_npu ops are, so ``torch.compile(..., fullgraph=True)`` traces *over* it instead of into it:
shape and dtype checks run at trace time (in the fake kernel), value checks at run time.

Only the call surface modeling_chatglm.py uses is modelled (``_attention_npu``, ``_rmsnorm_npu``,
``_cache_write_npu``, ``_NpuKernel``): the two attention kernels in the BNSD layout with an
explicit bool mask (True = masked) or the compressed causal mode ``sparse_mode=3``, GQA through
``num_key_value_heads``, ``scale_value`` and the ``pre_tokens``/``next_tokens`` band;
``npu_rms_norm``; ``scatter_update_`` with one start per batch row; ``npu_weight_quant_batchmatmul``
and ``npu_convert_weight_to_int4pack``. Any other argument is a TypeError (an unknown keyword) or
a NotImplementedError naming it, so a new call in the model has to extend this file first.

Sources (read 2026-11; Chinese API pages of torch_npu, identical in substance across versions
except where noted):

- PFA ``npu_prompt_flash_attention``: Ascend/op-plugin ``docs/context/torch_npu-npu_prompt_flash_
  attention.md`` (commit 28212f9, = gitcode Ascend/op-plugin 7.3.0), hiascend.com Pytorch 7.0.0
  ``apiref/apilist/ptaoplist_000171.html``, 6.0.RC1 ``ptaoplist_000453.html``.
- IFA ``npu_incre_flash_attention``: Ascend/op-plugin ``docs/context/torch_npu-npu_incre_flash_
  attention.md`` (commit 312f5ee).
- the CANN "sparseMode介绍 / Introduction to Sparse Mode" page (ops-transformer
  ``docs/*/context/sparse_mode*``).
- ``npu_rms_norm``: hiascend.com Pytorch 7.0.0 ``ptaoplist_000860.html`` (rstd = 1/Rms(x)), the
  RmsNorm IR (rstd is float32 whatever x is) in the 6.0.RC3 tuning guide
  ``performance_tuning_0024.html``.
- ``scatter_update_``: Ascend/op-plugin ``docs/context/torch_npu-scatter_update_.md`` (commit
  5038c8c) and CANN ops-nn ``index/scatter/docs/aclnnInplaceScatterUpdate.md`` (the kernel behind
  it: scenarios 1 and 2, and the shape constraints).

Ambiguities and the reading chosen here:

1. PFA band anchoring when S_q != S_kv. sparse_mode 0 anchors the diagonal at the TOP-LEFT
   corner: query row i may see key column j iff ``i - pre_tokens <= j <= i + next_tokens``.
   sparse_mode 3 ("rightDownCausal", 以右顶点为划分的下三角) anchors it at the BOTTOM-RIGHT: row i
   sees j iff ``j <= i + S_kv - S_q``, so a chunk after a past sees the whole past. Evidence: the
   PFA doc's interception rules for int8 output give exactly the empty-row conditions of a
   top-left band for sparse_mode 0 and of a bottom-right band for sparse_mode 4. Consequence for
   callers: under sparse_mode 0 with a KV cache longer than the query, ``next_tokens=0`` hides
   the cache from row 0; pass a full mask with ``next_tokens=INT_MAX``, or use sparse_mode 3.
2. PFA with sparse_mode 0 and NO atten_mask ignores pre_tokens/next_tokens ("内部赋值为INT_MAX"):
   the default ``next_tokens=0`` is *not* causal on its own. Causality needs a mask.
3. With a mask under sparse_mode 0 both apply: a position is attended iff the mask says False AND
   it lies inside the pre/next band.
4. atten_mask True = masked (not attended), documented for IFA and implied for PFA by its
   formula (mask is added, upper triangle = -inf). The docs also allow int8/uint8 masks; the
   model passes bool, so only bool is modelled.
5. Mask shapes. PFA: (S_q, S_kv), (B, S_q, S_kv), (1, S_q, S_kv), (B, 1, S_q, S_kv),
   (1, 1, S_q, S_kv). IFA: (B, S_kv), (B, 1, S_kv), (B, 1, 1, S_kv). The docs allow the trailing
   dims to be padded up (for alignment), so a mask dim may exceed S_q / S_kv; only its leading
   [:S_q, :S_kv] part is read. Other shapes (e.g. a per-head mask) are rejected. sparse_mode 3
   needs the 2048x2048 "compressed" triangle (shape (2048, 2048), (1, 2048, 2048) or
   (1, 1, 2048, 2048), True above the diagonal); its content is checked and the real band made.
6. A row with nothing to attend to (fully masked) outputs zeros. The docs leave this to
   "row-invalid correction" (inner_precise 2/3 of the fused attention kernels) and say an empty
   key/value gives an all-zero output; zeros is that reading. The model must not depend on such
   rows.
7. GQA: KV head ``h // (num_heads // num_key_value_heads)`` serves query head h (consecutive
   query heads share a KV head), as ``repeat_interleave`` on the head axis.
8. Softmax and both matmuls run in float32; the output is cast to the query's dtype. On the
   device fp16 "high performance" mode (IFA inner_precise=1) may be less precise; tests compare
   with tolerances.
9. dtypes: the kernels take float16/bfloat16 (int8 only with quantisation, not modelled).
   ``ALLOW_FP32`` (a test convenience, see below) also lets float32 through so the CPU tests
   can compare against float32 goldens; npu_rms_norm accepts float32 anyway.
10. Contiguity: PFA says "不支持非连续的Tensor" for query/key/value and atten_mask; that is
    enforced. The torch_npu IFA page says nothing, but the kernel behind it (CANN ops-transformer
    ``aclnnIncreFlashAttentionV4``, parameter table) marks attenMask "Non-contiguous Tensor: ×",
    so IFA rejects a non-contiguous mask.
11. D alignment: PFA "暂不支持D不对齐场景"; so PFA needs head_dim % 16 == 0 (tiny test models must
    use head_dim 16, 32, ...).
12. npu_rms_norm normalises over the trailing ``gamma.dim()`` axes (gamma has the shape of x's
    last dims); rstd has x's leading dims and 1 for each normalised dim, float32. y is
    ``x * rstd * gamma`` computed in float32, cast to x's dtype once at the end. gamma must have
    x's dtype ("数据类型需要和self保持一致").
13. scatter_update_ with 1-D indices of length n: batch i of ``updates`` (its dim 0) is written
    into batch i of ``data`` at offset ``indices[i]`` along ``axis``, for the whole extent of
    updates along axis: ``data[i, ..., indices[i] + k, ...] = updates[i, ..., k, ...]``. 0-D
    indices act like shape (1,). The semantics of 2-D indices (shape (n, 2)) are not written
    down anywhere (CANN ops-nn issue #5483 says so), so they raise NotImplementedError. The
    device does not check bounds; the reference does, and raises.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import itertools
import math
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

# Test convenience, not kernel behaviour: the attention kernels only take float16/bfloat16, but
# the CPU suite compares the NPU branch with float32 goldens, so float32 is let through as well.
# Set it to False (monkeypatch) to check that a caller never hands the kernels float32.
ALLOW_FP32 = True

INT_MAX = 2147483647
COMPRESSED_MASK_SIZE = 2048
MAX_HEADS = 256
MAX_HEAD_DIM = 512
MAX_GQA_RATIO = 64
SPARSE_MODES = (0, 3)  # the explicit mask / the compressed rightDownCausal triangle

# One library namespace per import name, so importing this file twice under different module
# names does not register the same op twice.
_NS = __name__.replace(".", "_")

# Lists that record every op call while a stand-in is installed (see install_fake_torch_npu).
_RECORDERS: tuple[list[OpCall], ...] = ()


@dataclass(frozen=True)
class OpCall:
    """One executed call of a reference op: its torch_npu name and the static facts of the call."""

    name: str
    detail: dict


def _record(name: str, **detail: object) -> None:
    for calls in _RECORDERS:
        calls.append(OpCall(name, detail))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _unsupported(op: str, **arguments: object) -> None:
    for name, value in arguments.items():
        if value is not None:
            raise NotImplementedError(f"{op}: {name} is not modelled by the CPU reference")


def _kernel_dtypes() -> tuple[torch.dtype, ...]:
    return (torch.float16, torch.bfloat16) + ((torch.float32,) if ALLOW_FP32 else ())


# -------------------------------------------------------------------------- attention: checks


def _check_layout(op: str, input_layout: str) -> None:
    if input_layout != "BNSD":
        raise NotImplementedError(
            f"{op}: input_layout {input_layout!r} is not modelled (the model passes BNSD)"
        )


def _check_qkv(op: str, query, key, value, num_heads: int, num_key_value_heads: int) -> None:
    """BNSD query [B, N, S_q, D], key/value [B, N_kv, S_kv, D]: dtypes, heads and limits."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _require(t.dim() == 4, f"{op}: {name} must be 4-D (BNSD), got {tuple(t.shape)}")
    _require(key.shape == value.shape, f"{op}: key and value must have the same shape")
    dtypes = _kernel_dtypes()
    _require(query.dtype in dtypes, f"{op}: query dtype must be one of {dtypes}, got {query.dtype}")
    _require(
        key.dtype == query.dtype and value.dtype == query.dtype,
        f"{op}: query, key and value must share one dtype (int8 KV needs antiquant, not modelled)",
    )
    kv_heads = num_key_value_heads or num_heads
    _require(num_heads >= 1, f"{op}: num_heads must be >= 1")
    _require(
        num_heads % kv_heads == 0,
        f"{op}: num_heads ({num_heads}) must be divisible by num_key_value_heads ({kv_heads})",
    )
    _require(num_heads // kv_heads <= MAX_GQA_RATIO, f"{op}: num_heads / num_key_value_heads must be <= 64")
    _require(
        query.shape[1] == num_heads,
        f"{op}: num_heads ({num_heads}) must equal the query's N axis ({query.shape[1]})",
    )
    _require(
        key.shape[1] == kv_heads,
        f"{op}: num_key_value_heads ({kv_heads}) must equal the key's N axis ({key.shape[1]})",
    )
    _require(key.shape[0] == query.shape[0], f"{op}: key batch must equal query batch")
    _require(key.shape[3] == query.shape[3], f"{op}: key D must equal query D")
    _require(num_heads <= MAX_HEADS, f"{op}: N must be <= {MAX_HEADS}, got {num_heads}")
    _require(query.shape[3] <= MAX_HEAD_DIM, f"{op}: D must be <= {MAX_HEAD_DIM}, got {query.shape[3]}")


def _check_mask(op: str, mask: torch.Tensor, batch: int, q_len: int, kv_len: int, decode: bool) -> None:
    if mask.dtype != torch.bool:
        raise NotImplementedError(
            f"{op}: atten_mask dtype {mask.dtype} is not modelled (the model passes bool)"
        )
    _require(mask.is_contiguous(), f"{op}: non-contiguous atten_mask not supported")
    shape = tuple(mask.shape)
    if decode:
        ok = mask.dim() in (2, 3, 4) and shape[0] == batch and all(d == 1 for d in shape[1:-1])
        ok = ok and shape[-1] >= kv_len
        expected = "(B, S_kv), (B, 1, S_kv) or (B, 1, 1, S_kv)"
    else:
        ok = mask.dim() in (2, 3, 4) and shape[-2] >= q_len and shape[-1] >= kv_len
        if mask.dim() >= 3:
            ok = ok and shape[0] in (1, batch) and (mask.dim() == 3 or shape[1] == 1)
        expected = "(S_q, S_kv), (B|1, S_q, S_kv) or (B|1, 1, S_q, S_kv)"
    _require(
        ok, f"{op}: atten_mask shape must be {expected}, got {shape} (B={batch}, S_q={q_len}, S_kv={kv_len})"
    )


def _check_compressed_mask(op: str, mask: Optional[torch.Tensor]) -> None:
    size = COMPRESSED_MASK_SIZE
    _require(
        mask is not None
        and mask.dtype == torch.bool
        and tuple(mask.shape) in ((size, size), (1, size, size), (1, 1, size, size)),
        f"{op}: sparse_mode 3 needs the compressed bool atten_mask of shape (2048, 2048),"
        " (1, 2048, 2048) or (1, 1, 2048, 2048)",
    )
    _require(mask.is_contiguous(), f"{op}: non-contiguous atten_mask not supported")


def _pfa_static(
    query, key, value, atten_mask, num_heads, pre_tokens, next_tokens, num_key_value_heads, sparse_mode
):
    op = "npu_prompt_flash_attention"
    _check_qkv(op, query, key, value, num_heads, num_key_value_heads)
    _require(query.shape[0] <= 65536, f"{op}: B must be <= 65536")
    _require(
        query.shape[3] % 16 == 0, f"{op}: D must be a multiple of 16 (32-byte aligned), got {query.shape[3]}"
    )
    _require(
        all(t.is_contiguous() for t in (query, key, value)),
        f"{op}: non-contiguous query/key/value not supported",
    )
    if sparse_mode not in SPARSE_MODES:
        raise NotImplementedError(f"{op}: sparse_mode {sparse_mode} is not modelled (only {SPARSE_MODES})")
    if sparse_mode == 3:
        _check_compressed_mask(op, atten_mask)
    elif atten_mask is not None:
        _check_mask(op, atten_mask, query.shape[0], query.shape[2], key.shape[2], decode=False)
        _require(pre_tokens + next_tokens >= 0, f"{op}: pre_tokens + next_tokens must be >= 0 (empty band)")
        _require(
            next_tokens >= 0 or -next_tokens < key.shape[2],
            f"{op}: |next_tokens| must be < S_kv when negative",
        )
        _require(
            pre_tokens >= 0 or -pre_tokens < query.shape[2], f"{op}: |pre_tokens| must be < S_q when negative"
        )


def _ifa_static(query, key, value, atten_mask, num_heads, num_key_value_heads):
    op = "npu_incre_flash_attention"
    _check_qkv(op, query, key, value, num_heads, num_key_value_heads)
    _require(query.shape[2] == 1, f"{op}: the query's S must be 1 (decode kernel), got {query.shape[2]}")
    _require(query.shape[0] <= 65535, f"{op}: B must be <= 65535")
    _require(key.shape[2] <= 262144, f"{op}: KV S must be <= 262144")
    if atten_mask is not None:
        _check_mask(op, atten_mask, query.shape[0], 1, key.shape[2], decode=True)


# ---------------------------------------------------------------------------- attention: core


def _band(q_len: int, kv_len: int, pre_tokens: int, next_tokens: int, offset: int) -> torch.Tensor:
    """bool [S_q, S_kv]: True where key j lies within [i+offset-pre, i+offset+next] of query i."""
    row = torch.arange(q_len).unsqueeze(1) + offset
    col = torch.arange(kv_len).unsqueeze(0)
    return (col >= row - pre_tokens) & (col <= row + next_tokens)


def _kept(mask: torch.Tensor, q_len: int, kv_len: int, decode: bool) -> torch.Tensor:
    """~mask as bool [B or 1, 1, S_q, S_kv], alignment padding cut off."""
    if decode:
        mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
    elif mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[:, None]
    return ~mask[..., :q_len, :kv_len]


def _softmax_attention(q, k, v, allowed, scale):
    """q [B,N,Sq,D], k/v [B,Nkv,Skv,D], allowed bool broadcastable to [B,N,Sq,Skv]; float32 out,
    zero on rows with nothing to attend to."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.where(allowed, torch.exp(scores - lse), 0.0)
    return torch.matmul(probs, v)


def _prompt_allowed(atten_mask, q_len, kv_len, pre_tokens, next_tokens, sparse_mode) -> torch.Tensor:
    """bool broadcastable to [B, 1, S_q, S_kv]: which (query, key) pairs take part."""
    if sparse_mode == 3:
        triangle = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool).triu(1)
        _require(
            torch.equal(atten_mask.reshape(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), triangle),
            "npu_prompt_flash_attention: sparse_mode 3 needs the compressed mask triu(ones(2048, 2048), 1)",
        )
        return _band(q_len, kv_len, INT_MAX, 0, kv_len - q_len)
    if atten_mask is None:
        return torch.ones(q_len, kv_len, dtype=torch.bool)
    return _kept(atten_mask, q_len, kv_len, decode=False) & _band(q_len, kv_len, pre_tokens, next_tokens, 0)


# ------------------------------------------------------------------- attention: registered ops


@torch.library.custom_op(f"{_NS}::prompt_flash_attention", mutates_args=())
def _pfa_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    atten_mask: Optional[torch.Tensor],
    num_heads: int,
    scale_value: float,
    pre_tokens: int,
    next_tokens: int,
    num_key_value_heads: int,
    sparse_mode: int,
) -> torch.Tensor:
    op = "npu_prompt_flash_attention"
    _pfa_static(
        query, key, value, atten_mask, num_heads, pre_tokens, next_tokens, num_key_value_heads, sparse_mode
    )
    _record(
        op,
        input_layout="BNSD",
        query_shape=tuple(query.shape),
        key_shape=tuple(key.shape),
        num_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        atten_mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
        sparse_mode=sparse_mode,
        pre_tokens=pre_tokens,
        next_tokens=next_tokens,
        scale_value=scale_value,
    )
    allowed = _prompt_allowed(atten_mask, query.shape[2], key.shape[2], pre_tokens, next_tokens, sparse_mode)
    return _softmax_attention(query, key, value, allowed, scale_value).to(query.dtype)


@_pfa_op.register_fake
def _pfa_fake(
    query,
    key,
    value,
    atten_mask,
    num_heads,
    scale_value,
    pre_tokens,
    next_tokens,
    num_key_value_heads,
    sparse_mode,
):
    _pfa_static(
        query, key, value, atten_mask, num_heads, pre_tokens, next_tokens, num_key_value_heads, sparse_mode
    )
    return torch.empty_like(query)


@torch.library.custom_op(f"{_NS}::incre_flash_attention", mutates_args=())
def _ifa_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    atten_mask: Optional[torch.Tensor],
    num_heads: int,
    scale_value: float,
    num_key_value_heads: int,
) -> torch.Tensor:
    op = "npu_incre_flash_attention"
    _ifa_static(query, key, value, atten_mask, num_heads, num_key_value_heads)
    _record(
        op,
        input_layout="BNSD",
        query_shape=tuple(query.shape),
        key_shape=tuple(key.shape),
        num_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        atten_mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
        scale_value=scale_value,
    )
    allowed = True if atten_mask is None else _kept(atten_mask, 1, key.shape[2], decode=True)
    allowed = torch.as_tensor(allowed)
    return _softmax_attention(query, key, value, allowed, scale_value).to(query.dtype)


@_ifa_op.register_fake
def _ifa_fake(query, key, value, atten_mask, num_heads, scale_value, num_key_value_heads):
    _ifa_static(query, key, value, atten_mask, num_heads, num_key_value_heads)
    return torch.empty_like(query)


# ------------------------------------------------------------------------ attention: public API


def npu_prompt_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    atten_mask: Optional[torch.Tensor] = None,
    num_heads: int = 1,
    scale_value: float = 1.0,
    pre_tokens: int = 2147473647,
    next_tokens: int = 0,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
) -> torch.Tensor:
    """Prefill ("full") flash attention: softmax(scale * Q K^T + mask) V, BNSD, shaped like query.

    See the module docstring for the band and mask rules; the defaults are the documented ones.
    """
    _check_layout("npu_prompt_flash_attention", input_layout)
    return _pfa_op(
        query,
        key,
        value,
        atten_mask,
        num_heads,
        float(scale_value),
        pre_tokens,
        next_tokens,
        num_key_value_heads,
        sparse_mode,
    )


def npu_incre_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    atten_mask: Optional[torch.Tensor] = None,
    num_heads: int = 1,
    scale_value: float = 1.0,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
) -> torch.Tensor:
    """Decode ("incremental") flash attention for a query of sequence length 1, BNSD."""
    _check_layout("npu_incre_flash_attention", input_layout)
    return _ifa_op(query, key, value, atten_mask, num_heads, float(scale_value), num_key_value_heads)


# ------------------------------------------------------------------------------------- RMSNorm

_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rms_norm_static(x: torch.Tensor, gamma: torch.Tensor) -> tuple[int, ...]:
    op = "npu_rms_norm"
    _require(1 <= x.dim() <= 8, f"{op}: x must have 1 to 8 dims, got {x.dim()}")
    _require(x.dtype in _NORM_DTYPES, f"{op}: x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    _require(gamma.dtype == x.dtype, f"{op}: gamma dtype ({gamma.dtype}) must equal x dtype ({x.dtype})")
    _require(
        1 <= gamma.dim() <= x.dim() and tuple(gamma.shape) == tuple(x.shape[x.dim() - gamma.dim() :]),
        f"{op}: gamma shape {tuple(gamma.shape)} must equal the trailing dims of x {tuple(x.shape)}",
    )
    lead = x.dim() - gamma.dim()
    return tuple(x.shape[:lead]) + (1,) * gamma.dim()


@torch.library.custom_op(f"{_NS}::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    _rms_norm_static(x, gamma)
    _record("npu_rms_norm", x_shape=tuple(x.shape), gamma_shape=tuple(gamma.shape), epsilon=epsilon)
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


@_rms_norm_op.register_fake
def _rms_norm_fake(x, gamma, epsilon):
    rstd_shape = _rms_norm_static(x, gamma)
    return torch.empty_like(x), x.new_empty(rstd_shape, dtype=torch.float32)


def npu_rms_norm(
    x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y = x / sqrt(mean(x^2) + eps) * gamma over gamma's dims; rstd float32."""
    return _rms_norm_op(x, gamma, float(epsilon))


# ------------------------------------------------------------------------------ scatter_update_

_SCATTER_DTYPES = (torch.int8, torch.uint8, torch.float16, torch.float32, torch.bfloat16, torch.int32)


def _scatter_static(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> int:
    op = "scatter_update_"
    rank = data.dim()
    _require(2 <= rank <= 8, f"{op}: data must have 2 to 8 dims, got {rank}")
    _require(updates.dim() == rank, f"{op}: updates must have data's rank ({rank}), got {updates.dim()}")
    _require(data.dtype in _SCATTER_DTYPES, f"{op}: data dtype {data.dtype} is not supported")
    _require(updates.dtype == data.dtype, f"{op}: updates dtype must equal data dtype")
    _require(indices.dtype in (torch.int32, torch.int64), f"{op}: indices dtype must be int32 or int64")
    _require(indices.dim() <= 2, f"{op}: indices must be 0-D, 1-D or 2-D")
    if indices.dim() == 2:
        raise NotImplementedError(f"{op}: 2-D indices have no documented semantics; not modelled")
    _require(
        data.numel() > 0 and indices.numel() > 0 and updates.numel() > 0,
        f"{op}: empty tensors are not supported",
    )
    _require(-rank < axis < rank and axis % rank != 0, f"{op}: axis must lie in (-rank, rank) and not be 0")
    dim = axis % rank
    _require(
        updates.shape[0] == indices.numel(),
        f"{op}: updates dim 0 ({updates.shape[0]}) must equal the number of indices ({indices.numel()})",
    )
    _require(updates.shape[0] <= data.shape[0], f"{op}: updates dim 0 must be <= data dim 0")
    _require(
        all(updates.shape[d] == data.shape[d] for d in range(1, rank) if d != dim),
        f"{op}: updates {tuple(updates.shape)} must match data {tuple(data.shape)} outside dim 0 and axis",
    )
    _require(updates.shape[dim] <= data.shape[dim], f"{op}: updates along axis must fit in data")
    return dim


@torch.library.custom_op(f"{_NS}::scatter_update_", mutates_args=("data",))
def _scatter_update_op(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int) -> None:
    op = "scatter_update_"
    dim = _scatter_static(data, indices, updates, axis)
    starts = [int(i) for i in indices.reshape(-1).tolist()]
    extent = updates.shape[dim]
    _require(
        all(0 <= s and s + extent <= data.shape[dim] for s in starts),
        f"{op}: indices {starts} + {extent} run outside data's axis of size {data.shape[dim]}"
        " (the device would not check this)",
    )
    _record(op, data_shape=tuple(data.shape), updates_shape=tuple(updates.shape), axis=axis)
    for batch, start in enumerate(starts):
        data[batch].narrow(dim - 1, start, extent).copy_(updates[batch])


@_scatter_update_op.register_fake
def _scatter_update_fake(data, indices, updates, axis):
    _scatter_static(data, indices, updates, axis)


def scatter_update_(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int
) -> torch.Tensor:
    """Write updates[i] into data[i] starting at indices[i] along axis, in place; returns data."""
    _scatter_update_op(data, indices, updates, axis)
    return data


# ------------------------------------------------------- weight-only quantized matmul (W8A16/W4A16)
#
# Sources: Ascend/op-plugin docs/context/torch_npu-npu_weight_quant_batchmatmul.md (commit
# 1dd24f2) and torch_npu-npu_convert_weight_to_int4pack.md. y = x @ ((weight + offset) * scale)
# (+ bias); x [M, K] float16/bfloat16; weight [K, N] int8, or int32 carrying 8 int4 values each
# ([K, N // 8], from npu_convert_weight_to_int4pack); antiquant_scale (1,)/(1, 1) per tensor,
# (N,)/(1, N) per channel, (ceil(K / group), N) per group; antiquant_group_size a multiple of 32
# in [32, K - 1] (0 = not grouped); a float scale must have x's dtype (single-op mode).
# The int4 nibble order inside an int32 is not documented; this stand-in packs value 8j + i into
# bits 4i..4i+3 of word j. Callers must only feed it what npu_convert_weight_to_int4pack made.

INT4_PER_INT32 = 8


@torch.library.custom_op(f"{_NS}::convert_weight_to_int4pack", mutates_args=())
def _convert_weight_to_int4pack_op(weight: torch.Tensor) -> torch.Tensor:
    op = "npu_convert_weight_to_int4pack"
    _require(weight.dtype == torch.int32 and weight.dim() == 2, f"{op}: weight must be 2-D int32")
    _require(weight.shape[-1] % INT4_PER_INT32 == 0, f"{op}: the last dim must be a multiple of 8")
    _require(weight.is_contiguous(), f"{op}: weight must be contiguous")
    _require(bool(((weight >= -8) & (weight <= 7)).all()), f"{op}: values must lie in the int4 range [-8, 7]")
    _record(op, shape=tuple(weight.shape))
    nibbles = (weight & 15).view(weight.shape[0], -1, INT4_PER_INT32).to(torch.int64)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@_convert_weight_to_int4pack_op.register_fake
def _convert_weight_to_int4pack_fake(weight):
    return weight.new_empty(weight.shape[0], weight.shape[1] // INT4_PER_INT32)


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """Pack int32 [r, c] int4 values into int32 [r, c // 8]."""
    return _convert_weight_to_int4pack_op(weight)


def _unpack_int4_words(words: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (words.to(torch.int64)[..., None] >> shifts) & 15
    return (((nibbles ^ 8) - 8).flatten(-2)).to(torch.float32)


def _wqbmm_static(x, weight, antiquant_scale, antiquant_group_size):
    op = "npu_weight_quant_batchmatmul"
    _require(x.dim() == 2 and weight.dim() == 2, f"{op}: x and weight must be 2-D ([M, K], [K, N])")
    _require(x.dtype in _kernel_dtypes(), f"{op}: x must be float16/bfloat16, got {x.dtype}")
    _require(weight.dtype in (torch.int8, torch.int32), f"{op}: weight must be int8 or int32 (int4)")
    k = x.shape[1]
    n = weight.shape[1] * (INT4_PER_INT32 if weight.dtype == torch.int32 else 1)
    _require(weight.shape[0] == k, f"{op}: weight is [{weight.shape[0]}, ...] but x has K={k}")
    _require(antiquant_scale.dtype == x.dtype, f"{op}: antiquant_scale must have x's dtype")
    group = antiquant_group_size
    if group:
        _require(
            group % 32 == 0 and 32 <= group <= k - 1,
            f"{op}: antiquant_group_size must be a multiple of 32 in [32, K-1]",
        )
        _require(
            tuple(antiquant_scale.shape) == (math.ceil(k / group), n),
            f"{op}: per-group antiquant_scale must be (ceil(K/group), N) = ({math.ceil(k / group)}, {n})",
        )
    else:
        _require(
            tuple(antiquant_scale.shape) in ((1,), (1, 1), (n,), (1, n)),
            f"{op}: antiquant_scale {tuple(antiquant_scale.shape)} is neither per tensor nor per channel (N={n})",
        )
    return n


@torch.library.custom_op(f"{_NS}::weight_quant_batchmatmul", mutates_args=())
def _weight_quant_batchmatmul_op(
    x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor, antiquant_group_size: int
) -> torch.Tensor:
    n = _wqbmm_static(x, weight, antiquant_scale, antiquant_group_size)
    _record(
        "npu_weight_quant_batchmatmul", m=x.shape[0], n=n, group=antiquant_group_size, dtype=str(weight.dtype)
    )
    w = _unpack_int4_words(weight) if weight.dtype == torch.int32 else weight.float()  # [K, N]
    scale = antiquant_scale.float()
    if antiquant_group_size:
        scale = scale.repeat_interleave(antiquant_group_size, dim=0)[: w.shape[0]]
    return (x.float() @ (w * scale)).to(x.dtype)


@_weight_quant_batchmatmul_op.register_fake
def _weight_quant_batchmatmul_fake(x, weight, antiquant_scale, antiquant_group_size):
    n = _wqbmm_static(x, weight, antiquant_scale, antiquant_group_size)
    return x.new_empty(x.shape[0], n)


def npu_weight_quant_batchmatmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    antiquant_scale: torch.Tensor,
    antiquant_offset: Optional[torch.Tensor] = None,
    quant_scale: Optional[torch.Tensor] = None,
    quant_offset: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    antiquant_group_size: int = 0,
    inner_precise: int = 0,
) -> torch.Tensor:
    """y = x @ (weight * antiquant_scale), weight [K, N] int8 or packed int4 (int32)."""
    _unsupported(
        "npu_weight_quant_batchmatmul",
        antiquant_offset=antiquant_offset,
        quant_scale=quant_scale,
        quant_offset=quant_offset,
        bias=bias,
    )
    return _weight_quant_batchmatmul_op(x, weight, antiquant_scale, antiquant_group_size)


# ------------------------------------------------------------------- the stand-in modules


class ExperimentalConfig:
    """Stand-in for torchair's experimental_config; slots make a misspelt option fail loudly."""

    __slots__ = ("frozen_parameter", "tiling_schedule_optimize")

    def __init__(self) -> None:
        self.frozen_parameter = False
        # torchair python/torchair/configs/experimental_config.py: static-shape GE graphs only.
        self.tiling_schedule_optimize = False


class CompilerConfig:
    """Stand-in for torchair.CompilerConfig: only the options this project sets."""

    __slots__ = ("mode", "experimental_config")

    def __init__(self) -> None:
        self.mode = "max-autotune"
        self.experimental_config = ExperimentalConfig()


@dataclass
class NpuBackend:
    """A torch.compile backend that records its config and graphs, then runs each graph eagerly."""

    compiler_config: CompilerConfig
    graphs: list[torch.fx.GraphModule] = field(default_factory=list)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs.append(gm)
        return gm.forward


@dataclass
class FakeNpu:
    """What install_fake_torch_npu put in place, and what ran through it."""

    torch_npu: types.ModuleType
    torchair: types.ModuleType
    calls: list[OpCall] = field(default_factory=list)
    backends: list[NpuBackend] = field(default_factory=list)
    # What torch_npu.npu.get_device_name() answers (aclrtGetSocName: "Ascend910B2", "Ascend310P3",
    # "Ascend910_9391", a name starting "Ascend950", ...); tests set it to try chip rules.
    device_name: str = "Ascend910B2"

    def op_names(self) -> list[str]:
        return [call.name for call in self.calls]


TORCH_NPU_OPS = {
    "npu_prompt_flash_attention": npu_prompt_flash_attention,
    "npu_incre_flash_attention": npu_incre_flash_attention,
    "npu_rms_norm": npu_rms_norm,
    "scatter_update_": scatter_update_,
    "npu_weight_quant_batchmatmul": npu_weight_quant_batchmatmul,
    "npu_convert_weight_to_int4pack": npu_convert_weight_to_int4pack,
}


def _module(name: str, package: bool = False) -> types.ModuleType:
    module = types.ModuleType(name, f"CPU stand-in for {name} (tests/npu_reference.py)")
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=package)
    if package:
        module.__path__ = []
    return module


def _build_fake() -> tuple[FakeNpu, dict[str, types.ModuleType]]:
    torch_npu = _module("torch_npu")
    for name, fn in TORCH_NPU_OPS.items():
        setattr(torch_npu, name, fn)

    def missing(name: str) -> object:
        raise AttributeError(
            f"the torch_npu stand-in models only {sorted(TORCH_NPU_OPS)}; {name!r} is not one"
        )

    torch_npu.__getattr__ = missing

    torchair = _module("torchair", package=True)
    configs = _module("torchair.configs", package=True)
    compiler_config = _module("torchair.configs.compiler_config")
    fake = FakeNpu(torch_npu, torchair)
    npu_namespace = _module("torch_npu.npu")
    npu_namespace.get_device_name = lambda device=None: fake.device_name
    torch_npu.npu = npu_namespace

    def get_npu_backend(
        *, compiler_config: Optional[CompilerConfig] = None, custom_decompositions: Optional[dict] = None
    ) -> NpuBackend:
        config = CompilerConfig() if compiler_config is None else compiler_config
        _require(
            isinstance(config, CompilerConfig), "get_npu_backend: compiler_config must be a CompilerConfig"
        )
        _require(
            config.mode in ("max-autotune", "reduce-overhead"),
            f"get_npu_backend: mode must be 'max-autotune' or 'reduce-overhead', got {config.mode!r}",
        )
        backend = NpuBackend(config)
        fake.backends.append(backend)
        return backend

    compiler_config.CompilerConfig = CompilerConfig
    configs.compiler_config = compiler_config
    torchair.configs = configs
    torchair.CompilerConfig = CompilerConfig
    torchair.get_npu_backend = get_npu_backend
    modules = {
        "torch_npu": torch_npu,
        "torch_npu.npu": npu_namespace,
        "torchair": torchair,
        "torchair.configs": configs,
        "torchair.configs.compiler_config": compiler_config,
    }
    return fake, modules


def install_fake_torch_npu(monkeypatch) -> FakeNpu:
    """Put stand-in torch_npu and torchair modules into sys.modules until monkeypatch undoes it.

    A module that probed for torch_npu at import time must be re-imported (or reloaded) after
    this to see the stand-in. Every reference op executed meanwhile is appended to
    ``FakeNpu.calls``; every backend built by ``torchair.get_npu_backend`` to ``FakeNpu.backends``.
    """
    fake, modules = _build_fake()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys.modules[__name__], "_RECORDERS", (*_RECORDERS, fake.calls))
    return fake


@contextlib.contextmanager
def fake_torch_npu() -> Iterator[FakeNpu]:
    """install_fake_torch_npu as a context manager, for code outside a pytest fixture."""
    import pytest

    with pytest.MonkeyPatch.context() as monkeypatch:
        yield install_fake_torch_npu(monkeypatch)


_MODEL_FILE = Path(__file__).resolve().parents[1] / "modeling_chatglm.py"
_COPIES = itertools.count()


def import_model_module():
    """A fresh copy of modeling_chatglm.py, so its import-time probe sees the current torch_npu
    (the stand-in, once install_fake_torch_npu ran)."""
    spec = importlib.util.spec_from_file_location(f"modeling_chatglm_copy{next(_COPIES)}", _MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
