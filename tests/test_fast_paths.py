"""Every fast path gives the original's answers: attention x RMSNorm x mode x cache x padding.

The ``npu`` ops run on CPU through tests/npu_reference.py, the documented semantics of each
torch_npu op, installed as a stand-in ``torch_npu`` only inside these tests.
"""

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
from npu_reference import import_model_module, install_fake_torch_npu

ATTENTION = ("npu", "sdpa", "math")
RMSNORM = ("npu", "fused", "math")
CACHES = ("tuple", "static")
VARIANTS = {"padded": "", "unpadded": "nopad_"}


@pytest.fixture
def npu(monkeypatch):
    """(stand-in record, model module that imported the stand-in torch_npu)."""
    fake = install_fake_torch_npu(monkeypatch)
    return fake, import_model_module()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_cache", CACHES)
@pytest.mark.parametrize("exe_mode", ["eager", "dynamo"])
@pytest.mark.parametrize("rmsnorm", RMSNORM)
@pytest.mark.parametrize("attention", ATTENTION)
def test_every_combination_matches_golden(npu, attention, rmsnorm, exe_mode, kv_cache, variant):
    fake, module = npu
    model = build_golden_model(
        "tiny-chatglm3",
        module=module,
        attention_backend=attention,
        rmsnorm_backend=rmsnorm,
        exe_mode=exe_mode,
        kv_cache=kv_cache,
        graph_backend="aot_eager" if kv_cache == "static" else "eager",
    )
    expected = golden_expected("tiny-chatglm3")
    result = run_protocol(model, *variant_inputs(expected, VARIANTS[variant]))
    compare_to_golden(result, expected, VARIANTS[variant], atol=1e-5)
    used = set(fake.op_names())
    assert ("npu_prompt_flash_attention" in used) == (attention == "npu")
    assert ("npu_incre_flash_attention" in used) == (attention == "npu")
    assert ("npu_rms_norm" in used) == (rmsnorm == "npu")
    assert ("scatter_update_" in used) == (attention == "npu" and kv_cache == "static")


@pytest.mark.parametrize("fixture", FIXTURES)
def test_npu_kernels_match_golden_on_both_fixtures(npu, fixture):
    _, module = npu
    expected = golden_expected(fixture)
    for kv_cache in CACHES:
        model = build_golden_model(
            fixture, module=module, attention_backend="npu", rmsnorm_backend="npu", kv_cache=kv_cache
        )
        for variant in ("", "nopad_", "single_"):
            compare_to_golden(run_protocol(model, *variant_inputs(expected, variant)), expected, variant)


def test_decode_calls_the_incremental_kernel_and_prefill_the_prompt_kernel(npu):
    fake, module = npu
    model = build_golden_model("tiny-chatglm3", module=module, attention_backend="npu", rmsnorm_backend="npu")
    expected = golden_expected("tiny-chatglm3")
    run_protocol(model, *variant_inputs(expected, ""), n_decode=2)
    attention_calls = [c for c in fake.calls if "flash_attention" in c.name]
    layers = model.config.num_layers
    assert [c.name for c in attention_calls[:layers]] == ["npu_prompt_flash_attention"] * layers
    assert [c.name for c in attention_calls[layers:]] == ["npu_incre_flash_attention"] * (2 * layers)


def test_torchair_backend_is_built_with_frozen_parameters(npu):
    fake, module = npu
    model = build_golden_model(
        "tiny-chatglm3",
        module=module,
        attention_backend="npu",
        rmsnorm_backend="npu",
        exe_mode="dynamo",
        graph_backend="torchair",
        kv_cache="static",
    )
    expected = golden_expected("tiny-chatglm3")
    compare_to_golden(run_protocol(model, *variant_inputs(expected, ""), n_decode=8), expected, "")
    # One backend per phase: both freeze the weights; the static-shape decode graph also moves
    # tiling onto the device, as Ascend's LLM recipes do.
    prefill, decode = fake.backends
    assert prefill.compiler_config.experimental_config.frozen_parameter is True
    assert decode.compiler_config.experimental_config.frozen_parameter is True
    assert prefill.compiler_config.experimental_config.tiling_schedule_optimize is False
    assert decode.compiler_config.experimental_config.tiling_schedule_optimize is True


