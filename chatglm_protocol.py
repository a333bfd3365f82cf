"""The decode protocol and the random-weight recipe, shared by the model's tests and the benchmark.

Neither belongs to one of them: the tests compare a model's prefill and step logits over this
protocol with the golden fixtures (made by the same protocol and recipe), the benchmark times it.
Both import it from here, so there is one implementation (``chatglm_bench.measure`` and
``chatglm_bench.presets`` re-export what they use).
"""

import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch

# Draws per call of the generator: bounds the float32 scratch memory while filling the 6B model.
_CHUNK = 1 << 24


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit, the first one on ties (``argmax(-1)``'s choice):
    ``max(-1)``, which ATen runs over four times faster on a CPU (a [1, 64896] bf16 row: 54
    against 240 us on a 2-core Xeon, paid by every timed decode step)."""
    return logits.max(-1).indices


def random_chunks(name: str, numel: int, generator, scale: float = 0.02):
    """The float32 values :func:`randomize_` gives parameter ``name`` (``numel`` elements), as
    consecutive flat chunks of at most ``_CHUNK``, drawn from ``generator`` exactly as it does.
    Called for each parameter in ``named_parameters()`` order with one generator, it yields the
    same model piece by piece (``scripts/make_tiny_checkpoint.py`` writes big checkpoints so)."""
    for start in range(0, numel, _CHUNK):
        values = torch.randn(min(_CHUNK, numel - start), generator=generator, dtype=torch.float32)
        values.mul_(scale)
        if name.endswith("layernorm.weight"):
            values += 1.0
        yield values


def randomize_(model, seed: int, scale: float = 0.02):
    """Overwrite every parameter, in ``named_parameters()`` order, with ``randn * scale`` drawn in
    float32 from a generator seeded with ``seed`` (RMSNorm weights: 1 + that, so the norms do not
    squash activations to zero), as the golden fixtures were made. Returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat, start = param.view(-1), 0
            for values in random_chunks(name, param.numel(), generator, scale):
                flat[start : start + values.numel()].copy_(values)
                start += values.numel()
    return model


@dataclass
class Run:
    """One generation: prefill seconds, per-decode-step seconds, the token each forward chose
    (greedy, ``[b, steps + 1]``: the prefill's, then each step's) and, when kept, the logits
    (``prefill_logits``; ``step_logits``, one ``[b, 1, vocab]`` per step) and the final cache."""

    prefill_s: float
    step_s: List[float]
    tokens: torch.Tensor  # [b, steps + 1]
    prefill_logits: Optional[torch.Tensor] = None
    step_logits: List[torch.Tensor] = field(default_factory=list)
    cache: Any = None
    mask: Optional[torch.Tensor] = None  # the attention mask after the last step


def cache_of(outputs):
    # transformers 5 renamed the outputs' past_key_values field to cache.
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    steps: int,
    *,
    feed: Optional[torch.Tensor] = None,
    first_position: Optional[torch.Tensor] = None,
    keep_logits: bool = False,
    sync: Callable[[], None] = lambda: None,
    on_prefill: Optional[Callable[[Any], None]] = None,
    on_step: Optional[Callable[[], None]] = None,
) -> Run:
    """The decode protocol every caller shares: a prefill over the (left-padded) prompts, then
    ``steps`` one-token forwards on the KV cache, each timed (``sync`` waits for the device).

    Each step feeds the previous forward's greedy token, or ``feed[step]`` (``[steps, b]``) when
    given; positions continue from the prompt's last one (``position_ids=None``: the model's
    own ``0..length-1``), or from ``first_position`` (``[b, 1]``) when given. ``keep_logits``: the prefill returns every position's logits and the
    run keeps them all (else only the last position is computed, as in generation).
    ``on_prefill(cache)`` sees the cache right after the prefill (before decode changes it)."""
    batch, length = input_ids.shape
    sync()
    start = time.perf_counter()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        return_dict=True,
        return_last_logit=not keep_logits,
    )
    token = greedy(out.logits[:, -1])
    sync()
    prefill_s = time.perf_counter() - start
    prefill_logits = out.logits if keep_logits else None
    tokens, step_logits, times = [token], [], []
    cache = cache_of(out)
    if on_prefill is not None:
        on_prefill(cache)
    mask = attention_mask if attention_mask is not None else input_ids.new_ones((batch, length))
    if first_position is not None:
        position = first_position - 1
    elif position_ids is not None:
        position = position_ids[:, -1:]
    else:
        position = input_ids.new_full((batch, 1), length - 1)
    ones = mask.new_ones((batch, 1))
    for step in range(steps):
        mask = torch.cat([mask, ones], dim=-1)
        position = position + 1
        fed = token if feed is None else feed[step]
        start = time.perf_counter()
        out = model(
            input_ids=fed[:, None],
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
            return_last_logit=True,
        )
        token = greedy(out.logits[:, -1])
        sync()
        times.append(time.perf_counter() - start)
        cache = cache_of(out)
        tokens.append(token)
        if keep_logits:
            step_logits.append(out.logits)
        if on_step is not None:
            on_step()
    return Run(
        prefill_s=prefill_s,
        step_s=times,
        tokens=torch.stack(tokens, dim=1),
        prefill_logits=prefill_logits,
        step_logits=step_logits,
        cache=cache,
        mask=mask,
    )
