"""The golden fixtures' call protocol (tests/golden/README.md), run against our model."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file

from chatglm_protocol import decode

GOLDEN = Path(__file__).resolve().parent / "golden"
FIXTURES = ("tiny-chatglm3", "tiny-chatglm3-32k")
VARIANTS = ("", "nopad_", "single_")  # padded batch, unpadded batch, one token
N_DECODE = 8


def golden_config(name: str) -> dict:
    return json.loads((GOLDEN / name / "config.json").read_text())


def golden_weights(name: str) -> Dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / name / "model.safetensors"))


def golden_expected(name: str) -> Dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / name / "expected.safetensors"))


def build_golden_model(name: str, dtype: torch.dtype = torch.float32, module=None, **options):
    """Our ChatGLMForConditionalGeneration with the fixture's weights and the given fast-path
    options; ``module`` is a separately imported copy of modeling_chatglm (e.g. one that saw the
    stand-in torch_npu)."""
    if module is None:
        import modeling_chatglm as module

    config = module.ChatGLMConfig(**golden_config(name))
    for key, value in options.items():
        setattr(config, key, value)
    model = module.ChatGLMForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(golden_weights(name), strict=True)
    assert not missing and not unexpected
    return model.to(dtype).eval()


def stack_cache(cache) -> torch.Tensor:
    """[layers, 2, seq, batch, groups, d] from a legacy tuple cache or a StaticKVCache."""
    return torch.stack([torch.stack([k, v]) for k, v in cache])


@dataclass
class ProtocolResult:
    prefill_logits: torch.Tensor
    prefill_cache: torch.Tensor
    greedy_tokens: torch.Tensor
    decode_logits: torch.Tensor
    next_token: torch.Tensor
    final_cache: torch.Tensor
    final_mask: torch.Tensor


def variant_inputs(expected, variant: str):
    if variant == "":
        ids = expected["input_ids"]
        return ids, expected["attention_mask"], expected["position_ids"]
    ids = expected[variant + "input_ids"]
    batch, length = ids.shape
    return ids, torch.ones_like(ids), torch.arange(length).repeat(batch, 1)


def run_protocol(model, input_ids, attention_mask, position_ids, n_decode: int = N_DECODE) -> ProtocolResult:
    """Prefill, then ``n_decode`` greedy steps (the shared decode protocol), as the fixtures were
    produced: step i at position ``length + i`` for every row; the prefill cache is copied before
    decoding changes it."""
    snapshot = []
    batch, length = input_ids.shape
    run = decode(
        model,
        input_ids,
        attention_mask,
        position_ids,
        n_decode,
        first_position=torch.full((batch, 1), length),
        keep_logits=True,
        on_prefill=lambda cache: snapshot.append(stack_cache(cache).float().clone()),
    )
    return ProtocolResult(
        prefill_logits=run.prefill_logits.float(),
        prefill_cache=snapshot[0],
        greedy_tokens=run.tokens[:, :-1],
        decode_logits=torch.stack([logits[:, -1].float() for logits in run.step_logits]),
        next_token=run.tokens[:, -1],
        final_cache=stack_cache(run.cache).float(),
        final_mask=run.mask,
    )


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare_to_golden(result: ProtocolResult, expected, variant: str, atol: Optional[float] = 1e-5) -> dict:
    """Max abs differences per tensor; asserts tokens equal and (if atol) logits/caches within atol."""
    diffs = {
        "prefill_logits": max_abs(result.prefill_logits, expected[variant + "prefill_logits"]),
        "decode_logits": max_abs(result.decode_logits, expected[variant + "decode_logits"]),
        "prefill_cache": max_abs(result.prefill_cache, expected[variant + "prefill_past_key_values"]),
        "final_cache": max_abs(result.final_cache, expected[variant + "final_past_key_values"]),
    }
    assert torch.equal(result.greedy_tokens, expected[variant + "greedy_tokens"]), (variant, diffs)
    assert torch.equal(result.next_token, expected[variant + "next_token_after_decode"]), (variant, diffs)
    if atol is not None:
        assert all(d <= atol for d in diffs.values()), (variant, diffs)
    return diffs
