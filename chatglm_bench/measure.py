"""Measure: prefill (全量) and per-step decode (增量) timings of one model, as plain records.

Everything here is a pure function of (model, inputs, options) returning dataclasses; printing and
files live in ``report``, ranks and sharding in ``distributed``.
"""

import contextlib
import math
import resource
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from chatglm_protocol import Run, decode


@dataclass
class Batch:
    """Left-padded model inputs for one batch size."""

    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, s]
    position_ids: torch.Tensor  # [b, s]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))


@dataclass
class Measurement:
    """Timings of one (batch size, mode, optimization set), plus hardware-level figures."""

    label: str
    batch_size: int
    input_len: int
    new_tokens: int
    exe_mode: str
    attention: str
    rmsnorm: str
    linear: str
    kv_cache: str
    prefill_ms: float
    decode_ms_mean: float
    decode_ms_p50: float
    decode_ms_p90: float
    decode_ms_p99: float
    ttft_ms: float
    decode_tokens_per_s: float
    e2e_ms: float
    first_run_overhead_s: float  # compile + first-touch cost: first run minus a steady run
    peak_memory_bytes: Optional[int]  # the larger of the two phases' peaks
    peak_memory_kind: str
    prefill_peak_memory_bytes: Optional[int]  # timed runs only (warm-up and compile excluded)
    decode_peak_memory_bytes: Optional[int]
    decode_bytes_per_step: float
    decode_bandwidth_gbs: float
    prefill_flops: float
    prefill_tflops: float
    iters: int
    prefill_ms_all: List[float] = field(default_factory=list)
    graph_backend: str = "-"  # the torch.compile backend in graph mode; "-" when eager
    quantization: str = "none"  # weights: none, int8 or int4 (model.quantize)

    def as_dict(self) -> Dict:
        return asdict(self)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (timings are meaningless without it)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "npu":
        return lambda: torch.npu.synchronize(device)
    return lambda: None


def timed_generation(
    model, batch: Batch, new_tokens: int, sync: Callable[[], None], on_step=None, on_prefill=None
) -> Run:
    """Greedy generation of exactly ``new_tokens`` tokens (no stopping), each forward timed: the
    first token from the prefill, ``new_tokens - 1`` decode steps after it (what HF ``generate``
    does, without its Python overhead)."""
    with torch.inference_mode():
        return decode(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.position_ids,
            new_tokens - 1,
            sync=sync,
            on_step=on_step,
            on_prefill=on_prefill,
        )


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class ModelFacts:
    """Sizes the hardware figures are computed from (per rank under tensor parallelism)."""

    weight_bytes_per_step: int  # bytes of every weight a decode step reads (not the embedding table)
    encoder_params: int
    head_params: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int


