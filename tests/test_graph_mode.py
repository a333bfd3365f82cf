"""Graph mode: prefill() and decode_one_token() compiled per model instance and phase,
no graph breaks, a bounded number of compiles over any number of prompt lengths."""

import pytest
import torch
from golden_protocol import (
    build_golden_model,
    compare_to_golden,
    golden_expected,
    run_protocol,
    variant_inputs,
)
from helpers import CountingBackend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


# Documented bound (README "Graph mode"): per distinct (batch size, padded or not) a generation
# compiles exactly one prefill graph and one decode graph with the static cache (the decode graph
# has static shapes and is replayed every step); the tuple cache adds one more decode graph when
# the growing cache length turns dynamic (step 2). Later generations of the same kind compile
# nothing.
COMPILES = {"static": 2, "tuple": 3}


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
@pytest.mark.parametrize("variant", ["", "nopad_"], ids=["padded", "unpadded"])
def test_generation_compiles_one_prefill_and_one_decode_graph_without_breaks(variant, kv_cache):
    backend = CountingBackend()
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=backend, kv_cache=kv_cache)
    expected = golden_expected("tiny-chatglm3")
    inputs = variant_inputs(expected, variant)

    result = run_protocol(model, *inputs)
    compare_to_golden(result, expected, variant, atol=1e-5)
    assert backend.count == COMPILES[kv_cache]
    assert sorted(model.transformer._graphs) == ["decode", "prefill"]
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0

    compiled = backend.count
    run_protocol(model, *inputs)
    assert backend.count == compiled, "a second identical generation must reuse the graphs"


def test_static_decode_graph_has_static_shapes_and_serves_every_step():
    backend = CountingBackend()
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=backend, kv_cache="static")
    model.transformer.static_cache_len = 32
    expected = golden_expected("tiny-chatglm3")
    run_protocol(model, *variant_inputs(expected, ""), n_decode=12)
    prefill, decode = backend.graphs
    # No symbolic sizes in the decode graph: every shape is a constant (what CUDA graphs and a
    # static torchair graph need).
    shapes = [getattr(n.meta.get("example_value"), "shape", ()) for n in decode.graph.nodes]
    assert shapes and not any(isinstance(d, torch.SymInt) for shape in shapes for d in shape)
    assert backend.count == 2


def test_graph_mode_defaults_to_the_static_cache():
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend="eager")
    assert model.transformer.options.cache_kind == "static"
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert type(out.past_key_values).__name__ == "StaticKVCache"
    eager = build_golden_model("tiny-chatglm3")
    assert eager.transformer.options.cache_kind == "tuple"
    assert isinstance(eager(input_ids=torch.tensor([[5, 6, 7]])).past_key_values, tuple)


def test_only_the_rotary_and_encoder_region_is_compiled():
    backend = CountingBackend()
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=backend)
    ids, mask, pos = variant_inputs(golden_expected("tiny-chatglm3"), "")
    model(input_ids=ids, attention_mask=mask, position_ids=pos)
    (graph,) = backend.graphs
    code = graph.code
    assert "encoder" in code and "layers" in code
    assert "word_embeddings" not in code and "output_layer" not in code
    # The data-dependent mask test (attention_mask.all()) happens outside: no such op inside.
    assert "aten.all" not in code and ".all(" not in code


def test_two_models_in_one_process_each_compile_their_own_graph():
    first_backend, second_backend = CountingBackend(), CountingBackend()
    first = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=first_backend)
    second = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=second_backend)
    with torch.no_grad():
        for param in second.parameters():
            param.mul_(1.5)
    eager_second = build_golden_model("tiny-chatglm3")
    eager_second.load_state_dict(second.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out_first = first(input_ids=ids).logits
        out_second = second(input_ids=ids).logits
        want_second = eager_second(input_ids=ids).logits
        want_first = build_golden_model("tiny-chatglm3")(input_ids=ids).logits
    assert first_backend.count == second_backend.count == 1  # one prefill graph each, none shared
    torch.testing.assert_close(out_second, want_second, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_first, want_first, rtol=0, atol=1e-5)
    assert first.transformer._graphs["prefill"] is not second.transformer._graphs["prefill"]


def test_exe_mode_environment_variable_turns_graph_mode_on(monkeypatch):
    monkeypatch.setenv("EXE_MODE", "dynamo")
    monkeypatch.setenv("CHATGLM_GRAPH_BACKEND", "eager")
    model = build_golden_model("tiny-chatglm3")
    assert model.transformer.options.exe_mode == "dynamo"
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert "prefill" in model.transformer._graphs
    eager = build_golden_model("tiny-chatglm3", exe_mode="eager")
    eager(input_ids=torch.tensor([[5, 6, 7]]))
    assert eager.transformer._graphs == {}


def test_set_runtime_options_switches_a_built_model_and_drops_old_graphs():
    backend = CountingBackend()
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=backend)
    ids = torch.tensor([[5, 6, 7]])
    model(input_ids=ids)
    model.transformer.set_runtime_options(exe_mode="eager")
    assert model.transformer._graphs == {}
    model(input_ids=ids)
    assert backend.count == 1
    with pytest.raises(ValueError, match="unknown runtime option"):
        model.transformer.set_runtime_options(attention="sdpa")


