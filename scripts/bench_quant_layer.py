"""Time one 6B-shaped linear layer: dense vs our weight-only int8/int4 kernels, decode and prefill.

    python scripts/bench_quant_layer.py                      # 27392x4096 (dense_h_to_4h), 1 and 128 rows
    python scripts/bench_quant_layer.py --shape 4096 13696 --rows 1 16 128 --dtype bfloat16

Random weights (timing only). Each figure is the median of --iters calls after one warm-up call,
in milliseconds, with the kernel QuantizedLinear picked (``CHATGLM_QUANT_KERNEL`` applies).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modeling_chatglm import QuantizedLinear  # noqa: E402


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", nargs=2, type=int, default=[27392, 4096], metavar=("OUT", "IN"))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 128])
    parser.add_argument(
        "--dtype", nargs="+", choices=("bfloat16", "float32", "float16"), default=["bfloat16"]
    )
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    out_features, in_features = args.shape
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    print(f"layer {out_features}x{in_features}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| activations | rows | dense ms | int8 ms | int4 ms | int8 x | int4 x | kernels |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtype:
        dtype = getattr(torch, name)
        dense = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
        layers = {bits: QuantizedLinear.from_linear(dense, bits, 128 if bits == 4 else 0) for bits in (8, 4)}
        for rows in args.rows:
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            with torch.no_grad():
                times = {"dense": median_ms(lambda dense=dense, x=x: dense(x), args.iters)}
                for bits, layer in layers.items():
                    times[bits] = median_ms(lambda layer=layer, x=x: layer(x), args.iters)
            kernels = ", ".join(f"int{b}: {layer.kernel_name}" for b, layer in layers.items())
            print(
                f"| {name} | {rows} | {times['dense']:.2f} | {times[8]:.2f} | {times[4]:.2f} | "
                f"{times['dense'] / times[8]:.2f} | {times['dense'] / times[4]:.2f} | {kernels} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
