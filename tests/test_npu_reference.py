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


@pytest.mark.parametrize("q_len,kv_len", [(3, 6), (6, 6), (1, 5)])
def test_pfa_sparse_mode_3_is_causal_from_the_bottom_right(q_len, kv_len):
    # rightDownCausal: a chunk after a past sees the whole past and is causal within itself.
    q, k, v = qkv(q_len=q_len, kv_len=kv_len)
    out = PFA(
        q,
        k,
        v,
        atten_mask=COMPRESSED,
        num_heads=4,
        num_key_value_heads=2,
        scale_value=SCALE,
        pre_tokens=OPEN,
        next_tokens=OPEN,
        input_layout="BNSD",
        sparse_mode=3,
    )
    close(out, hand_attention(q, k, v, band(q_len, kv_len, OPEN, 0, offset=kv_len - q_len), SCALE))
    if q_len < kv_len:  # anchored top-left, row 0 would see key 0 only
        top_left = hand_attention(q, k, v, band(q_len, kv_len, OPEN, 0), SCALE)
        assert not torch.allclose(out.double(), top_left, atol=1e-3)


@pytest.mark.parametrize("shape", [(2048, 2048), (1, 2048, 2048), (1, 1, 2048, 2048)])
def test_pfa_sparse_mode_3_takes_each_compressed_mask_shape(shape):
    q, k, v = qkv(q_len=4, kv_len=4)
    kw = dict(num_heads=4, num_key_value_heads=2, scale_value=SCALE, input_layout="BNSD", sparse_mode=3)
    out = PFA(q, k, v, atten_mask=COMPRESSED.reshape(shape), **kw)
    close(out, hand_attention(q, k, v, band(4, 4, OPEN, 0), SCALE))


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


# ----------------------------------------------------------------------- shared attention rules


def _call(op, q, k, v, heads, kv_heads, **kw):
    kw.setdefault("scale_value", SCALE)
    return op(q, k, v, num_heads=heads, num_key_value_heads=kv_heads, input_layout="BNSD", **kw)


