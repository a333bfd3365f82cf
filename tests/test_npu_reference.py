"""The CPU references of the torch_npu ops follow their documentation, independent of any model.

Every expectation here is computed another way (float64, loops over kept keys, explicit element
formulas), so a reference that drifts from the documented semantics fails.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
for _path in (_TESTS.parent, _TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import npu_reference as ref  # noqa: E402

PFA = ref.npu_prompt_flash_attention
IFA = ref.npu_incre_flash_attention
OPEN = 65535  # pre/next_tokens wide enough to open the band fully


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(batch=2, heads=4, kv_heads=2, q_len=5, kv_len=7, dim=16, dtype=torch.float32):
    """BNSD query/key/value."""
    return (
        randn(batch, heads, q_len, dim, dtype=dtype, seed=1),
        randn(batch, kv_heads, kv_len, dim, dtype=dtype, seed=2),
        randn(batch, kv_heads, kv_len, dim, dtype=dtype, seed=3),
    )


def hand_attention(q, k, v, keep, scale):
    """float64 loops: each query row softmaxes over exactly its kept keys; no kept key gives 0.

    q [B,N,Sq,D], k/v [B,Nkv,Skv,D] with query head h reading KV head h // (N // Nkv),
    keep bool broadcastable to [B,N,Sq,Skv].
    """
    batch, heads, q_len, _ = q.shape
    group = heads // k.shape[1]
    keep = keep.expand(batch, heads, q_len, k.shape[2])
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                cols = keep[b, h, i].nonzero().flatten()
                if len(cols):
                    keys, values = k[b, h // group, cols].double(), v[b, h // group, cols].double()
                    weights = torch.softmax(keys @ q[b, h, i].double() * scale, dim=0)
                    out[b, h, i] = weights @ values
    return out


def band(q_len, kv_len, pre, nxt, offset=0):
    i = torch.arange(q_len).unsqueeze(1) + offset
    j = torch.arange(kv_len).unsqueeze(0)
    return (j >= i - pre) & (j <= i + nxt)


def to_layout(x, layout):
    """BNSD -> layout (BNSD_BSND takes BNSD)."""
    batch, heads, seq, dim = x.shape
    if layout == "BSH":
        return x.transpose(1, 2).reshape(batch, seq, heads * dim)
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    return x


def from_layout(x, layout, heads):
    """layout of an output -> BNSD."""
    if layout == "BSH":
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
    if layout in ("BSND", "BNSD_BSND"):
        return x.transpose(1, 2)
    return x


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=1e-5)


SCALE = 0.25
ALL_KEPT = torch.ones(1, 1, 1, 1, dtype=torch.bool)


# ----------------------------------------------------------------------------------------- PFA


def test_pfa_with_an_all_false_mask_and_an_open_band_is_plain_softmax_attention():
    q, k, v = qkv(kv_heads=4)
    mask = torch.zeros(2, 1, 5, 7, dtype=torch.bool)
    out = PFA(
        q,
        k,
        v,
        atten_mask=mask,
        num_heads=4,
        scale_value=SCALE,
        pre_tokens=OPEN,
        next_tokens=OPEN,
        input_layout="BNSD",
    )
    by_hand = torch.softmax(q.double() @ k.double().transpose(-1, -2) * SCALE, dim=-1) @ v.double()
    close(out, by_hand)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_pfa_without_a_mask_ignores_next_tokens():
    # sparse_mode 0 without atten_mask: pre/next_tokens are ignored, so next_tokens=0 is not causal.
    q, k, v = qkv(q_len=6, kv_len=6)
    out = PFA(
        q, k, v, num_heads=4, num_key_value_heads=2, scale_value=SCALE, next_tokens=0, input_layout="BNSD"
    )
    close(out, hand_attention(q, k, v, ALL_KEPT, SCALE))
    causal = hand_attention(q, k, v, band(6, 6, OPEN, 0), SCALE)
    assert not torch.allclose(out.double(), causal, atol=1e-3)


@pytest.mark.parametrize("q_len,kv_len", [(6, 6), (3, 7), (7, 4)])
def test_pfa_next_tokens_zero_with_a_mask_is_causal_from_the_top_left(q_len, kv_len):
    q, k, v = qkv(q_len=q_len, kv_len=kv_len)
    mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
    out = PFA(
        q,
        k,
        v,
        atten_mask=mask,
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        next_tokens=0,
        input_layout="BNSD",
    )
    close(out, hand_attention(q, k, v, band(q_len, kv_len, OPEN, 0), SCALE))


@pytest.mark.parametrize("pre,nxt", [(1, 0), (2, 1), (0, 2), (3, -1), (-1, 3)])
def test_pfa_band_keeps_keys_from_i_minus_pre_to_i_plus_next(pre, nxt):
    q, k, v = qkv(q_len=6, kv_len=8)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    out = PFA(
        q,
        k,
        v,
        atten_mask=mask,
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        pre_tokens=pre,
        next_tokens=nxt,
        input_layout="BNSD",
    )
    close(out, hand_attention(q, k, v, band(6, 8, pre, nxt), SCALE))


COMPRESSED = torch.ones(2048, 2048, dtype=torch.bool).triu(1)


@pytest.mark.parametrize(
    "sparse_mode,pre,nxt,keep",
    [
        (2, 0, 0, band(3, 6, OPEN, 0)),  # leftUpCausal: diagonal from the top-left corner
        (3, 0, 0, band(3, 6, OPEN, 0, offset=3)),  # rightDownCausal: from the bottom-right corner
        (4, 1, 0, band(3, 6, 1, 0, offset=3)),  # band, anchored bottom-right
    ],
)
def test_pfa_compressed_sparse_modes_anchor_their_diagonal(sparse_mode, pre, nxt, keep):
    q, k, v = qkv(q_len=3, kv_len=6)
    out = PFA(
        q,
        k,
        v,
        atten_mask=COMPRESSED,
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        pre_tokens=pre,
        next_tokens=nxt,
        input_layout="BNSD",
        sparse_mode=sparse_mode,
    )
    close(out, hand_attention(q, k, v, keep, SCALE))


def test_pfa_sparse_mode_1_uses_the_mask_alone():
    q, k, v = qkv(q_len=4, kv_len=4)
    mask = randn(2, 1, 4, 4, seed=9) > 0.5
    mask[..., 0] = False
    out = PFA(
        q,
        k,
        v,
        atten_mask=mask,
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        next_tokens=0,
        input_layout="BNSD",
        sparse_mode=1,
    )
    close(out, hand_attention(q, k, v, ~mask, SCALE))


def test_pfa_fully_masked_rows_are_zero():
    q, k, v = qkv(q_len=3, kv_len=4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1] = True
    out = PFA(
        q,
        k,
        v,
        atten_mask=mask,
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        next_tokens=OPEN,
        input_layout="BNSD",
    )
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    close(out, hand_attention(q, k, v, ~mask, SCALE))


def test_pfa_actual_seq_lengths_zero_the_query_rows_beyond():
    q, k, v = qkv(q_len=5, kv_len=5)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    out = PFA(
        q,
        k,
        v,
        atten_mask=mask,
        actual_seq_lengths=[3, 5],
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        next_tokens=OPEN,
        input_layout="BNSD",
    )
    keep = torch.ones(2, 1, 5, 1, dtype=torch.bool)
    keep[0, :, 3:] = False
    close(out, hand_attention(q, k, v, keep, SCALE))


# ----------------------------------------------------------------------- shared attention rules


def _call(op, q, k, v, heads, kv_heads, layout, **kw):
    kw.setdefault("scale_value", SCALE)
    return op(q, k, v, num_heads=heads, num_key_value_heads=kv_heads, input_layout=layout, **kw)


OPS_AND_LENGTHS = [(PFA, 5), (IFA, 1)]
LAYOUTS = ["BSH", "BSND", "BNSD", "BNSD_BSND"]


@pytest.mark.parametrize(
    "op,q_len,layout",
    # BNSD_BSND (BNSD in, BSND out) is a prefill-only layout.
    [(op, n, layout) for op, n in OPS_AND_LENGTHS for layout in LAYOUTS if n > 1 or layout != "BNSD_BSND"],
)
def test_layouts_give_the_same_attention(op, q_len, layout):
    q, k, v = qkv(q_len=q_len)
    expected = hand_attention(q, k, v, ALL_KEPT, SCALE)
    in_layout = layout.split("_")[0]
    out = _call(op, to_layout(q, in_layout), to_layout(k, in_layout), to_layout(v, in_layout), 4, 2, layout)
    assert out.shape == to_layout(torch.empty(expected.shape), layout.split("_")[-1]).shape
    close(from_layout(out, layout, 4), expected)


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("op,q_len", OPS_AND_LENGTHS)
def test_grouped_kv_heads_equal_explicitly_repeated_heads(op, q_len, ratio):
    q, k, v = qkv(heads=8, kv_heads=8 // ratio, q_len=q_len)
    grouped = _call(op, q, k, v, 8, 8 // ratio, "BNSD")
    repeated = _call(op, q, k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1), 8, 8, "BNSD")
    close(grouped, repeated)
    if ratio > 1:  # consecutive query heads share a KV head; tiling the heads would be wrong
        tiled = _call(op, q, k.repeat(1, ratio, 1, 1), v.repeat(1, ratio, 1, 1), 8, 8, "BNSD")
        assert not torch.allclose(grouped, tiled, atol=1e-3)


def _mask_for(op, q_len, kv_len, masked_col):
    """A mask hiding key `masked_col` from batch 1 (every query row), in the op's mask form."""
    if q_len == 1:
        mask = torch.zeros(2, 1, 1, kv_len, dtype=torch.bool)
    else:
        mask = torch.zeros(2, 1, q_len, kv_len, dtype=torch.bool)
    mask[1, ..., masked_col] = True
    return mask


