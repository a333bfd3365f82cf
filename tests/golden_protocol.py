"""The golden fixtures' call protocol (tests/golden/README.md), run against our model."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file

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


def cache_of(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


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


@torch.no_grad()
def run_protocol(model, input_ids, attention_mask, position_ids, n_decode: int = N_DECODE) -> ProtocolResult:
    """Prefill, then ``n_decode`` greedy steps, exactly as the fixtures were produced."""
    batch, length = input_ids.shape
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        past_key_values=None,
        use_cache=True,
        return_dict=True,
        return_last_logit=False,
    )
    prefill_logits = out.logits.float()
    cache = cache_of(out)
    prefill_cache = stack_cache(cache).float().clone()
    token = out.logits[:, -1].argmax(-1)
    mask = attention_mask
    tokens: List[torch.Tensor] = []
    logits: List[torch.Tensor] = []
    for step in range(n_decode):
        tokens.append(token)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=-1)
        out = model(
            input_ids=token[:, None],
            position_ids=torch.full((batch, 1), length + step),
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
            return_last_logit=True,
        )
        logits.append(out.logits[:, -1].float())
        cache = cache_of(out)
        token = out.logits[:, -1].argmax(-1)
    return ProtocolResult(
        prefill_logits=prefill_logits,
        prefill_cache=prefill_cache,
        greedy_tokens=torch.stack(tokens, dim=1),
        decode_logits=torch.stack(logits),
        next_token=token,
        final_cache=stack_cache(cache).float(),
        final_mask=mask,
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