OPS_AND_LENGTHS = [(PFA, 5), (IFA, 1)]


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("op,q_len", OPS_AND_LENGTHS)
def test_grouped_kv_heads_equal_explicitly_repeated_heads(op, q_len, ratio):
    q, k, v = qkv(heads=8, kv_heads=8 // ratio, q_len=q_len)
    grouped = _call(op, q, k, v, 8, 8 // ratio)
    repeated = _call(op, q, k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1), 8, 8)
    close(grouped, repeated)
    if ratio > 1:  # consecutive query heads share a KV head; tiling the heads would be wrong
        tiled = _call(op, q, k.repeat(1, ratio, 1, 1), v.repeat(1, ratio, 1, 1), 8, 8)
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
    base = _call(op, q, k, v, 4, 2, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 2] += 5.0
    v2[1, :, 2] -= 7.0
    close(_call(op, q, k2, v2, 4, 2, **kw), base)
    k3 = k.clone()
    k3[1, :, 3] += 5.0  # an unmasked key does change the result
    assert not torch.allclose(_call(op, q, k3, v, 4, 2, **kw), base, atol=1e-3)
    close(base, hand_attention(q, k, v, ~mask, SCALE))


PROMPT_MASK_SHAPES = [(5, 7), (1, 5, 7), (2, 5, 7), (2, 1, 5, 7), (1, 1, 5, 7), (2, 1, 8, 32)]
DECODE_MASK_SHAPES = [(2, 7), (2, 1, 7), (2, 1, 1, 7), (2, 1, 1, 32)]


@pytest.mark.parametrize("shape", PROMPT_MASK_SHAPES)
def test_pfa_accepts_each_documented_mask_shape(shape):
    q, k, v = qkv()
    pattern = randn(5, 7, seed=4) > 0.3
    pattern[:, 0] = False
    mask = torch.ones(shape, dtype=torch.bool)  # alignment padding beyond (S_q, S_kv) is masked
    mask[..., :5, :7] = pattern
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
    close(out, hand_attention(q, k, v, ~pattern, SCALE))


@pytest.mark.parametrize("shape", DECODE_MASK_SHAPES)
def test_ifa_accepts_each_documented_mask_shape(shape):
    q, k, v = qkv(q_len=1)
    pattern = randn(2, 7, seed=5) > 0.3
    pattern[:, 0] = False
    mask = torch.ones(shape, dtype=torch.bool)
    mask.view(2, -1)[:, :7] = pattern
    out = IFA(
        q,
        k,
        v,
        atten_mask=mask,
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


# ---------------------------------------------------------------------------------- validation


def _bad_pfa(**change):
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v}
    kw = {"num_heads": 4, "num_key_value_heads": 2, "input_layout": "BNSD"}
    for name, value in change.items():
        (args if name in args else kw)[name] = value
    return lambda: PFA(args["query"], args["key"], args["value"], **kw)


def _bad_ifa(**change):
    q, k, v = qkv(q_len=1)
    kw = {"num_heads": 4, "num_key_value_heads": 2, "input_layout": "BNSD", **change}
    return lambda: IFA(q, k, v, **kw)


_q, _k, _v = qkv()
REJECTED = [
    (_bad_pfa(query=_q.double(), key=_k.double(), value=_v.double()), "dtype must be one of"),
    (_bad_pfa(key=_k.half(), value=_v.half()), "share one dtype"),
    (_bad_pfa(query=_q[0]), "must be 4-D"),
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
    (_bad_pfa(atten_mask=torch.zeros(7, 5, dtype=torch.bool).t()), "non-contiguous atten_mask"),
    (_bad_pfa(atten_mask=torch.zeros(2, 4, 5, 7, dtype=torch.bool)), "atten_mask shape"),
    (_bad_pfa(atten_mask=torch.zeros(4, 7, dtype=torch.bool)), "atten_mask shape"),
    (_bad_pfa(atten_mask=torch.zeros(5, 7, dtype=torch.bool), pre_tokens=1, next_tokens=-2), "must be >= 0"),
    (_bad_pfa(sparse_mode=3), "compressed bool atten_mask"),
    (_bad_pfa(sparse_mode=3, atten_mask=torch.zeros(5, 7, dtype=torch.bool)), "compressed bool atten_mask"),
    (_bad_pfa(sparse_mode=3, atten_mask=COMPRESSED.to(torch.uint8)), "compressed bool atten_mask"),
    (_bad_pfa(sparse_mode=3, atten_mask=~COMPRESSED), "compressed mask triu"),
    (_bad_pfa(sparse_mode=3, atten_mask=COMPRESSED.t().contiguous().t()), "non-contiguous"),
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
    (_bad_ifa(atten_mask=torch.zeros(1, 7, dtype=torch.bool)), "atten_mask shape"),
    (_bad_ifa(atten_mask=torch.zeros(2, 1, 1, 14, dtype=torch.bool)[..., ::2]), "non-contiguous atten_mask"),
]


@pytest.mark.parametrize("call,message", REJECTED)
def test_documented_constraints_are_enforced(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize(
    "call,error,message",
    [
        (_bad_pfa(input_layout="BSND"), NotImplementedError, "input_layout 'BSND' is not modelled"),
        (  # the documented default layout is BSH: leaving it out is refused too
            lambda: PFA(*qkv(), num_heads=4, num_key_value_heads=2),
            NotImplementedError,
            "input_layout 'BSH'",
        ),
        (_bad_ifa(input_layout="BSH"), NotImplementedError, "input_layout 'BSH'"),
        (_bad_pfa(sparse_mode=1), NotImplementedError, "sparse_mode 1 is not modelled"),
        (_bad_pfa(sparse_mode=2, atten_mask=COMPRESSED), NotImplementedError, "sparse_mode 2"),
        (_bad_pfa(atten_mask=torch.zeros(5, 7, dtype=torch.int8)), NotImplementedError, "atten_mask dtype"),
        (_bad_pfa(actual_seq_lengths=[5, 5]), TypeError, "actual_seq_lengths"),
        (_bad_ifa(kv_padding_size=torch.tensor([1])), TypeError, "kv_padding_size"),
        (_bad_pfa(pse_shift=torch.zeros(1)), TypeError, "pse_shift"),
    ],
)
def test_what_the_model_never_calls_is_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
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
    # torchair's defaults; frozen_parameter off by default is what lets the model's test of it
    # (tests/test_fast_paths.py, frozen parameters) fail when the model stops setting it.
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
    mask = torch.zeros(2, 1, 5, 7, dtype=torch.bool)
    cases = {
        "pfa-mask": (ref._pfa_op, (q, k, v, mask, 4, SCALE, OPEN, OPEN, 2, 0)),
        "pfa-compressed": (ref._pfa_op, (q, k, v, COMPRESSED, 4, SCALE, OPEN, OPEN, 2, 3)),
        "ifa-mask": (ref._ifa_op, (qd, k, v, mask[:, :, :1].contiguous(), 4, SCALE, 2)),
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
