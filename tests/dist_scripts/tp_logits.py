"""Child of tests/test_distributed.py: 1-rank reference logits vs tensor-parallel logits.

Run under a launcher (``torchrun --nproc_per_node=N`` or ``deepspeed --num_accelerators N``) on
CPU. Every rank builds the same seeded tiny chatglm3, computes the unsharded reference (a
left-padded prefill plus teacher-forced decode steps, tuple and static KV cache), shards the
model with ``chatglm_bench.distributed.shard_model``, runs the same inputs again, and rank 0
writes the largest difference and every rank's parameter bytes to ``--out`` as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (str(REPO), str(REPO / "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

TINY = dict(
    num_layers=2,
    padded_vocab_size=128,
    hidden_size=128,
    ffn_hidden_size=256,
    kv_channels=16,
    num_attention_heads=8,
    multi_query_attention=True,
    multi_query_group_num=2,
    seq_length=128,
    add_qkv_bias=True,
    original_rope=True,
    torch_dtype="float32",
)
DECODE_STEPS = 3


def build_tiny_model(seed: int = 0, **changes):
    """A tiny chatglm3-shaped model (8 query heads, 2 KV groups) with seeded random weights."""
    from chatglm_protocol import randomize_
    from configuration_chatglm import ChatGLMConfig
    from modeling_chatglm import ChatGLMForConditionalGeneration

    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**{**TINY, **changes}), empty_init=False)
    # Large enough weights that a wrong head or group assignment moves logits by O(1).
    return randomize_(model, seed, scale=0.1).eval()


def tiny_inputs(batch: int = 2, length: int = 8, pad: int = 3, seed: int = 1):
    """A left-padded batch as the tokenizer makes it: row 0 has ``pad`` pad tokens (id 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY["padded_vocab_size"], (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, :pad] = 0
    input_ids[0, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    decode_ids = torch.randint(3, TINY["padded_vocab_size"], (DECODE_STEPS, batch), generator=generator)
    return input_ids, attention_mask, position_ids, decode_ids


def run_logits(model, kv_cache: str) -> torch.Tensor:
    """Prefill logits [b, s, V] and the decode steps' [b, 1, V], concatenated on the sequence."""
    from chatglm_protocol import decode

    model.transformer.set_runtime_options(kv_cache=kv_cache)
    input_ids, mask, positions, decode_ids = tiny_inputs()
    run = decode(model, input_ids, mask, positions, DECODE_STEPS, feed=decode_ids, keep_logits=True)
    return torch.cat([run.prefill_logits, *run.step_logits], dim=1)


def main() -> None:
    from chatglm_bench.distributed import (
        close_distributed,
        detect_env,
        end_process,
        gather_per_rank,
        init_distributed,
        rank_param_bytes,
        shard_model,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher")
    args = parser.parse_args()

    torch.manual_seed(0)
    env = init_distributed(detect_env(), "cpu")
    model = build_tiny_model()
    kinds = ("tuple", "static")
    reference = {kind: run_logits(model, kind) for kind in kinds}
    full_bytes = rank_param_bytes(model)
    full_layer_bytes = rank_param_bytes(model.transformer.encoder.layers)

    model = shard_model(model, env, torch.float32)
    diffs = {kind: (run_logits(model, kind) - reference[kind]).abs().max().item() for kind in kinds}
    attention = model.transformer.encoder.layers[0].self_attention

    # bf16 on a CPU: one-row decode steps run the projections through the gemv kernel, shards too.
    half = build_tiny_model().to(torch.bfloat16)
    half_reference = run_logits(half, "static").float()
    half = shard_model(half, env, torch.bfloat16)
    half_diff = (run_logits(half, "static").float() - half_reference).abs().max().item()
    block = half.transformer.encoder.layers[0]
    layer_types = {
        name: type(getattr(getattr(block, parent), name)).__name__
        for parent, name in (
            ("self_attention", "query_key_value"),
            ("self_attention", "dense"),
            ("mlp", "dense_h_to_4h"),
            ("mlp", "dense_4h_to_h"),
        )
    }
    layer_types["output_layer"] = type(half.transformer.output_layer).__name__
    mine = {
        "rank": env.rank,
        "local_rank_arg": args.local_rank,
        "param_bytes": rank_param_bytes(model),
        "layer_bytes": rank_param_bytes(model.transformer.encoder.layers),
        "heads": attention.num_attention_heads_per_partition,
        "kv_groups": attention.num_multi_query_groups_per_partition,
        "max_abs_diff": diffs,
        "bf16_max_abs_diff": half_diff,
        "bf16_max_abs_logit": half_reference.abs().max().item(),
        "layer_types": layer_types,
        "output_rows": model.transformer.output_layer.weight.shape[0],
    }
    ranks = gather_per_rank(mine, env)
    if env.is_rank0:
        print("per-rank parameter bytes:", [r["param_bytes"] for r in ranks], "of", full_bytes)
        result = {
            "world_size": env.world_size,
            "backend": env.backend,
            "full_param_bytes": full_bytes,
            "full_layer_bytes": full_layer_bytes,
            "max_abs_logit": max(t.abs().max().item() for t in reference.values()),
            "ranks": ranks,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
    close_distributed()
    end_process(0)


if __name__ == "__main__":
    main()