def model_facts(model) -> ModelFacts:
    transformer = model.transformer
    embedding = transformer.embedding.word_embeddings.weight
    # The bytes the model actually holds (parameters and buffers, each storage once): quantized
    # int8/int4 weights and their scales count at their real size.
    storages = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storages[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    total = sum(storages.values())
    attention = transformer.encoder.layers[0].self_attention
    head = transformer.output_layer

    def matmul_params(module) -> int:
        # in x out of every linear layer, whatever its storage (packed int4 holds half a byte
        # each); a layer DeepSpeed AutoTP replaced has no in/out_features, only its shard's
        # 2-D weight [out / ranks, in] (or [out, in / ranks]).
        total = 0
        for m in module.modules():
            weight = getattr(m, "weight", None)
            if hasattr(m, "out_features") and hasattr(m, "in_features"):
                total += m.in_features * m.out_features
            elif isinstance(weight, torch.Tensor) and weight.dim() == 2 and not m._modules:
                total += weight.shape[0] * weight.shape[1]
        return total

    return ModelFacts(
        weight_bytes_per_step=total - embedding.numel() * embedding.element_size(),
        encoder_params=matmul_params(transformer.encoder),
        head_params=head.in_features * head.out_features,
        layers=len(transformer.encoder.layers),
        heads=attention.num_attention_heads_per_partition,
        kv_heads=attention.num_multi_query_groups_per_partition,
        head_dim=attention.hidden_size_per_attention_head,
        dtype_bytes=embedding.element_size(),  # activations and KV cache: the float dtype
    )


def decode_bytes_per_step(facts: ModelFacts, batch: int, input_len: int, new_tokens: int) -> float:
    """Weights once, plus the K and V of every cached position (mean context over the run)."""
    mean_context = input_len + max(new_tokens - 1, 0) / 2.0
    kv = 2 * facts.layers * batch * facts.kv_heads * facts.head_dim * facts.dtype_bytes * mean_context
    return facts.weight_bytes_per_step + kv


def prefill_flops(facts: ModelFacts, batch: int, input_len: int) -> float:
    """Matmul FLOPs of a prefill: 2*params per token in the layers, the head on the last token
    only (return_last_logit), and causal attention (QK^T and PV over half the square)."""
    tokens = batch * input_len
    dense = 2.0 * facts.encoder_params * tokens + 2.0 * facts.head_params * batch
    attention = 2.0 * 2.0 * facts.layers * batch * facts.heads * facts.head_dim * input_len * input_len / 2.0
    return dense + attention


_PROC_STATUS = Path("/proc/self/status")
# Linux lets a process reset its own peak RSS (VmHWM) by writing 5 here: a CPU phase's own peak.
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_status_bytes(field: str) -> Optional[int]:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where absent."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_kind(device: torch.device) -> str:
    if device.type in ("cuda", "npu"):
        return "device allocator peak"
    return "peak RSS of the phase" if _PROC_CLEAR_REFS.exists() else "process lifetime peak RSS"


def peak_memory(device: torch.device):
    """(bytes, kind): the device allocator's peak since the last :func:`reset_peak_memory` on
    CUDA/NPU; on a Linux CPU the process's peak resident memory since then (VmHWM); elsewhere
    the process's peak RSS over its whole life (model loading included: it cannot be reset)."""
    kind = peak_memory_kind(device)
    if device.type in ("cuda", "npu"):
        return getattr(torch, device.type).max_memory_allocated(device), kind
    peak = cpu_status_bytes("VmHWM") if _PROC_CLEAR_REFS.exists() else None
    if peak is None:
        kind = "process lifetime peak RSS"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak, kind


def reset_peak_memory(device: torch.device) -> None:
    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).reset_peak_memory_stats(device)
    elif _PROC_CLEAR_REFS.exists():
        with contextlib.suppress(OSError):  # a sandbox may refuse it: the peak then keeps growing
            _PROC_CLEAR_REFS.write_text("5")


