"""The stand-in's truth check: on a machine with torch_npu and an Ascend NPU, every torch_npu op
the model calls gives what tests/npu_reference.py says it gives for the same inputs. Elsewhere
these tests are skipped with the reason, and the stand-in stays the fallback it is."""

import importlib.util
import math

import npu_reference as ref
import pytest
import torch


def _npu_reason():
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install -r requirements-npu.txt on an Ascend host)"
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception as error:  # present but unusable, e.g. without CANN
        return f"torch_npu does not import here ({type(error).__name__}: {error})"
    if not torch.npu.is_available():
        return "torch_npu imports but no NPU is visible (check ASCEND_RT_VISIBLE_DEVICES)"
    return None


REASON = _npu_reason()
pytestmark = [pytest.mark.npu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.float16)


def _attention_case(q_len):
    # [b, heads, s, d] BNSD, grouped KV heads, row 0 left-padded by two positions.
    q, k, v = _randn(2, 8, q_len, 64, seed=1), _randn(2, 2, 9, 64, seed=2), _randn(2, 2, 9, 64, seed=3)
    keep = torch.ones(2, 1, q_len, 9, dtype=torch.bool).tril(9 - q_len)
    keep[0, :, :, :2] = False
    common = dict(
        atten_mask=(~keep).contiguous(), num_heads=8, num_key_value_heads=2, scale_value=1 / math.sqrt(64)
    )
    if q_len == 1:
        return "npu_incre_flash_attention", (q, k, v), dict(common, input_layout="BNSD")
    band = dict(pre_tokens=ref.INT_MAX, next_tokens=ref.INT_MAX, input_layout="BNSD")
    return "npu_prompt_flash_attention", (q, k, v), dict(common, **band)


def _cases():
    x = _randn(3, 5, 64, seed=4)
    gamma = _randn(64, seed=5) + 1
    weight = torch.randint(-127, 128, (128, 96), generator=torch.Generator().manual_seed(6), dtype=torch.int8)
    return {
        "prompt_flash_attention": _attention_case(7),
        "incre_flash_attention": _attention_case(1),
        "rms_norm": ("npu_rms_norm", (x, gamma), dict(epsilon=1e-5)),
        "weight_quant_batchmatmul_int8": (
            "npu_weight_quant_batchmatmul",
            (_randn(4, 128, seed=7), weight, _randn(96, seed=8).abs() / 100),
            {},
        ),
    }


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("case", sorted(_cases()))
def test_the_device_op_matches_the_stand_in(case):
    import torch_npu

    name, args, kwargs = _cases()[case]
    expected = _first(getattr(ref, name)(*args, **kwargs))
    got = _first(getattr(torch_npu, name)(*(a.npu() for a in args), **kwargs)).cpu()
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-3)


def test_scatter_update_writes_where_the_stand_in_writes():
    import torch_npu

    data = torch.zeros(2, 2, 8, 16, dtype=torch.float16)
    starts, updates = torch.tensor([1, 5]), _randn(2, 2, 2, 16, seed=9)
    expected = ref.scatter_update_(data.clone(), starts, updates, -2)
    got = torch_npu.scatter_update_(data.npu(), starts.npu(), updates.npu(), -2).cpu()
    assert torch.equal(got, expected)
