"""Features kept from the original, real-release configs, bad input, self-containment."""

import ast
import json
import shutil
import sys
import types
import uuid

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from golden_protocol import GOLDEN, build_golden_model, golden_config, golden_expected, variant_inputs

CONFIGS = REPO / "tests" / "data" / "configs"
RELEASES = ("chatglm3-6b", "chatglm3-6b-base", "chatglm3-6b-32k", "chatglm3-6b-128k", "chatglm2-6b")


def _config(**changes):
    from configuration_chatglm import ChatGLMConfig

    values = golden_config("tiny-chatglm3")
    values.update(changes)
    return ChatGLMConfig(**values)


def _random_model(seed=0, cls_name="ChatGLMForConditionalGeneration", **changes):
    import modeling_chatglm
    from chatglm_protocol import randomize_

    torch.manual_seed(seed)
    model = getattr(modeling_chatglm, cls_name)(_config(**changes), empty_init=False)
    return randomize_(model, seed).eval()


# --- real releases --------------------------------------------------------------------------


def _expected_6b_shapes(config):
    h, ffn, vocab, layers = 4096, 13696, 65024, 28
    qkv = 32 * 128 + 2 * 2 * 128
    shapes = {
        "transformer.embedding.word_embeddings.weight": (vocab, h),
        "transformer.rotary_pos_emb.inv_freq": (32,),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (vocab, h),
    }
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attention.query_key_value.weight": (qkv, h),
                p + "self_attention.query_key_value.bias": (qkv,),
                p + "self_attention.dense.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.dense_h_to_4h.weight": (2 * ffn, h),
                p + "mlp.dense_4h_to_h.weight": (h, ffn),
            }
        )
    return shapes


@pytest.mark.parametrize("release", RELEASES)
def test_release_config_builds_the_real_parameter_set(release):
    from configuration_chatglm import ChatGLMConfig
    from modeling_chatglm import ChatGLMForConditionalGeneration

    values = json.loads((CONFIGS / f"{release}.json").read_text())
    config = ChatGLMConfig(**values)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config, empty_init=False)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert state == _expected_6b_shapes(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 6_243_584_000
    assert model.transformer.rotary_pos_emb.rope_ratio == values.get("rope_ratio", 1)
    assert model.transformer.seq_length == values["seq_length"]


def test_model_runs_with_the_original_configuration_class_fields_only():
    """Users who copy only modeling_chatglm.py keep the checkpoint's older config class: no
    rope_ratio (chatglm2) and none of our switches."""
    from modeling_chatglm import ChatGLMForConditionalGeneration

    config = _config()
    for field in (
        "rope_ratio",
        "attention_backend",
        "rmsnorm_backend",
        "kv_cache",
        "exe_mode",
        "graph_backend",
    ):
        delattr(config, field)
    model = ChatGLMForConditionalGeneration(config, empty_init=False).eval()
    assert model.transformer.rotary_pos_emb.rope_ratio == 1
    assert model.transformer.options.exe_mode == "eager"
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.logits.shape == (1, 3, 128)


# --- outputs kept from the original ---------------------------------------------------------


def test_return_last_logit_is_the_last_position_of_the_full_logits():
    model = build_golden_model("tiny-chatglm3")
    ids, mask, pos = variant_inputs(golden_expected("tiny-chatglm3"), "")
    full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    last = model(input_ids=ids, attention_mask=mask, position_ids=pos, return_last_logit=True).logits
    assert last.shape == (2, 1, 128)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)