@pytest.mark.parametrize("op,q_len", OPS_AND_LENGTHS)
def test_a_masked_position_has_no_influence(op, q_len):
    q, k, v = qkv(q_len=q_len)
    mask = _mask_for(op, q_len, 7, masked_col=2)
    kw = {"atten_mask": mask}
    if op is PFA:
        kw["next_tokens"] = OPEN
    base = _call(op, q, k, v, 4, 2, "BNSD", **kw)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 2] += 5.0
    v2[1, :, 2] -= 7.0
    close(_call(op, q, k2, v2, 4, 2, "BNSD", **kw), base)
    k3 = k.clone()
    k3[1, :, 3] += 5.0  # an unmasked key does change the result
    assert not torch.allclose(_call(op, q, k3, v, 4, 2, "BNSD", **kw), base, atol=1e-3)
    close(base, hand_attention(q, k, v, ~mask, SCALE))


@pytest.mark.parametrize("op,q_len", OPS_AND_LENGTHS)
def test_actual_kv_lengths_ignore_later_positions(op, q_len):
    q, k, v = qkv(q_len=q_len)
    kw = {"actual_seq_lengths" if op is IFA else "actual_seq_lengths_kv": [4, 6]}
    base = _call(op, q, k, v, 4, 2, "BNSD", **kw)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:] = 100.0
    v2[1, :, 6:] = -100.0
    close(_call(op, q, k2, v2, 4, 2, "BNSD", **kw), base)
    keep = torch.arange(7).expand(2, 1, 1, 7) < torch.tensor([4, 6]).view(2, 1, 1, 1)
    close(base, hand_attention(q, k, v, keep, SCALE))


