#!/usr/bin/env python3
"""Extra peak memory and time of one prefill forward on random weights (CPU).

    python scripts/prefill_memory.py --length 16384 --batch 2 --pad 1000 --chunk 2048

Builds a model of the issue's "small" shape (4 layers, hidden 1024, ffn 2736, 16 heads, 2 KV
groups; ``--set key=value`` changes it) in ``--dtype``, then runs one forward over a prompt as
``generate()`` does (``return_last_logit=True``, a KV cache kept). Prints one JSON line: the
peak resident memory of that forward beyond what was resident before it (weights, inputs) and
beyond the KV cache it keeps, and its time. The peak is the kernel's VmHWM, reset just before
the forward (``/proc/self/clear_refs``): Linux only. Run one configuration per process.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from make_tiny_checkpoint import _parse_assignment  # noqa: E402  (this script's own folder)

import modeling_chatglm as M  # noqa: E402
from chatglm_bench.measure import cpu_status_bytes, reset_peak_memory  # noqa: E402
from chatglm_bench.presets import PRESETS  # noqa: E402
from chatglm_protocol import randomize_  # noqa: E402

# The "small" shape with the 32k variant's context: the benchmark's small-32k-context preset.
SMALL = PRESETS["small-32k-context"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens per row")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pad", type=int, default=0, help="left padding of the last row")
    parser.add_argument("--chunk", default="auto", help="prefill_chunk: auto, 0 (off) or tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()

    config = dict(SMALL)
    config.update(_parse_assignment(item) for item in args.set)
    dtype = getattr(torch, args.dtype)
    cfg = M.ChatGLMConfig(**config, torch_dtype=args.dtype, prefill_chunk=args.chunk)
    model = randomize_(M.ChatGLMForConditionalGeneration(cfg, empty_init=False), 0).to(dtype).eval()
    ids = torch.randint(3, 60000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[-1, : args.pad], mask[-1, : args.pad] = 0, 0
    kv_bytes = 2 * config["num_layers"] * args.batch * config["multi_query_group_num"]
    kv_bytes *= config["kv_channels"] * args.length * dtype.itemsize
    with torch.no_grad():
        reset_peak_memory(torch.device("cpu"))  # VmHWM := current RSS
        before = cpu_status_bytes("VmRSS")
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, return_last_logit=True)
        seconds = time.perf_counter() - start
        peak = cpu_status_bytes("VmHWM")
    del out
    extra = peak - before - kv_bytes
    result = {
        "length": args.length,
        "batch": args.batch,
        "pad": args.pad,
        "prefill_chunk": model.transformer.options.prefill_chunk,
        "dtype": args.dtype,
        "extra_peak_mib": round(extra / 2**20, 1),
        "kv_cache_mib": round(kv_bytes / 2**20, 1),
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