def measure(
    model,
    batch: Batch,
    new_tokens: int,
    *,
    label: str,
    options: Dict[str, str],
    warmup: int,
    iters: int,
    device: torch.device,
    progress=None,
) -> Tuple[Measurement, Run]:
    """Warm up (first run timed apart: compile), then ``iters`` timed generations.

    Warm-up runs decode only a few steps: enough to compile and touch the decode path, without
    paying for a full generation. With ``warmup=0`` the first timed run pays any compile and the
    overhead is not known (NaN). Returns the record and the last timed run (its tokens)."""
    sync = synchronizer(device)
    reset_peak_memory(device)
    warm_tokens = min(new_tokens, 4)
    first = None
    for _ in range(warmup):
        run = timed_generation(model, batch, warm_tokens, sync)
        first = first or run
    runs, phase_peaks = [], {}

    def prefill_done(cache):  # the prefill's peak, then the decode phase's from here
        sync()
        phase_peaks["prefill"] = max(phase_peaks.get("prefill", 0), peak_memory(device)[0])
        reset_peak_memory(device)

    for _ in range(iters):
        reset_peak_memory(device)
        runs.append(
            timed_generation(model, batch, new_tokens, sync, on_step=progress, on_prefill=prefill_done)
        )
        sync()
        phase_peaks["decode"] = max(phase_peaks.get("decode", 0), peak_memory(device)[0])
    steady = runs[-1]
    prefill_all = [r.prefill_s * 1e3 for r in runs]
    steps = [s * 1e3 for r in runs for s in r.step_s]
    prefill_ms = statistics.median(prefill_all)
    decode_mean = statistics.fmean(steps) if steps else float("nan")
    overhead = float("nan")
    if first is not None:
        warm_steady = prefill_ms / 1e3 + (decode_mean / 1e3 if steps else 0.0) * len(first.step_s)
        overhead = max(0.0, first.prefill_s + sum(first.step_s) - warm_steady)
    facts = model_facts(model)
    step_bytes = decode_bytes_per_step(facts, batch.size, batch.length, new_tokens)
    flops = prefill_flops(facts, batch.size, batch.length)
    memory_kind = peak_memory_kind(device)
    memory = max(phase_peaks.values()) if phase_peaks else None
    record = Measurement(
        label=label,
        batch_size=batch.size,
        input_len=batch.length,
        new_tokens=new_tokens,
        exe_mode=options["exe_mode"],
        attention=options["attention_backend"],
        rmsnorm=options["rmsnorm_backend"],
        linear=options.get("linear_backend", "aten"),
        kv_cache=options["kv_cache"],
        prefill_ms=prefill_ms,
        decode_ms_mean=decode_mean,
        decode_ms_p50=percentile(steps, 50),
        decode_ms_p90=percentile(steps, 90),
        decode_ms_p99=percentile(steps, 99),
        ttft_ms=prefill_ms,
        decode_tokens_per_s=batch.size * 1e3 / decode_mean if steps else float("nan"),
        e2e_ms=prefill_ms + (sum(steps) / max(len(runs), 1)),
        first_run_overhead_s=overhead,
        peak_memory_bytes=memory,
        peak_memory_kind=memory_kind,
        prefill_peak_memory_bytes=phase_peaks.get("prefill"),
        decode_peak_memory_bytes=phase_peaks.get("decode") if new_tokens > 1 else None,
        decode_bytes_per_step=step_bytes,
        decode_bandwidth_gbs=step_bytes / (decode_mean / 1e3) / 1e9 if steps else float("nan"),
        prefill_flops=flops,
        prefill_tflops=flops / (prefill_ms / 1e3) / 1e12,
        iters=iters,
        prefill_ms_all=prefill_all,
        graph_backend=str(options.get("graph_backend", "-")) if options["exe_mode"] == "dynamo" else "-",
    )
    return record, steady


class Interrupted(Exception):
    """Ctrl-C during :func:`run_plan`: carries what was measured before it (whole rows only)."""

    def __init__(self, records: List["Measurement"], answers: Optional[torch.Tensor], total: int):
        super().__init__(f"interrupted after {len(records)} of {total} runs")
        self.records, self.answers, self.total = records, answers, total


def run_plan(
    entries,
    model_for,
    batches: List[Batch],
    new_tokens: int,
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    progress=None,
    after_row: Optional[Callable[[], None]] = None,
) -> Tuple[List[Measurement], Optional[torch.Tensor]]:
    """Every plan entry at every batch size, by the same :func:`measure`. ``model_for(entry)``
    gives the model an entry runs; ``after_row``, if given, is called after each row is recorded
    (the benchmark reads the memory bandwidth again there). Returns the records and the tokens of
    the first steady run (the answers a real checkpoint gives). Ctrl-C raises
    :class:`Interrupted` with the rows finished so far."""
    records: List[Measurement] = []
    answers = None
    try:
        for entry in entries:
            model = None  # the previous entry's model may have to go before the next is built
            model = model_for(entry)
            for batch in batches:
                record, steady = measure(
                    model,
                    batch,
                    new_tokens,
                    label=entry.label,
                    options=entry.ran,
                    warmup=warmup,
                    iters=iters,
                    device=device,
                    progress=progress,
                )
                record.quantization = entry.quantization
                records.append(record)
                if answers is None:
                    answers = steady.tokens
                if after_row is not None:
                    after_row()
    except KeyboardInterrupt:
        raise Interrupted(records, answers, len(entries) * len(batches)) from None
    return records, answers