PROMPT_MASK_SHAPES = [(5, 7), (1, 5, 7), (2, 5, 7), (2, 1, 5, 7), (1, 1, 5, 7), (2, 1, 8, 32)]
DECODE_MASK_SHAPES = [(2, 7), (2, 1, 7), (2, 1, 1, 7), (2, 1, 1, 32)]


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8])
@pytest.mark.parametrize("shape", PROMPT_MASK_SHAPES)
def test_pfa_accepts_each_documented_mask_shape_and_dtype(shape, dtype):
    q, k, v = qkv()
    pattern = randn(5, 7, seed=4) > 0.3
    pattern[:, 0] = False
    mask = torch.ones(shape, dtype=torch.bool)  # alignment padding beyond (S_q, S_kv) is masked
    mask[..., :5, :7] = pattern
    out = PFA(
        q,
        k,
        v,
        atten_mask=mask.to(dtype),
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        next_tokens=OPEN,
        input_layout="BNSD",
    )
    close(out, hand_attention(q, k, v, ~pattern, SCALE))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8])
@pytest.mark.parametrize("shape", DECODE_MASK_SHAPES)
def test_ifa_accepts_each_documented_mask_shape_and_dtype(shape, dtype):
    q, k, v = qkv(q_len=1)
    pattern = randn(2, 7, seed=5) > 0.3
    pattern[:, 0] = False
    mask = torch.ones(shape, dtype=torch.bool)
    mask.view(2, -1)[:, :7] = pattern
    out = IFA(
        q,
        k,
        v,
        atten_mask=mask.to(dtype),
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        input_layout="BNSD",
    )
    close(out, hand_attention(q, k, v, ~pattern.view(2, 1, 1, 7), SCALE))