def test_output_hidden_states_are_sequence_first_and_end_before_the_final_norm():
    model = build_golden_model("tiny-chatglm3")
    ids, mask, pos = variant_inputs(golden_expected("tiny-chatglm3"), "")
    out = model.transformer(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert all(h.shape == (12, 2, 64) for h in out.hidden_states)
    assert out.last_hidden_state.shape == (12, 2, 64)
    final = model.transformer.encoder.final_layernorm(out.hidden_states[-1])
    torch.testing.assert_close(final, out.last_hidden_state)
    embeddings = model.transformer.embedding(ids)  # the original's [s, b, h] embedding output
    torch.testing.assert_close(out.hidden_states[0], embeddings)


def test_return_dict_false_gives_the_original_tuple_order():
    model = build_golden_model("tiny-chatglm3")
    ids = torch.tensor([[5, 6, 7]])
    logits, cache = model(input_ids=ids, return_dict=False)
    assert logits.shape == (1, 3, 128)
    assert len(cache) == 2 and cache[0][0].shape == (3, 1, 2, 16)


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_ptuning_prefix_equals_the_prefix_passed_as_past(prefix_projection):
    """pre_seq_len prepends the prefix encoder's K/V as past and extends the mask with ones."""
    pre = 3
    model = _random_model(pre_seq_len=pre, prefix_projection=prefix_projection)
    plain = _random_model()
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("transformer.prefix_encoder")}
    plain.load_state_dict(shared)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prefix_encoder" not in n)

    ids = torch.tensor([[0, 0, 9, 10, 11], [12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = torch.arange(5).repeat(2, 1)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos)
        # The documented layout: [b, pre, layers*2*groups*d] -> per layer (k, v) [pre, b, groups, d].
        kv = model.transformer.prefix_encoder(torch.arange(pre).expand(2, pre))
        kv = kv.view(2, pre, 2 * 2, 2, 16).permute(2, 1, 0, 3, 4)
        past = tuple((kv[2 * i], kv[2 * i + 1]) for i in range(2))
        full_mask = torch.cat([torch.ones(2, pre, dtype=mask.dtype), mask], dim=1)
        want = plain(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=past)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-6)
    assert got["cache" if "cache" in got else "past_key_values"][0][0].shape[0] == pre + 5


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from make_tiny_checkpoint import make_tiny_checkpoint

    # A unique directory name: transformers caches remote code under the directory's name.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny_{uuid.uuid4().hex[:8]}", seed=5)


def test_ptuning_recipe_runs_and_equals_its_prefix_as_past_on_this_transformers(tiny_checkpoint):
    """The official P-tuning v2 recipe through AutoConfig/AutoModel. Its logits equal the same
    prefix passed as an explicit past to the plain model, a path that is the same arithmetic on
    every transformers version (so 4.31 and 5.x give the same P-tuned logits)."""
    from transformers import AutoConfig, AutoModel

    pre = 4
    config = AutoConfig.from_pretrained(str(tiny_checkpoint), trust_remote_code=True, pre_seq_len=pre)
    model = AutoModel.from_pretrained(str(tiny_checkpoint), config=config, trust_remote_code=True).float()
    fresh = model.transformer.prefix_encoder.embedding.weight
    # A new prefix starts from torch's default N(0, 1) init, never uninitialised memory.
    assert torch.isfinite(fresh).all() and 0.5 < fresh.std().item() < 2.0
    width = fresh.shape[1]
    prefix = torch.randn(pre, width, generator=torch.Generator().manual_seed(3)) * 0.1
    model.transformer.prefix_encoder.load_state_dict({"embedding.weight": prefix})
    ids = torch.tensor([[9, 10, 11, 12, 13]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        plain = AutoModel.from_pretrained(str(tiny_checkpoint), trust_remote_code=True).float()
        layers, groups, d = config.num_layers, config.multi_query_group_num, config.kv_channels
        kv = prefix.view(1, pre, 2 * layers, groups, d).permute(2, 1, 0, 3, 4)
        past = tuple((kv[2 * i], kv[2 * i + 1]) for i in range(layers))
        want = plain(
            input_ids=ids,
            attention_mask=torch.ones(1, pre + 5, dtype=torch.long),
            position_ids=torch.arange(5)[None],
            past_key_values=past,
        ).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_new_classification_head_is_initialised_like_a_fresh_linear(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_checkpoint), trust_remote_code=True, num_labels=3
    )
    head = model.classifier_head
    bound = 1 / head.in_features**0.5  # nn.Linear's default (Kaiming-uniform) bound
    assert torch.isfinite(head.weight).all() and head.weight.abs().max() <= bound
    assert head.weight.std() > bound / 4 and head.bias.abs().max() <= bound


def test_sequence_classification_uses_the_last_position():
    model = _random_model(cls_name="ChatGLMForSequenceClassification", num_labels=3)
    ids = torch.tensor([[0, 9, 10, 11], [12, 13, 14, 15]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model.classifier_head(hidden[-1])
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(want, labels))
    assert {"classifier_head.weight", "classifier_head.bias"} <= set(model.state_dict())


# --- bad input: precise errors --------------------------------------------------------------


def test_input_longer_than_the_context_is_refused():
    model = _random_model(seq_length=16)
    with pytest.raises(ValueError, match=r"seq_length=16.*shorten the prompt"):
        model(input_ids=torch.ones(1, 17, dtype=torch.long))
    out = model(input_ids=torch.ones(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="needs 17 positions"):
        model(input_ids=torch.ones(1, 7, dtype=torch.long), past_key_values=out.past_key_values)


def test_attention_mask_of_the_wrong_shape_is_refused():
    model = _random_model()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\).*\[2, 5\]"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_right_padded_batch_is_refused_not_silently_wrong():
    model = _random_model()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded.*padding_side = 'left'"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=mask)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert model(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=left).logits.shape == (
        2,
        4,
        128,
    )


def test_unsupported_dtype_is_refused():
    model = _random_model().double()
    with pytest.raises(TypeError, match="float64 is not supported on cpu"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "env, value, message",
    [
        ("EXE_MODE", "graph", r"EXE_MODE='graph' is not valid; use one of: eager, dynamo"),
        (
            "CHATGLM_ATTENTION",
            "flash",
            r"CHATGLM_ATTENTION='flash' is not valid; use one of: auto, npu, sdpa, math",
        ),
        ("CHATGLM_RMSNORM", "apex", r"CHATGLM_RMSNORM='apex' is not valid"),
        (
            "CHATGLM_KV_CACHE",
            "paged",
            r"CHATGLM_KV_CACHE='paged' is not valid; use one of: auto, tuple, static",
        ),
    ],
)
def test_invalid_switch_values_name_the_valid_ones(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=message):
        _random_model()


def test_config_field_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("EXE_MODE", "dynamo")
    assert _random_model().transformer.options.exe_mode == "dynamo"
    assert _random_model(exe_mode="eager").transformer.options.exe_mode == "eager"


@pytest.mark.parametrize("field", ["attention_backend", "rmsnorm_backend"])
def test_npu_op_without_torch_npu_names_the_fix(field):
    import modeling_chatglm

    if modeling_chatglm._TORCH_NPU is not None:
        pytest.fail("this machine imports torch_npu: the test expects it absent")
    model = _random_model(**{field: "npu"})
    with pytest.raises(RuntimeError, match=r"needs torch_npu.*install torch_npu"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_checkpoint_dir_errors_are_precise(tmp_path):
    from modeling_chatglm import ChatGLMForConditionalGeneration

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChatGLMForConditionalGeneration.from_pretrained(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ChatGLMForConditionalGeneration.from_pretrained(str(empty))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama', not 'chatglm'"):
        ChatGLMForConditionalGeneration.from_pretrained(str(llama))
    good = tmp_path / "good"
    good.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(GOLDEN / "tiny-chatglm3" / name, good / name)
    assert ChatGLMForConditionalGeneration.from_pretrained(str(good)).config.num_layers == 2


# --- self-contained -------------------------------------------------------------------------


def test_model_file_imports_only_torch_and_transformers_at_top_level():
    tree = ast.parse((REPO / "modeling_chatglm.py").read_text())
    third_party = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            third_party |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            third_party.add(node.module.split(".")[0])
    third_party -= set(sys.stdlib_module_names)
    assert third_party == {"torch", "transformers"}


def test_model_module_holds_no_mutable_state():
    import modeling_chatglm

    mutable = {
        name
        for name, value in vars(modeling_chatglm).items()
        if not name.startswith("__") and isinstance(value, (list, dict, set, bytearray))
    }
    assert mutable == set()
    assert isinstance(modeling_chatglm.ATTENTION_BACKENDS, types.MappingProxyType)


def test_static_cache_refuses_to_continue_an_older_state_instead_of_answering_wrongly():
    model = _random_model(kv_cache="static")
    model.transformer.static_cache_len = 16  # room to grow in place (a regrown cache is a copy)
    ids = torch.tensor([[5, 6, 7, 8]])
    first = model(input_ids=ids, use_cache=True)
    past = first["cache" if "cache" in first else "past_key_values"]
    step = model(input_ids=torch.tensor([[9]]), past_key_values=past, position_ids=torch.tensor([[4]]))
    newer = step["cache" if "cache" in step else "past_key_values"]
    assert newer.seq_len == 5 and past.seq_len == 4
    with pytest.raises(ValueError, match="continue from the newest past_key_values.*kv_cache='tuple'"):
        model(input_ids=torch.tensor([[10]]), past_key_values=past, position_ids=torch.tensor([[4]]))
    # The newest one continues and matches the tuple cache.
    out = model(input_ids=torch.tensor([[10]]), past_key_values=newer, position_ids=torch.tensor([[5]]))
    model.transformer.set_runtime_options(kv_cache="tuple")
    tuple_out = model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]]))
    torch.testing.assert_close(out.logits[:, -1], tuple_out.logits[:, -1], rtol=0, atol=1e-5)


