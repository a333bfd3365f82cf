"""Our model reproduces the original implementation's outputs (tests/golden, fp32, CPU)."""

import json
import shutil

import pytest
import torch
from conftest import REPO
from golden_protocol import (
    FIXTURES,
    GOLDEN,
    VARIANTS,
    build_golden_model,
    compare_to_golden,
    golden_expected,
    golden_weights,
    run_protocol,
    variant_inputs,
)

OUR_FILES = ("modeling_chatglm.py", "configuration_chatglm.py")


@pytest.mark.parametrize("backends", [("math", "math"), ("auto", "auto")], ids=["math", "auto"])
@pytest.mark.parametrize("variant", VARIANTS, ids=["padded", "unpadded", "single"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_prefill_and_decode_match_golden(fixture, variant, backends):
    model = build_golden_model(fixture, attention_backend=backends[0], rmsnorm_backend=backends[1])
    expected = golden_expected(fixture)
    result = run_protocol(model, *variant_inputs(expected, variant))
    compare_to_golden(result, expected, variant, atol=1e-5)
    assert torch.equal(result.final_mask, torch.ones_like(result.final_mask)) or variant == ""


def _checkpoint_copy(tmp_path, fixture):
    target = tmp_path / fixture.replace("-", "_")
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(GOLDEN / fixture / name, target / name)
    for name in OUR_FILES:
        shutil.copy(REPO / name, target / name)
    return target


@pytest.mark.parametrize("auto_class", ["AutoModel", "AutoModelForCausalLM"])
def test_auto_class_loads_checkpoint_without_key_mismatch(tmp_path, auto_class):
    import transformers

    directory = _checkpoint_copy(tmp_path, "tiny-chatglm3")
    loader = getattr(transformers, auto_class)
    model, info = loader.from_pretrained(
        str(directory), trust_remote_code=True, output_loading_info=True, torch_dtype=torch.float32
    )
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = golden_expected("tiny-chatglm3")
    result = run_protocol(model.eval(), *variant_inputs(expected, ""))
    compare_to_golden(result, expected, "", atol=1e-5)


def write_bin_shards(state_dict, directory, n_shards=3):
    """The layout of the real chatglm3-6b .bin release: pytorch_model-0000i-of-0000n.bin + index."""
    names = list(state_dict)
    weight_map = {}
    for i in range(n_shards):
        file_name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {name: state_dict[name].clone() for name in names[i::n_shards]}
        torch.save(part, directory / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_sharded_bin_checkpoint_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    directory = tmp_path / "bin_shards"
    directory.mkdir()
    shutil.copy(GOLDEN / "tiny-chatglm3" / "config.json", directory / "config.json")
    for name in OUR_FILES:
        shutil.copy(REPO / name, directory / name)
    weights = golden_weights("tiny-chatglm3")
    write_bin_shards(weights, directory)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(directory), trust_remote_code=True, output_loading_info=True, torch_dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded = model.state_dict()
    assert set(loaded) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
@pytest.mark.parametrize("variant", ["", "nopad_"], ids=["padded", "unpadded"])
def test_greedy_generate_gives_golden_tokens(variant, kv_cache):
    model = build_golden_model("tiny-chatglm3", kv_cache=kv_cache)
    expected = golden_expected("tiny-chatglm3")
    input_ids, attention_mask, _ = variant_inputs(expected, variant)
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=9, do_sample=False
    )
    new_tokens = output[:, input_ids.shape[1] :]
    want = torch.cat(
        [expected[variant + "greedy_tokens"], expected[variant + "next_token_after_decode"][:, None]], 1
    )
    assert torch.equal(new_tokens, want)