# ----------------------------------------------------------------------------------- IFA


def test_ifa_rejects_a_query_longer_than_one_token():
    q, k, v = qkv(q_len=2)
    with pytest.raises(RuntimeError, match="S must be 1"):
        IFA(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BNSD")


def test_ifa_matches_pfa_for_a_single_query_token():
    q, k, v = qkv(q_len=1)
    pfa = PFA(q, k, v, num_heads=4, num_key_value_heads=2, scale_value=SCALE, input_layout="BNSD")
    close(IFA(q, k, v, num_heads=4, num_key_value_heads=2, scale_value=SCALE, input_layout="BNSD"), pfa)


@pytest.mark.parametrize(
    "pad,lengths,window",
    [
        (2, [3, 1], [(2, 5), (4, 5)]),
        (0, [7, 2], [(0, 7), (5, 7)]),
        (-4, [2, 2], [(5, 7), (5, 7)]),
        (6, [2, 1], None),
    ],
)
def test_ifa_left_padding_reads_the_window_ending_pad_before_the_end(pad, lengths, window):
    q, k, v = qkv(q_len=1)
    out = IFA(
        q,
        k,
        v,
        actual_seq_lengths=lengths,
        kv_padding_size=torch.tensor([pad]),
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        input_layout="BNSD",
    )
    keep = torch.zeros(2, 1, 1, 7, dtype=torch.bool)
    for b, (start, end) in enumerate(window or []):
        keep[b, ..., start:end] = True
    if window is None:  # batch 0's window would start below 0: all-zero output; batch 1 fits
        keep[1, ..., 0:1] = True
    close(out, hand_attention(q, k, v, keep, SCALE))


def test_ifa_kv_padding_size_without_lengths_is_ignored():
    q, k, v = qkv(q_len=1)
    out = IFA(
        q,
        k,
        v,
        kv_padding_size=torch.tensor([3]),
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        input_layout="BNSD",
    )
    close(out, hand_attention(q, k, v, ALL_KEPT, SCALE))


# ---------------------------------------------------------------------------------- validation


def _bad_pfa(**change):
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v}
    kw = {"num_heads": 4, "num_key_value_heads": 2, "input_layout": "BNSD"}
    for name, value in change.items():
        (args if name in args else kw)[name] = value
    return lambda: PFA(args["query"], args["key"], args["value"], **kw)