def test_set_runtime_options_validates_and_leaves_the_config_alone():
    model = _random_model()
    model.transformer.set_runtime_options(exe_mode="dynamo", kv_cache="static")
    assert model.transformer.options.exe_mode == "dynamo" and model.transformer.options.kv_cache == "static"
    assert model.config.exe_mode is None and model.config.kv_cache is None
    with pytest.raises(ValueError, match="config.exe_mode='graph' is not valid"):
        model.transformer.set_runtime_options(exe_mode="graph")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rotary_embedding_rounds_bit_for_bit_as_the_original_formula(dtype):
    """The pair rotation (query and key heads in one call; factors (cos, cos) and (-sin, sin))
    against the original's arithmetic written out: four products and two sums, each rounded to
    the dtype. The model's own factors are checked by the golden tests."""
    import modeling_chatglm as M

    rotary = M.RotaryEmbedding(64, dtype=dtype)
    table = rotary.forward_impl(4096, 64, dtype, "cpu")  # [positions, 32, 2]: (cos, sin)
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4096, (2, 9), generator=generator)
    x = (torch.randn(2, 9, 6, 128, generator=generator) * 10).to(dtype)
    rope = table[positions].unsqueeze(2)  # [b, s, 1, 32, 2]
    x0, x1 = x[..., :64:2], x[..., 1:64:2]
    cos, sin = rope[..., 0], rope[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(3)
    expected = torch.cat([rotated, x[..., 64:]], -1)
    factors = torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)], -2)[:, :, 0]
    got = M.rotate_pairs(x, factors)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), expected.view(bits))
