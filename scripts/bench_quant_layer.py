"""Time one 6B-shaped linear layer with every kernel side by side: dense, weight-only and W8A8.

    python scripts/bench_quant_layer.py                      # the three big 6B shapes, 1 and 128 rows
    python scripts/bench_quant_layer.py --shape 27392 4096 --rows 1 4 --rounds 5

Random weights (timing only). All kernels of a shape live in one process and are timed in
interleaved rounds (kernel A, B, C, ..., then again), so a neighbour's load hits them alike; each
figure is the best of ``--rounds``. Before every timed call a ``--evict-mib`` buffer is read, so
the weight comes from memory as in a whole decode step (a 6B model is far larger than any cache;
one layer alone would otherwise be read from a large L3). GB/s = weight bytes read / time.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import modeling_chatglm as M  # noqa: E402


def prepack_linear_weight(weight: torch.Tensor, rows: Optional[int] = None) -> Optional[torch.Tensor]:
    """oneDNN's reordered (blocked) copy of a float ``[out, in]`` weight for activations of about
    ``rows`` rows, or None where oneDNN cannot take it (no mkldnn build, a dtype it lacks here).

    ATen's own float matmul hands an unpacked weight to oneDNN on every call (bf16 on
    AVX512-BF16/AMX CPUs), which reorders it each time; a prepacked weight skips that.
    """
    op = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if op is None or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and not M._cpu_has_fast_half_gemm():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    return op(weight.detach().contiguous(), rows)


def prepacked_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` on a weight from :func:`prepack_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# chatglm3-6b: dense_h_to_4h, dense_4h_to_h, query_key_value ([out, in]).
SHAPES_6B = ((27392, 4096), (4096, 13696), (4608, 4096))


def inductor_linear(weight: torch.Tensor, rows: int):
    """``F.linear`` on ``weight`` compiled by inductor the way the issue proposes for CPU graph
    mode: weights frozen (prepacked) and ``max_autotune`` choosing between its CPP GEMM template
    and ATen. Returns (compiled call, compile seconds)."""
    import torch._inductor.config as inductor_config

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    options = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
    compiled = torch.compile(linear.eval(), options=options, fullgraph=True, dynamic=False)
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    start = time.perf_counter()
    with torch.no_grad(), inductor_config.patch(freezing=True):  # the option alone does not freeze here
        compiled(x)
    return compiled, time.perf_counter() - start


def kernels(weight: torch.Tensor, rows: int, inductor: bool = False):
    """name -> (call on x, activation dtype, weight bytes read per call)."""
    out_features, in_features = weight.shape
    table = {}
    for dtype in (torch.float32, torch.bfloat16):
        dense = weight.to(dtype)
        short = str(dtype).replace("torch.", "")
        table[f"{short} F.linear"] = (lambda x, w=dense: F.linear(x, w), dtype, dense.nbytes)
        if inductor:
            compiled, seconds = inductor_linear(dense, rows)
            print(f"compiled {short} {tuple(weight.shape)} for {rows} rows in {seconds:.1f} s")
            table[f"{short} inductor (freezing + max_autotune)"] = (compiled, dtype, dense.nbytes)
        packed = prepack_linear_weight(dense, rows)
        if packed is not None:
            table[f"{short} prepacked (oneDNN)"] = (
                lambda x, w=packed: prepacked_linear(x, w, None),
                dtype,
                dense.nbytes,
            )
    linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    for bits, kernel in ((8, "cpu"), (8, "cpu_w8a8"), (4, "cpu")):
        layer = M.QuantizedLinear.from_linear(linear, bits, 128 if bits == 4 else 0)
        layer.kernel_option = kernel
        try:
            layer.select_kernel(torch.device("cpu"), torch.bfloat16)
        except (RuntimeError, ValueError) as error:
            print(f"skipped int{bits} {kernel}: {error}")
            continue
        name = {"cpu": "weight-only", "cpu_w8a8": "int8 x int8 (W8A8)"}[kernel]
        table[f"int{bits} {name}"] = (layer, torch.bfloat16, out_features * in_features * bits // 8)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "fbgemm"
        scale = (weight.abs().amax(1) / 127).double()
        qweight = torch.quantize_per_channel(
            weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
        )
        params = torch.ops.quantized.linear_prepack(qweight, None)
        table["int8 fbgemm linear_dynamic (per-tensor act.)"] = (
            lambda x, p=params: torch.ops.quantized.linear_dynamic(x, p, True),
            torch.float32,
            out_features * in_features,
        )
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", nargs=2, type=int, action="append", metavar=("OUT", "IN"))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--evict-mib", type=int, default=1024, help="buffer read before each call (0: none)")
    parser.add_argument(
        "--inductor", action="store_true", help="also inductor-compiled float linears (compile time printed)"
    )
    args = parser.parse_args(argv)
    from chatglm_bench.hardware import YARDSTICK_MIN_BYTES, cpu_model, measure_cpu_bandwidth

    evict = torch.ones(args.evict_mib * 2**18) if args.evict_mib else None
    # The yardstick is read again between the timed calls (the eviction read is a >= 1 GiB read on
    # all threads too) and its best is kept, so on a loaded machine it is measured at the same
    # moments as the kernels it is compared with.
    yardstick = measure_cpu_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}")
    rows_out = []
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in args.shape or SHAPES_6B:
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        for rows in args.rows:
            table = kernels(weight, rows, args.inductor)
            inputs = {
                d: torch.randn(rows, in_features, generator=generator).to(d)
                for d in (torch.float32, torch.bfloat16)
            }
            best = dict.fromkeys(table, float("inf"))
            with torch.no_grad():
                for call, dtype, _ in table.values():
                    call(inputs[dtype])  # warm-up (packing, first-call setup)
                for _ in range(args.rounds):
                    for name, (call, dtype, _) in table.items():
                        if evict is not None:
                            start = time.perf_counter()
                            evict.sum()
                            if evict.nbytes >= YARDSTICK_MIN_BYTES:  # a smaller one may sit in cache
                                yardstick = max(yardstick, evict.nbytes / (time.perf_counter() - start) / 1e9)
                        start = time.perf_counter()
                        call(inputs[dtype])
                        best[name] = min(best[name], time.perf_counter() - start)
            for name, (_, _, nbytes) in table.items():
                rows_out.append(
                    (f"{out_features}x{in_features}", rows, name, best[name], nbytes / best[name] / 1e9)
                )
            del table
    print(f"read-bandwidth yardstick (>= 1 GiB, all threads, best over the whole run): {yardstick:.1f} GB/s")
    print("| layer | rows | kernel | ms | GB/s of weight | % of yardstick |")
    print("|---|---|---|---|---|---|")
    for shape, rows, name, seconds, rate in rows_out:
        print(
            f"| {shape} | {rows} | {name} | {seconds * 1e3:.2f} | {rate:.1f} | {100 * rate / yardstick:.0f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