_q, _k, _v = qkv()
REJECTED = [
    (_bad_pfa(query=_q.double(), key=_k.double(), value=_v.double()), "dtype must be one of"),
    (_bad_pfa(key=_k.half(), value=_v.half()), "share one dtype"),
    (_bad_pfa(input_layout="SBH"), "input_layout must be one of"),
    (_bad_pfa(input_layout="BSH"), "must be 3-D"),
    (_bad_pfa(num_heads=2), "must equal the query's N"),
    (_bad_pfa(num_key_value_heads=3), "divisible by num_key_value_heads"),
    (_bad_pfa(num_key_value_heads=4), "must equal the key's N"),
    (
        _bad_pfa(
            query=_q[..., :8].contiguous(), key=_k[..., :8].contiguous(), value=_v[..., :8].contiguous()
        ),
        "multiple of 16",
    ),
    (_bad_pfa(query=_q.transpose(2, 3).contiguous().transpose(2, 3)), "non-contiguous"),
    (_bad_pfa(atten_mask=torch.zeros(5, 7)), "atten_mask dtype"),
    (_bad_pfa(atten_mask=torch.zeros(2, 4, 5, 7, dtype=torch.bool)), "atten_mask shape"),
    (_bad_pfa(atten_mask=torch.zeros(4, 7, dtype=torch.bool)), "atten_mask shape"),
    (_bad_pfa(atten_mask=torch.full((5, 7), 2, dtype=torch.int8), next_tokens=OPEN), "only hold 0 and 1"),
    (_bad_pfa(atten_mask=torch.zeros(5, 7, dtype=torch.bool), pre_tokens=1, next_tokens=-2), "must be >= 0"),
    (_bad_pfa(actual_seq_lengths_kv=[7, 8]), "must lie in"),
    (_bad_pfa(actual_seq_lengths=torch.tensor([5, 5])), "host list of ints"),
    (_bad_pfa(sparse_mode=5), "sparse_mode must be"),
    (_bad_pfa(sparse_mode=1), "needs a full atten_mask"),
    (_bad_pfa(sparse_mode=3, atten_mask=torch.zeros(5, 7, dtype=torch.bool)), "compressed atten_mask"),
    (_bad_pfa(sparse_mode=3, atten_mask=~COMPRESSED), "compressed mask triu"),
    (_bad_pfa(padding_mask=torch.zeros(1)), "reserved"),
    (
        lambda: PFA(*qkv(heads=320, kv_heads=5), num_heads=320, num_key_value_heads=5, input_layout="BNSD"),
        "N must be <= 256",
    ),
    (
        lambda: PFA(
            *qkv(heads=130, kv_heads=2, q_len=1, kv_len=1),
            num_heads=130,
            num_key_value_heads=2,
            input_layout="BNSD",
        ),
        "<= 64",
    ),
    (
        lambda: PFA(*qkv(kv_heads=4, q_len=1, kv_len=1, dim=528), num_heads=4, input_layout="BNSD"),
        "D must be <= 512",
    ),
    (
        lambda: IFA(*qkv(q_len=1), num_heads=4, num_key_value_heads=2, input_layout="BNSD", inner_precise=2),
        "inner_precise",
    ),
    (
        lambda: IFA(
            *qkv(q_len=1),
            atten_mask=torch.zeros(1, 7, dtype=torch.bool),
            num_heads=4,
            num_key_value_heads=2,
            input_layout="BNSD",
        ),
        "atten_mask shape",
    ),
    (
        lambda: IFA(
            *qkv(q_len=1),
            actual_seq_lengths=[7, 7, 7],
            num_heads=4,
            num_key_value_heads=2,
            input_layout="BNSD",
        ),
        "length 1 or B=2",
    ),
    (
        lambda: IFA(*qkv(q_len=1), num_heads=4, num_key_value_heads=2, input_layout="BNSD_BSND"),
        "input_layout",
    ),
]


@pytest.mark.parametrize("call,message", REJECTED)
def test_documented_constraints_are_enforced(call, message):
    with pytest.raises((RuntimeError, TypeError), match=message):
        call()


@pytest.mark.parametrize(
    "call",
    [
        _bad_pfa(pse_shift=torch.zeros(1)),
        _bad_pfa(quant_scale2=torch.ones(1)),
        lambda: IFA(
            *qkv(q_len=1),
            block_table=torch.zeros(2, 1, dtype=torch.int32),
            num_heads=4,
            num_key_value_heads=2,
            input_layout="BNSD",
        ),
    ],
)
def test_unmodelled_features_say_so(call):
    with pytest.raises(NotImplementedError, match="not modelled"):
        call()


