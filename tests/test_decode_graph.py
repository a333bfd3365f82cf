"""The decode-graph design: cache objects with one ``update``, the one keep-mask form (checked
against the original's masks), and no device-to-host sync on a decode step."""

import pytest
import torch
from golden_protocol import build_golden_model, golden_expected, variant_inputs
from torch.overrides import TorchFunctionMode

import modeling_chatglm as mc

B, G, D = 2, 2, 4


def _kv(seq, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, G, seq, D, generator=generator), torch.randn(B, G, seq, D, generator=generator)


# --- cache objects --------------------------------------------------------------------------


BACKENDS = mc.resolve_backends(mc.RuntimeOptions(), "cpu", torch.float32)


def test_tuple_cache_grows_by_concatenation_and_returns_the_original_layout():
    cache = mc.TupleKVCache([None, None])
    k1, v1 = _kv(3, 0)
    k2, v2 = _kv(1, 1)
    step = cache.begin(torch.arange(3), None, BACKENDS)
    assert step.keep is mc.CAUSAL and not step.decode
    cache.update(1, k1, v1)
    legacy = cache.end()
    assert legacy[0] is None and len(legacy) == 2
    cache = mc.TupleKVCache(list(legacy), seq_len=3)
    step = cache.begin(torch.arange(3, 4), torch.ones(B, 4), BACKENDS)
    assert step.decode and step.keep.shape == (B, 1, 1, 4)
    k_all, v_all = cache.update(1, k2, v2)
    torch.testing.assert_close(k_all, torch.cat([k1, k2], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(v_all, torch.cat([v1, v2], dim=2), rtol=0, atol=0)
    key, value = cache.end()[1]  # the original's [seq, batch, kv_heads, d]
    assert key.shape == (4, B, G, D)
    torch.testing.assert_close(key, torch.cat([k1, k2], dim=2).permute(2, 0, 1, 3), rtol=0, atol=0)
    torch.testing.assert_close(value, torch.cat([v1, v2], dim=2).permute(2, 0, 1, 3), rtol=0, atol=0)


def test_static_cache_writes_in_place_and_views_like_the_tuple_cache():
    cache = mc.StaticKVCache(2, B, G, 6, D, torch.float32, "cpu")
    k1, v1 = _kv(3, 0)
    k2, v2 = _kv(1, 1)
    step = cache.begin(torch.arange(3), None, BACKENDS)
    got = cache.update(0, k1, v1)
    assert got[0] is k1 and got[1] is v1 and step.keep is mc.CAUSAL  # a prompt attends to its fresh K/V
    past = cache.end()
    assert past.seq_len == 3 and past.is_newest() and not cache.is_newest()
    step = past.begin(torch.arange(3, 4), None, BACKENDS)
    k_all, v_all = past.update(0, k2, v2)
    assert k_all is cache.keys[0] and k_all.shape == (B, G, 6, D)  # the whole buffer: static shapes
    torch.testing.assert_close(k_all[:, :, :4], torch.cat([k1, k2], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(v_all[:, :, :4], torch.cat([v1, v2], dim=2), rtol=0, atol=0)
    # The decode step's keep-mask is the cache's own mask buffer: written slots only.
    assert step.decode and step.keep.shape == (B, 1, 1, 6)
    assert step.keep[0, 0, 0].tolist() == [True] * 4 + [False] * 2

    legacy = mc.TupleKVCache([None, None])
    legacy.begin(torch.arange(3), None, BACKENDS)
    legacy.update(0, k1, v1)
    legacy.update(0, k2, v2)
    newest = past.end()
    torch.testing.assert_close(newest[0][0], legacy.layers[0][0], rtol=0, atol=0)
    torch.testing.assert_close(newest[0][1], legacy.layers[0][1], rtol=0, atol=0)

    newest.key_keep[0, 1] = False
    bigger = newest.grown(10)
    assert bigger.max_len == 10 and bigger.seq_len == 4 and bigger.is_newest()
    torch.testing.assert_close(bigger[0][0], newest[0][0], rtol=0, atol=0)
    assert bigger.key_keep[0, :4].tolist() == [True, False, True, True]


# --- the keep-mask against the original's masks -----------------------------------------------


def _original_keep(model, ids, past, padding_mask):
    return ~model.get_masks(ids, past, padding_mask)  # the original's mask has True = masked


def test_keep_mask_of_a_padded_prompt_equals_the_original_mask():
    model = build_golden_model("tiny-chatglm3")
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    keep = mc.attention_keep_mask(torch.arange(5), mask.bool(), mask.bool())
    assert torch.equal(keep, _original_keep(model, ids, None, mask))


@pytest.mark.parametrize("seq", [1, 3], ids=["decode", "chunk"])
def test_keep_mask_after_a_past_equals_the_original_mask_and_hides_unwritten_slots(seq):
    model = build_golden_model("tiny-chatglm3")
    past_len, max_len = 4, 12
    past = tuple((torch.zeros(past_len, 2, 2, 16), torch.zeros(past_len, 2, 2, 16)) for _ in range(2))
    mask = torch.tensor([[0, 1, 1, 1] + [1] * seq, [1, 1, 1, 1] + [1] * seq])
    ids = torch.ones(2, seq, dtype=torch.long)
    want = _original_keep(model, ids, past, mask)
    slots = torch.arange(past_len, past_len + seq)
    # Tuple cache: the keys are exactly the past + the new tokens.
    assert torch.equal(mc.attention_keep_mask(slots, mask.bool()), want)
    # Static cache: the whole buffer; the written part equals the original, the rest is hidden.
    buffer_keep = torch.ones(2, max_len, dtype=torch.bool)
    buffer_keep[:, : past_len + seq] = mask.bool()
    keep = mc.attention_keep_mask(slots, buffer_keep)
    assert torch.equal(keep[..., : past_len + seq], want)
    assert not keep[..., past_len + seq :].any()


# --- no device-to-host sync on a decode step --------------------------------------------------

# Tensor methods that wait for the device to hand a value to the host.
_SYNCS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "numpy", "__array__"}


class HostSyncCounter(TorchFunctionMode):
    """Records every tensor -> Python value conversion made while active."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
def test_decode_steps_make_no_device_to_host_sync(kv_cache):
    model = build_golden_model("tiny-chatglm3", kv_cache=kv_cache)
    ids, mask, pos = variant_inputs(golden_expected("tiny-chatglm3"), "")  # left-padded batch
    with torch.no_grad():
        with HostSyncCounter() as prompt_counter:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_last_logit=True)
        # The prompt decides padding once (the counter sees it: it can catch a sync).
        assert prompt_counter.syncs
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
        with HostSyncCounter() as counter:
            for step in range(3):
                mask = torch.cat([mask, mask.new_ones(2, 1)], dim=-1)
                out = model(
                    input_ids=token[:, None],
                    position_ids=pos[:, -1:] + 1 + step,
                    attention_mask=mask,
                    past_key_values=cache,
                    return_last_logit=True,
                )
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1)
    assert counter.syncs == []


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
def test_an_explicit_original_mask_on_a_decode_step_gives_the_same_answer(kv_cache):
    """``full_attention_mask`` (the original's form, True = masked, over past + new positions)
    works with either cache; over the static buffer its unwritten slots stay hidden."""
    model = build_golden_model("tiny-chatglm3", kv_cache=kv_cache).transformer
    model.static_cache_len = 16
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    step = torch.tensor([[13], [14]])
    with torch.no_grad():
        past = model(input_ids=ids).past_key_values
        want = model(input_ids=step, past_key_values=past).last_hidden_state
        past = model(input_ids=ids).past_key_values
        none_masked = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
        got = model(input_ids=step, past_key_values=past, full_attention_mask=none_masked).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