@pytest.mark.slow
def test_inductor_graph_matches_golden_with_static_cache():
    """One real inductor compile (CPU, weight freezing): the default graph backend off-NPU."""
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", kv_cache="static")
    expected = golden_expected("tiny-chatglm3")
    result = run_protocol(model, *variant_inputs(expected, ""), n_decode=3)
    assert torch.equal(result.greedy_tokens, expected["greedy_tokens"][:, :3])
    assert (result.prefill_logits - expected["prefill_logits"]).abs().max() <= 1e-5
    assert (result.decode_logits - expected["decode_logits"][:3]).abs().max() <= 1e-5


# --- any prompt length: capacity buckets owned by the model, prefill with a dynamic length -----


def _prompt(length: int, batch: int = 1):
    return torch.randint(3, 60, (batch, length), generator=torch.Generator().manual_seed(length))


def _generate(model, length: int, new: int, batch: int = 1):
    ids = _prompt(length, batch)
    return model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, eos_token_id=-1)


@pytest.mark.parametrize("kv_cache", ["static", "tuple"])
def test_sixty_prompt_lengths_times_three_lengths_of_answer_compile_at_most_eight_graphs(kv_cache):
    backend = CountingBackend()
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=backend, kv_cache=kv_cache)
    model.transformer.static_cache_len = 32  # buckets 32, 64, 128: growth is exercised too
    for length in range(2, 62):
        for new in (1, 3, 16):
            _generate(model, length, new)
    assert backend.count <= 8, backend.count
    if kv_cache == "static":
        # 3 capacity buckets (up to 61 + 16 = 77 positions): one decode graph each; prefill
        # compiles for any length at once, and once more when the second bucket makes dynamo
        # generalise the capacity too.
        assert model.transformer._kv_store.max_len == 128
        assert backend.count == 2 + 3


def test_the_static_cache_is_reused_across_generate_calls_without_new_graphs():
    backend = CountingBackend()
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=backend)
    first = _generate(model, 7, 4)
    buffers = model.transformer._kv_store.keys[0]
    compiled = backend.count
    second = _generate(model, 19, 5)  # another prompt length, same capacity bucket (256)
    assert model.transformer._kv_store.keys[0] is buffers
    assert backend.count == compiled == 2  # one prefill graph (dynamic length), one decode graph
    eager = build_golden_model("tiny-chatglm3")
    assert torch.equal(first, _generate(eager, 7, 4)) and torch.equal(second, _generate(eager, 19, 5))


def test_a_longer_generation_grows_the_cache_by_a_bucket_and_compiles_its_decode_graph():
    backend = CountingBackend()
    model = build_golden_model("tiny-chatglm3", exe_mode="dynamo", graph_backend=backend)
    model.transformer.static_cache_len = 16
    short = _generate(model, 6, 4)
    assert model.transformer._kv_store.max_len == 16 and backend.count == 2
    long = _generate(model, 20, 8)  # 28 positions: the next bucket
    # Its decode graph, and prefill generalised to any capacity (once, at the second bucket).
    assert model.transformer._kv_store.max_len == 32 and backend.count == 4
    # A cache grown mid-generation (past the reserved length) answers like the tuple cache.
    transformer = model.transformer
    with torch.no_grad():
        out = model(input_ids=_prompt(14))
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [token]
        for _ in range(24):  # 14 + 24 = 38 positions: grows 32 -> 64 on the way
            out = model(input_ids=token, past_key_values=past)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    assert transformer._kv_store.max_len == 64 and backend.count == 5  # one more decode graph only
    eager = build_golden_model("tiny-chatglm3")
    assert torch.equal(short, _generate(eager, 6, 4)) and torch.equal(long, _generate(eager, 20, 8))
    want = _generate(eager, 14, 25)[:, 14:]
    assert torch.equal(torch.cat(tokens, dim=1), want)