def test_float32_is_a_test_convenience_that_can_be_switched_off(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setattr(ref, "ALLOW_FP32", False)
    with pytest.raises(RuntimeError, match="dtype must be one of"):
        PFA(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BNSD")
    out = PFA(
        q.half(),
        k.half(),
        v.half(),
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        input_layout="BNSD",
    )
    assert out.dtype == torch.float16
    close(out, hand_attention(q.half(), k.half(), v.half(), ALL_KEPT, SCALE), atol=2e-3)


# ------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gamma_shape", [(16,), (3, 16)])
def test_rms_norm_matches_the_formula(gamma_shape, dtype, atol):
    x = randn(2, 3, 16, seed=6).to(dtype)
    gamma = randn(*gamma_shape, seed=7).to(dtype)
    y, rstd = ref.npu_rms_norm(x, gamma, epsilon=1e-5)
    dims = tuple(range(3 - len(gamma_shape), 3))
    xd = x.double()
    expected_rstd = 1.0 / torch.sqrt((xd * xd).mean(dim=dims, keepdim=True) + 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert rstd.dtype == torch.float32 and rstd.shape == x.shape[: 3 - len(gamma_shape)] + (1,) * len(
        gamma_shape
    )
    close(rstd, expected_rstd, atol=1e-5)
    close(y, xd * expected_rstd * gamma.double(), atol=atol)


def test_rms_norm_default_epsilon_is_1e_6():
    x = torch.full((1, 4), 1e-3)
    close(ref.npu_rms_norm(x, torch.ones(4))[1], torch.full((1, 1), 1 / math.sqrt(1e-6 + 1e-6)), atol=1e-2)


@pytest.mark.parametrize(
    "x,gamma,message",
    [
        (torch.ones(2, 8), torch.ones(4), "trailing dims"),
        (torch.ones(2, 8, dtype=torch.float16), torch.ones(8), "gamma dtype"),
        (torch.ones(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), "x dtype"),
    ],
)
def test_rms_norm_rejects_what_the_kernel_rejects(x, gamma, message):
    with pytest.raises(RuntimeError, match=message):
        ref.npu_rms_norm(x, gamma)


# ----------------------------------------------------------------------------- scatter_update_


@pytest.mark.parametrize("axis", [-2, 2, -1])
@pytest.mark.parametrize("extent", [1, 3])
def test_scatter_update_writes_exactly_at_each_batch_offset(extent, axis):
    data = torch.zeros(3, 2, 8, 8)
    shape = [3, 2, 8, 8]
    shape[axis] = extent
    updates = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 1
    starts = torch.tensor([0, 5, 2])
    expected = data.clone()
    for b, start in enumerate(starts.tolist()):
        for s in range(extent):
            if axis == -1:
                expected[b, :, :, start + s] = updates[b, :, :, s]
            else:
                expected[b, :, start + s, :] = updates[b, :, s, :]
    result = ref.scatter_update_(data, starts, updates, axis)
    assert result is data
    assert torch.equal(data, expected)


def test_scatter_update_with_fewer_update_rows_leaves_later_batches_alone():
    data = torch.zeros(3, 1, 4, 2, dtype=torch.float16)
    ref.scatter_update_(
        data, torch.tensor(2, dtype=torch.int32), torch.ones(1, 1, 1, 2, dtype=torch.float16), -2
    )
    expected = torch.zeros_like(data)
    expected[0, :, 2] = 1
    assert torch.equal(data, expected)


@pytest.mark.parametrize(
    "indices,updates,axis,error,message",
    [
        (torch.tensor([3, 0]), torch.ones(2, 2, 2, 4), -2, RuntimeError, "outside data's axis"),
        (torch.tensor([-1, 0]), torch.ones(2, 2, 1, 4), -2, RuntimeError, "outside data's axis"),
        (torch.tensor([0, 0]), torch.ones(2, 2, 1, 4), 0, RuntimeError, "not be 0"),
        (torch.tensor([0]), torch.ones(2, 2, 1, 4), -2, RuntimeError, "number of indices"),
        (torch.tensor([0.0, 1.0]), torch.ones(2, 2, 1, 4), -2, RuntimeError, "int32 or int64"),
        (torch.tensor([[0, 1], [1, 2]]), torch.ones(2, 2, 1, 4), -2, NotImplementedError, "2-D indices"),
        (torch.tensor([0, 1]), torch.ones(2, 3, 1, 4), -2, RuntimeError, "must match data"),
    ],
)
def test_scatter_update_rejects_bad_indices_and_shapes(indices, updates, axis, error, message):
    data = torch.zeros(2, 2, 4, 4)
    with pytest.raises(error, match=message):
        ref.scatter_update_(data, indices, updates, axis)
    assert torch.equal(data, torch.zeros_like(data))


# ----------------------------------------------------------------------------- the stand-ins


def test_the_stand_in_modules_exist_only_while_installed():
    before = sys.modules.get("torch_npu"), sys.modules.get("torchair")
    with ref.fake_torch_npu() as fake:
        import torch_npu
        from torchair.configs.compiler_config import CompilerConfig

        assert torch_npu is fake.torch_npu and CompilerConfig is ref.CompilerConfig
        assert torch_npu.npu_rms_norm is ref.npu_rms_norm
        with pytest.raises(AttributeError, match="models only"):
            torch_npu.npu_fusion_attention  # noqa: B018
    assert (sys.modules.get("torch_npu"), sys.modules.get("torchair")) == before


def test_compiler_config_defaults_and_rejects_misspelt_options():
    config = ref.CompilerConfig()
    assert config.experimental_config.frozen_parameter is False and config.mode == "max-autotune"
    with pytest.raises(AttributeError):
        config.experimental_config.frozen_parameters = True


def _graph_body(torch_npu):
    def body(x, gamma, q, k, cache, start):
        h = torch_npu.npu_rms_norm(x, gamma)[0]
        torch_npu.scatter_update_(cache, start, k, -2)
        attn = torch_npu.npu_incre_flash_attention(
            q, cache, cache, num_heads=4, num_key_value_heads=2, scale_value=SCALE, input_layout="BNSD"
        )
        return h.sum() + attn

    return body


def test_ops_compile_fullgraph_with_the_torchair_stand_in(monkeypatch):
    fake = ref.install_fake_torch_npu(monkeypatch)
    import torchair

    config = torchair.CompilerConfig()
    config.experimental_config.frozen_parameter = True
    backend = torchair.get_npu_backend(compiler_config=config)
    body = _graph_body(fake.torch_npu)
    x, gamma, start = randn(2, 16, seed=12), torch.ones(16), torch.tensor([2, 4])
    q, k = randn(2, 4, 1, 16, seed=13), randn(2, 2, 1, 16, seed=14)
    eager_cache, compiled_cache = torch.zeros(2, 2, 6, 16), torch.zeros(2, 2, 6, 16)
    eager = body(x, gamma, q, k, eager_cache, start)
    torch._dynamo.reset()
    compiled = torch.compile(body, backend=backend, fullgraph=True, dynamic=False)
    close(compiled(x, gamma, q, k, compiled_cache, start), eager)
    assert torch.equal(compiled_cache, eager_cache)  # the in-place cache write happens under compile too
    assert compiled_cache[1, :, 4].abs().sum() > 0
    assert fake.backends == [backend] and backend.compiler_config.experimental_config.frozen_parameter
    assert len(backend.graphs) == 1
    names = fake.op_names()
    assert names[-3:] == ["npu_rms_norm", "scatter_update_", "npu_incre_flash_attention"]
    assert fake.calls[-1].detail["input_layout"] == "BNSD"


def _opcheck_cases():
    q, k, v = qkv()
    qd = q[:, :, :1].contiguous()
    bsh = [to_layout(t, "BSH") for t in (q, k, v)]
    mask = torch.zeros(2, 1, 5, 7, dtype=torch.bool)
    cases = {
        "pfa-bsh-lengths": (ref._pfa_op, (*bsh, None, [3, 5], None, 4, SCALE, OPEN, 0, "BSH", 2, 0)),
        "pfa-bnsd_bsnd-mask": (
            ref._pfa_op,
            (q, k, v, mask, None, [7, 6], 4, SCALE, OPEN, OPEN, "BNSD_BSND", 2, 0),
        ),
        "ifa-lengths": (
            ref._ifa_op,
            (qd, k, v, mask[:, :, :1].contiguous(), [7, 4], None, 4, SCALE, "BNSD", 2),
        ),
        "rms_norm": (ref._rms_norm_op, (randn(2, 3, 16), torch.ones(3, 16), 1e-5)),
        "scatter_update_": (
            ref._scatter_update_op,
            (torch.zeros(2, 2, 6, 16), torch.tensor([1, 3]), randn(2, 2, 2, 16), -2),
        ),
    }
    return [pytest.param(op, args, id=name) for name, (op, args) in cases.items()]


@pytest.mark.parametrize("op,args", _opcheck_cases())
def test_fake_kernels_agree_with_the_reference_kernels(op, args):
    # The fake kernels give torch.compile the output shapes, dtypes and strides; opcheck runs both.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
