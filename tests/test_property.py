"""Property test: on random small configs and batches, every fast-path combination equals the
math/eager/tuple baseline (prefill and several decode steps, padded rows included)."""

import sys

import torch
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatglm_protocol import decode, greedy, randomize_

sys.path.insert(0, str(REPO / "scripts"))

COMBINATIONS = [
    (attention, rmsnorm, cache)
    for attention in ("npu", "sdpa", "math")
    for rmsnorm in ("npu", "fused", "math")
    for cache in ("tuple", "static")
]


@st.composite
def cases(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2, 3]))
    kv_channels = draw(st.sampled_from([16, 32]))  # the NPU kernels need head_dim % 16 == 0
    config = {
        "num_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        "multi_query_group_num": groups,
        "multi_query_attention": True,
        "kv_channels": kv_channels,
        "hidden_size": draw(st.sampled_from([32, 48, 64])),
        "ffn_hidden_size": draw(st.sampled_from([40, 96])),
        "padded_vocab_size": 64,
        "seq_length": 64,
        "rope_ratio": draw(st.sampled_from([1, 50, 500])),
        "add_qkv_bias": draw(st.booleans()),
        "torch_dtype": "float32",
    }
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 9))
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    return config, length, pads, draw(st.integers(1, 4)), draw(st.integers(0, 2**31 - 1))


def build(module, config, seed, **options):
    cfg = module.ChatGLMConfig(**config, **options)
    model = module.ChatGLMForConditionalGeneration(cfg, empty_init=False)
    return randomize_(model, seed, scale=0.1).eval()


def trace(model, ids, mask, steps):
    """Prefill logits then `steps` decode logits, feeding a fixed token sequence."""
    feed = (3 + torch.arange(steps))[:, None].expand(steps, ids.shape[0])
    run = decode(model, ids, mask, None, steps, feed=feed, keep_logits=True)
    return [run.prefill_logits, *run.step_logits]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_every_combination_equals_the_math_baseline(npu_module, case):
    config, length, pads, steps, seed = case
    batch = len(pads)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    baseline = trace(
        build(npu_module, config, seed, attention_backend="math", rmsnorm_backend="math"), ids, mask, steps
    )
    for attention, rmsnorm, cache in COMBINATIONS:
        model = build(
            npu_module, config, seed, attention_backend=attention, rmsnorm_backend=rmsnorm, kv_cache=cache
        )
        got = trace(model, ids, mask, steps)
        for step, (a, b) in enumerate(zip(got, baseline)):
            # Every position, padded query rows too (the original lets them attend everywhere).
            diff = (a - b).abs().max().item()
            assert diff <= 1e-5, (attention, rmsnorm, cache, step, diff, config)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    width=st.integers(1, 70000),
    levels=st.integers(1, 4),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_greedy_is_argmax_first_index_on_ties(rows, width, levels, dtype, seed):
    # Few distinct values, so most rows have their maximum several times: the first must win.
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, width), generator=generator).to(dtype)
    got = greedy(logits)
    assert torch.equal(got, logits.argmax(-1))
    first = torch.stack([(row == row.max()).nonzero()[0, 0] for row in logits])
    assert torch.equal(got, first)
