"""Random-weight architectures (one table for the benchmark and make_tiny_checkpoint.py); the
recipe that fills a model with random weights is ``chatglm_protocol.randomize_`` (re-exported).

The weights are random: good for timing, tests and bug reports, useless for answers.
"""

from typing import Any, Dict

from chatglm_protocol import randomize_

# The chatglm3-6b architecture flags (grouped KV heads, biased QKV, RMSNorm, half-dim rotary),
# shared by every preset; the presets only change the sizes.
CHATGLM3_FLAGS: Dict[str, Any] = {
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "multi_query_attention": True,
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
    "rope_ratio": 1,
    "layernorm_epsilon": 1e-5,
    "pad_token_id": 0,
    "eos_token_id": 2,
}


def _sizes(layers, hidden, heads, head_dim, groups, ffn, vocab, context) -> Dict[str, int]:
    return {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "kv_channels": head_dim,
        "multi_query_group_num": groups,
        "ffn_hidden_size": ffn,
        "padded_vocab_size": vocab,
        "seq_length": context,
    }


# name -> config values. Every preset keeps chatglm3's grouped KV heads (2 groups).
PRESETS: Dict[str, Dict[str, Any]] = {
    # The golden fixtures' shape (shared/golden/tiny-chatglm3): a model that runs in milliseconds.
    "tiny": {**CHATGLM3_FLAGS, **_sizes(2, 64, 4, 16, 2, 160, 128, 256)},
    # The benchmark's default: chatglm3's head size at laptop size, the vocabulary halved so the
    # output layer does not dominate so small a model.
    "small-32k-vocab": {**CHATGLM3_FLAGS, **_sizes(4, 512, 8, 64, 2, 1376, 32768, 8192)},
    # The same layers with the real 65024-row vocabulary (~78M parameters): room for the real tokenizer.
    "small-real-vocab": {**CHATGLM3_FLAGS, **_sizes(4, 512, 8, 64, 2, 1376, 65024, 2048)},
    # The real architecture (6.24B parameters).
    "chatglm3-6b": {**CHATGLM3_FLAGS, **_sizes(28, 4096, 32, 128, 2, 13696, 65024, 8192)},
    # chatglm3-6b-32k: the same weights' shape, a 32768-token context and rope_ratio 50.
    "chatglm3-6b-32k": {
        **CHATGLM3_FLAGS,
        **_sizes(28, 4096, 32, 128, 2, 13696, 65024, 32768),
        "rope_ratio": 50,
    },
    # A long-context model a CPU prefills at 32k in minutes (the long-prompt measurements' shape:
    # 4 layers, hidden 1024, 16 heads, ffn 2736) with the 32k variant's context and rope_ratio.
    "small-32k-context": {
        **CHATGLM3_FLAGS,
        **_sizes(4, 1024, 16, 64, 2, 2736, 65024, 32768),
        "rope_ratio": 50,
    },
}


def preset_params(name: str) -> int:
    """Parameter count of a preset, without building it."""
    c = PRESETS[name]
    h, ffn, layers, vocab = c["hidden_size"], c["ffn_hidden_size"], c["num_layers"], c["padded_vocab_size"]
    qkv = c["num_attention_heads"] * c["kv_channels"] + 2 * c["multi_query_group_num"] * c["kv_channels"]
    per_layer = h * qkv + qkv + c["num_attention_heads"] * c["kv_channels"] * h + 3 * h * ffn + 2 * h
    return layers * per_layer + 2 * vocab * h + h


def build_preset_model(name: str, dtype, seed: int, context: int = 0):
    """A preset with random weights (timing only), in ``dtype``, in eval mode; its context
    (``seq_length``) widened to ``context`` positions when a run needs more (no weight depends
    on it: only the rotary table grows)."""
    import torch

    from configuration_chatglm import ChatGLMConfig
    from modeling_chatglm import ChatGLMForConditionalGeneration

    torch.manual_seed(seed)
    values = dict(PRESETS[name])
    values["seq_length"] = max(values["seq_length"], context)
    config = ChatGLMConfig(**values, torch_dtype=dtype)
    model = ChatGLMForConditionalGeneration(config, empty_init=True)
    return randomize_(model, seed).to(dtype).eval()