def test_auto_picks_sdpa_and_fused_on_cpu_and_never_the_npu_kernels(npu):
    fake, module = npu
    model = build_golden_model("tiny-chatglm3", module=module)
    model(input_ids=torch.tensor([[5, 6, 7]]))
    chosen = model.transformer.backends
    assert (chosen.device, chosen.attention, chosen.rmsnorm, chosen.kv_cache, chosen.cache_writer) == (
        "cpu",
        "sdpa",
        "fused",
        "tuple",
        "index_copy",
    )
    assert (chosen.quant_kernel, chosen.compile, chosen.fallbacks) == ("none", None, ())
    assert fake.op_names() == []


@pytest.mark.parametrize("rmsnorm", RMSNORM)
@pytest.mark.parametrize("attention", ATTENTION)
def test_bf16_gives_the_same_greedy_tokens_as_the_bf16_baseline(npu, attention, rmsnorm):
    _, module = npu
    expected = golden_expected("tiny-chatglm3")
    baseline = build_golden_model(
        "tiny-chatglm3", dtype=torch.bfloat16, module=module, attention_backend="math", rmsnorm_backend="math"
    )
    fast = build_golden_model(
        "tiny-chatglm3",
        dtype=torch.bfloat16,
        module=module,
        attention_backend=attention,
        rmsnorm_backend=rmsnorm,
        kv_cache="static",
    )
    for variant in ("", "nopad_"):
        inputs = variant_inputs(expected, variant)
        want = run_protocol(baseline, *inputs).greedy_tokens
        got = run_protocol(fast, *inputs).greedy_tokens
        assert torch.equal(got, want), (variant, got, want)


# Chip rules (torch_npu / CANN docs): Atlas inference cards (Ascend310P*) run the fused attention
# kernels without grouped KV only and have no scatter_update_; Ascend950 dropped both attention
# kernels. Elsewhere (910B, A3) the fused kernels are chosen.
CHIPS = {
    "Ascend910B2": ("npu", "npu"),
    "Ascend910_9391": ("npu", "npu"),
    "Ascend310P3": ("sdpa", "index_copy"),
    "Ascend950PR_9599": ("sdpa", "index_copy"),
}


@pytest.mark.parametrize("chip", CHIPS)
def test_fused_npu_kernels_are_chosen_only_on_chips_that_support_them(npu, chip):
    fake, module = npu
    fake.device_name = chip
    options = module.RuntimeOptions()
    assert module._npu_chip_name(torch.device("cpu")) == chip
    chosen = module.resolve_backends(options, "npu", torch.float16, chip=chip)
    assert (chosen.attention, chosen.cache_writer) == CHIPS[chip]
    assert chosen.rmsnorm == "npu"
    # Every fallback is in the record, not only in a log line.
    assert bool(chosen.fallbacks) == (CHIPS[chip] != ("npu", "npu"))


@pytest.mark.parametrize("chip", ["Ascend310P3", "Ascend950PR_9599"])
def test_asking_for_the_npu_attention_on_a_chip_without_it_is_a_clear_error(npu, chip):
    _, module = npu
    options = module.RuntimeOptions(attention_backend="npu")
    with pytest.raises(
        ValueError, match=f"attention_backend='npu' cannot run here: {chip}.*CHATGLM_ATTENTION=sdpa"
    ):
        module.resolve_backends(options, "npu", torch.float16, chip=chip)


def test_decode_kernel_gets_a_contiguous_mask_even_from_a_strided_one(npu):
    """The incremental kernel rejects non-contiguous inputs, the mask included (aclnn docs)."""
    fake, module = npu
    model = build_golden_model("tiny-chatglm3", module=module, attention_backend="npu")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        out = model.transformer(input_ids=ids)
        # The original's mask form (True = masked), [b, 1, 1, past + 1], laid out column-major
        # on purpose (dense but not contiguous: elementwise ops keep such strides).
        strided = torch.zeros(5, 2, dtype=torch.bool).t()[:, None, None, :]
        assert not strided.is_contiguous()
        step = model.transformer(
            input_ids=torch.tensor([[13], [14]]),
            past_key_values=out.past_key_values,
            full_attention_mask=strided,
        )
    reference = build_golden_model("tiny-chatglm3", attention_backend="math").transformer
    with torch.no_grad():
        past = reference(input_ids=ids).past_key_values
        want = reference(input_ids=torch.tensor([[13], [14]]), past_key_values=past).last_hidden_state
    torch.testing.assert_close(step.last_hidden_state, want, rtol=0, atol=1e-5)
    assert "npu_incre_flash_attention" in fake.op_names()
