"""Count what one warm decode step of ``generate()`` runs in ``modeling_chatglm.py``.

    python scripts/trace_decode_step.py            # both caches, the tiny random-weights preset
    python scripts/trace_decode_step.py --list     # and every function entered, with its calls

Between two top-level ``ChatGLMForConditionalGeneration.forward`` calls of an eager greedy
``generate()`` (a decode step, after two warm ones, plus the generation loop's own hooks), a
``sys.setprofile`` hook counts the functions of modeling_chatglm.py that are entered: how many
distinct ones, and how many calls happen outside the transformer layers (``GLMBlock.forward``
and everything below it). The model has random weights: the numbers describe the code path,
not the answers.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import modeling_chatglm as M  # noqa: E402
from chatglm_bench.presets import build_preset_model  # noqa: E402

MODEL_FILE = str(Path(M.__file__).resolve())
WARM_STEP = 3  # the window opens at this top-level forward (1 = prefill)


def trace_step(kv_cache: str, preset: str = "tiny"):
    """(calls per function, calls outside the layers) of one warm decode step with ``kv_cache``."""
    model = build_preset_model(preset, torch.float32, seed=0)
    model.transformer.set_runtime_options(kv_cache=kv_cache)
    top, layer = M.ChatGLMForConditionalGeneration.forward.__code__, M.GLMBlock.forward.__code__
    state = {"forwards": 0, "in_layer": 0}
    calls, outside = Counter(), []

    def hook(frame, event, arg):
        code = frame.f_code
        if code.co_filename != MODEL_FILE:
            return
        if event == "call" and code is top:
            state["forwards"] += 1
        recording = state["forwards"] == WARM_STEP
        if code is layer:
            state["in_layer"] += 1 if event == "call" else -1 if event == "return" else 0
            return
        if event == "call" and recording:
            calls[code.co_qualname if hasattr(code, "co_qualname") else code.co_name] += 1
            if not state["in_layer"]:
                outside.append(code.co_name)

    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    sys.setprofile(hook)
    try:
        model.generate(input_ids=ids, max_new_tokens=WARM_STEP + 2, do_sample=False, eos_token_id=-1)
    finally:
        sys.setprofile(None)
    if state["forwards"] <= WARM_STEP:
        raise SystemExit(f"generate() made {state['forwards']} forwards; the window needs {WARM_STEP + 1}")
    calls["GLMBlock.forward"] = 0  # the layers themselves are not counted as functions entered
    del calls["GLMBlock.forward"]
    return calls, outside


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="random-weights preset (default: tiny)")
    parser.add_argument("--list", action="store_true", help="print every function entered")
    args = parser.parse_args()
    print(f"one warm eager decode step of generate(), preset {args.preset} (random weights)")
    print(f"{'cache':<8}{'distinct functions':>20}{'calls outside layers':>22}")
    for kv_cache in ("tuple", "static"):
        calls, outside = trace_step(kv_cache, args.preset)
        print(f"{kv_cache:<8}{len(calls):>20}{len(outside):>22}")
        if args.list:
            for name, count in sorted(calls.items()):
                print(f"    {count:>4}  {name}")
            print("    outside the layers:", ", ".join(outside))


if __name__ == "__main__":
    main()
