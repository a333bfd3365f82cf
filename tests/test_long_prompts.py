"""Long prompts: chunked prefill equals one pass, graph mode compiles one chunk graph, and no
sequence x sequence tensor is made on the prompt path (the NPU takes the compressed causal mode)."""

import pytest
import torch
from golden_protocol import (
    FIXTURES,
    build_golden_model,
    compare_to_golden,
    golden_expected,
    run_protocol,
    variant_inputs,
)
from helpers import CountingBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from chatglm_protocol import decode, randomize_

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
@pytest.mark.parametrize("chunk", [2, 5])
@pytest.mark.parametrize("variant", ["", "nopad_"], ids=["padded", "unpadded"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_chunked_prefill_matches_golden(fixture, variant, chunk, kv_cache):
    model = build_golden_model(fixture, prefill_chunk=chunk, kv_cache=kv_cache)
    assert model.transformer.options.prefill_chunk == chunk
    expected = golden_expected(fixture)
    ids = variant_inputs(expected, variant)[0]
    assert ids.shape[1] > chunk, "the fixture's prompt must be longer than a chunk"
    result = run_protocol(model, *variant_inputs(expected, variant))
    if variant == "":
        # A padding position attends to everything seen so far, one pass to the whole prompt:
        # its logits and (from the second layer) its K/V differ, and are never read. Compare
        # the real positions; decode, which reads them all, as a whole.
        real = expected["attention_mask"].bool()
        in_cache = real.t()[None, None, :, :, None, None]  # [layers, 2, seq, batch, groups, d]
        expected = dict(expected)
        for ours, theirs, where in (
            ("prefill_logits", "prefill_logits", real[..., None]),
            ("prefill_cache", "prefill_past_key_values", in_cache),
        ):
            setattr(result, ours, torch.where(where, getattr(result, ours), 0))
            expected[theirs] = torch.where(where, expected[theirs], 0)
        final = torch.cat((in_cache, torch.ones_like(in_cache[:, :, :1]).expand(-1, -1, 8, -1, -1, -1)), 2)
        result.final_cache = torch.where(final, result.final_cache, 0)
        expected["final_past_key_values"] = torch.where(final, expected["final_past_key_values"], 0)
    compare_to_golden(result, expected, variant, atol=1e-5)


def _random_model(module, config, seed, **options):
    model = module.ChatGLMForConditionalGeneration(
        module.ChatGLMConfig(**config, **options), empty_init=False
    )
    return randomize_(model, seed, scale=0.1).eval()


@st.composite
def cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    config = {
        "num_layers": draw(st.integers(1, 2)),
        "num_attention_heads": groups * draw(st.sampled_from([1, 2])),
        "multi_query_group_num": groups,
        "multi_query_attention": True,
        "kv_channels": 16,
        "hidden_size": 32,
        "ffn_hidden_size": 40,
        "padded_vocab_size": 64,
        "seq_length": 64,
        "rope_ratio": draw(st.sampled_from([1, 50])),
        "torch_dtype": "float32",
    }
    length = draw(st.integers(2, 20))
    pads = [draw(st.integers(0, length - 1)) for _ in range(draw(st.integers(1, 3)))]
    return config, length, pads, draw(st.integers(2, 7)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_chunked_prefill_equals_one_pass_on_every_kernel_and_cache(npu_module, case):
    config, length, pads, chunk, seed = case
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (len(pads), length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    feed = (3 + torch.arange(3))[:, None].expand(3, len(pads))
    base = _random_model(npu_module, config, seed, attention_backend="math", prefill_chunk=0)
    expected = decode(base, ids, mask, None, 3, feed=feed, keep_logits=True)
    real = mask.bool()[..., None]
    for attention in ("npu", "sdpa", "math"):
        for cache in ("tuple", "static"):
            model = _random_model(
                npu_module, config, seed, attention_backend=attention, kv_cache=cache, prefill_chunk=chunk
            )
            got = decode(model, ids, mask, None, 3, feed=feed, keep_logits=True)
            prefill = (torch.where(real, got.prefill_logits - expected.prefill_logits, 0)).abs().max()
            assert prefill.item() <= 1e-5, (attention, cache, chunk, prefill)
            for a, b in zip(got.step_logits, expected.step_logits):
                assert (a - b).abs().max().item() <= 1e-5, (attention, cache, chunk)


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
@pytest.mark.parametrize("variant", ["", "nopad_"], ids=["padded", "unpadded"])
def test_chunked_prefill_in_graph_mode_compiles_a_bounded_number_of_graphs(variant, kv_cache):
    backend = CountingBackend()
    model = build_golden_model(
        "tiny-chatglm3", exe_mode="dynamo", graph_backend=backend, kv_cache=kv_cache, prefill_chunk=3
    )
    expected = golden_expected("tiny-chatglm3")
    result = run_protocol(model, *variant_inputs(expected, variant))
    if variant == "":  # padding positions' own logits are never read (see the golden test above)
        real = expected["attention_mask"].bool()[..., None]
        diff = torch.where(real, result.prefill_logits - expected["prefill_logits"], 0).abs().max()
        assert diff.item() <= 1e-5
        assert (result.decode_logits - expected["decode_logits"]).abs().max().item() <= 1e-5
        assert torch.equal(result.greedy_tokens, expected["greedy_tokens"])
    else:
        compare_to_golden(result, expected, variant, atol=1e-5)
    # The first chunk (causal, no past), the later chunks (after a past: the first length, then
    # one graph for all), and the decode graph(s) of the cache.
    assert backend.count <= 4
    compiled = backend.count
    run_protocol(model, *variant_inputs(expected, variant))
    assert backend.count == compiled


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest:
                self.largest, self.op = tensor.numel(), str(func)
        return out


LONG = 2304  # longer than the NPU's fixed 2048 x 2048 causal triangle


def _long_model(attention, kv_cache, chunk, module=None):
    import modeling_chatglm as M

    module = module or M
    config = {
        "num_layers": 1,
        "num_attention_heads": 2,
        "multi_query_group_num": 1,
        "multi_query_attention": True,
        "kv_channels": 16,
        "hidden_size": 32,
        "ffn_hidden_size": 40,
        "padded_vocab_size": 64,
        "seq_length": 2 * LONG,
        "torch_dtype": "float32",
    }
    return _random_model(
        module, config, 0, attention_backend=attention, kv_cache=kv_cache, prefill_chunk=chunk
    )


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
@pytest.mark.parametrize("attention", ["sdpa", "math", "npu"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_no_sequence_squared_tensor_on_the_prompt_path(npu_module, attention, kv_cache, padded):
    ids = torch.randint(3, 64, (2, LONG), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :100], mask[1, :100] = 0, 0
    sizes = {}
    for chunk in (0, 256):
        model = _long_model(attention, kv_cache, chunk, npu_module)
        with torch.no_grad(), LargestTensor() as probe:
            model(input_ids=ids, attention_mask=mask, return_last_logit=True)
        sizes[chunk] = (probe.largest, probe.op)
    # One pass builds a [b, 1, s, s] mask or [b, heads, s, s] scores (the NPU stand-in computes
    # with explicit scores, so its bound is the chunk's scores); chunked, nothing reaches s x s.
    assert sizes[256][0] < LONG * LONG, sizes
    if attention != "npu" and (padded or attention == "math"):
        assert sizes[0][0] >= LONG * LONG, sizes  # the probe sees the one-pass square
