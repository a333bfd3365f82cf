#!/usr/bin/env python
"""Benchmark ChatGLM3-6B prefill (全量) and decode (增量) latency, eager or graph mode.

    python benchmark_chatglm.py                          # built-in random-weights preset, CPU OK
    python benchmark_chatglm.py --model_path DIR --batch_size 1 4 8 --execute_mode eager dynamo
    deepspeed --num_gpus=8 benchmark_chatglm.py --model_path DIR --execute_mode dynamo
    python benchmark_chatglm.py --preset chatglm3-6b --ablation --input_max_len 64 --max_new_tokens 8

Prefill is the first forward over the padded prompts; decode is each following one-token forward
on the KV cache, timed one by one with device synchronisation after warm-up. Compile time (graph
mode) is reported apart. Bad input ends with one line on stderr and exit code 2.

This file is the command line and its wiring; the work is done in ``chatglm_bench``: ``plan``
(what to time), ``presets``/``models``/``inputs`` (what runs), ``measure`` (timings),
``report`` (tables, JSON, plot) and ``distributed`` (ranks, sharding).
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent
# The files a run loads from this repository (inputs no output may overwrite).
CODE_FILES = (
    "benchmark_chatglm.py",
    "modeling_chatglm.py",
    "configuration_chatglm.py",
    "tokenization_chatglm.py",
)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from chatglm_bench.cli import OneLineArgumentParser, UsageError, dtype_name, launch_rank, say, stdout_gone  # noqa: E402
from chatglm_bench.plan import ATTENTION, DEVICES, DTYPES, KV_CACHES, LINEAR, MODES, QUANTIZE, RMSNORM  # noqa: E402
from chatglm_bench.presets import PRESETS  # noqa: E402

INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="benchmark_chatglm.py",
        description="Prefill and per-token decode latency of ChatGLM3-6B (ours, optionally the original).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model")
    src.add_argument(
        "--model_path",
        help="checkpoint directory (config.json, weights, tokenizer.model); "
        "without it a random-weights --preset is timed",
    )
    src.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="small-32k-vocab",
        help="random-weights architecture used when no --model_path is given",
    )
    src.add_argument(
        "--baseline",
        action="store_true",
        help="also time the original implementation kept as modeling_chatglm_orig.py in --model_path",
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--execute_mode",
        "--exe_mode",
        nargs="+",
        choices=MODES,
        default=None,
        help="eager and/or dynamo (graph mode); default: $EXE_MODE, else eager",
    )
    run.add_argument(
        "--batch_size", nargs="+", type=int, default=[1], help="one or more batch sizes (a sweep)"
    )
    run.add_argument(
        "--input_max_len",
        nargs="+",
        type=int,
        default=[1024],
        help="prompts are left-padded to this length; several values: a prompt-length sweep (with "
        "--plot: prefill time and peak memory against prompt length)",
    )
    run.add_argument(
        "--max_new_tokens", type=int, default=1024, help="tokens generated per run (no early stop)"
    )
    run.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: float16 on npu, bfloat16 on cuda; on cpu bfloat16 when float32 weights would not fit "
        "in half the RAM or the CPU has AVX512-BF16/AMX, float32 on the others (from the CPU's flags, "
        "not timed)",
    )
    run.add_argument("--device", choices=DEVICES, default="auto", help="auto: npu, else cuda, else cpu")
    run.add_argument(
        "--kv_cache",
        choices=KV_CACHES,
        default=None,
        help="tuple: the original's growing cache; static: preallocated, updated in place; auto: "
        "static in graph mode, tuple in eager; default: $CHATGLM_KV_CACHE, else auto",
    )
    run.add_argument(
        "--attention",
        choices=ATTENTION,
        default=None,
        help="attention kernel; default: $CHATGLM_ATTENTION, else auto",
    )
    run.add_argument(
        "--rmsnorm",
        choices=RMSNORM,
        default=None,
        help="RMSNorm kernel; default: $CHATGLM_RMSNORM, else auto",
    )
    run.add_argument(
        "--linear",
        choices=LINEAR,
        default=None,
        help="dense projections: gemv (one-row decode steps on a CPU through ATen's matrix-vector "
        "kernel), aten (the layers' own F.linear); default: $CHATGLM_LINEAR, else auto",
    )
    run.add_argument(
        "--quantize",
        nargs="+",
        choices=QUANTIZE,
        default=["none"],
        help="weight-only quantization of the timed model (model.quantize(bits)); a list sweeps "
        "(with --ablation: the full ablation unquantized, then 'all' per bit width)",
    )
    run.add_argument(
        "--graph_backend",
        default=None,
        help="torch.compile backend in dynamo mode (auto: torchair on npu, inductor elsewhere); "
        "default: $CHATGLM_GRAPH_BACKEND, else auto",
    )
    run.add_argument(
        "--ablation",
        action="store_true",
        help="baseline (math/math/tuple/eager), each optimization alone, then all together",
    )
    run.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed warm-up runs (the first one compiles; "
        "0: none, compile time then lands in the first timed run)",
    )
    run.add_argument(
        "--iters",
        type=int,
        default=2,
        help="timed runs per configuration (each: one prefill + max_new_tokens-1 timed decode steps)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")
    inp = p.add_argument_group("prompts (with --model_path)")
    inp.add_argument("--prompt", action="append", default=None, help="a prompt (repeat the flag for several)")
    inp.add_argument(
        "--prompts-file",
        "--prompts_file",
        dest="prompts_file",
        default=None,
        help="a file with one prompt per line",
    )
    inp.add_argument(
        "--repeat-prompts",
        "--repeat_prompts",
        dest="repeat_prompts",
        action="store_true",
        help="cycle the prompts when a batch has more rows than prompts",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--output", default=None, help="write every figure and the environment to this JSON file"
    )
    out.add_argument("--plot", default=None, help="write a PNG of latency against batch size")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point: returns the process exit code (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    # Libraries log to stdout too (DeepSpeed); once a reader has closed it, logging must not
    # print its own tracebacks about that.
    logging.raiseExceptions = False
    try:
        return run(args)
    except KeyboardInterrupt:  # before any row was measured (loading, compiling, the first row)
        print(
            "benchmark_chatglm.py: interrupted (Ctrl-C) before any configuration finished; nothing "
            "was written (a previous --output/--plot is unchanged)",
            file=sys.stderr,
        )
        return INTERRUPTED
    except UsageError as error:
        # Every rank meets the same bad input: rank 0 reports it (a failed rendezvous is each
        # rank's own, so each reports that).
        if launch_rank() == 0 or getattr(error, "every_rank", False):
            print(f"benchmark_chatglm.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            stdout_gone()


def run(args) -> int:
    from chatglm_bench import checkpoint, inputs, plan, report

    plan.check_numbers(args)
    choices = plan.resolve_choices(args)
    read_files = [("--prompts-file", args.prompts_file)] + [
        ("code file", str(REPO / name)) for name in CODE_FILES
    ]
    output, plot = report.check_outputs(args.output, args.plot, read_files, args.model_path)
    directory = checkpoint.check_checkpoint(args.model_path) if args.model_path else None
    if directory is not None and args.baseline:
        checkpoint.check_baseline_source(directory)
    prompts = inputs.read_prompts(args.prompt, args.prompts_file, args.repeat_prompts) if directory else None

    import torch

    from chatglm_bench import distributed, measure, models
    from chatglm_bench.hardware import best_over_run, hardware_reference, measure_cpu_bandwidth
    from chatglm_bench.presets import preset_params

    env = distributed.detect_env()
    shape = checkpoint.model_shape(directory) if directory else PRESETS[args.preset]
    if env.world_size > 1 and shape.get("multi_query_attention"):
        distributed.kv_groups_for(
            shape["num_attention_heads"], shape["multi_query_group_num"], env.world_size
        )
    device = plan.resolve_device(args.device)
    n_params = checkpoint.checkpoint_params(directory) if directory else preset_params(args.preset)
    dtype, dtype_reason = plan.resolve_dtype(args.dtype, device, n_params)
    longest = max(args.input_max_len)
    tokens = longest + args.max_new_tokens
    models.check_memory(args.batch_size, tokens, shape, n_params, dtype, device, env)
    # The ranks meet before anything loads the model file, so a failed rendezvous is reported
    # at once; every later error is the same on every rank.
    env = distributed.init_distributed(env, device.type)
    device = torch.device(env.device)
    entries = plan.build_plan(choices, device, dtype, env.world_size, args.ablation, args.baseline)
    if directory:  # a random-weights preset is built with the context the run needs
        plan.context_check(longest, args.max_new_tokens, shape["seq_length"])

    def say0(*parts):
        if env.is_rank0:
            say(*parts)

    def build():
        return models.build_model(directory, args.preset, args.seed, dtype, device, tokens)

    model = build()
    if directory is not None:
        from tokenization_chatglm import ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer(str(directory / "tokenizer.model"))
        source = str(directory)
        say0(f"model: {directory} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")
    else:
        tokenizer = None
        source = f"preset {args.preset} (RANDOM WEIGHTS, timing only)"
        say0(
            f"model: preset '{args.preset}' with RANDOM weights and random token ids (timing only; "
            "pass --model_path for a real checkpoint)"
        )
    distributed.patch_torchair_for_hcom(env, device.type, plan.graph_options(entries))
    model = distributed.shard_model(model, env, dtype)
    per_rank = distributed.gather_per_rank(distributed.rank_param_bytes(model), env)
    if env.world_size > 1:
        say0(
            "parameter bytes per rank: "
            + ", ".join(f"rank {i}: {b / 2**20:.1f} MiB" for i, b in enumerate(per_rank))
        )

    working_set = per_rank[env.rank] if env.rank < len(per_rank) else 0
    hardware = hardware_reference(device, dtype, working_set)
    # On a CPU the yardstick is read again after each row and the best read is the one the rows
    # are set against (hardware.best_over_run): a shared VM's memory rate drifts within minutes.
    rereads: List[float] = []
    after_row = (lambda: rereads.append(measure_cpu_bandwidth(working_set))) if device.type == "cpu" else None
    made = {
        (length, size): (
            inputs.tokenize_batch(tokenizer, prompts, size, length)
            if tokenizer is not None
            else inputs.random_batch(size, length, model.config.padded_vocab_size, args.seed)
        ).to(device)
        for length in args.input_max_len
        for size in args.batch_size
    }
    batches = [made[(length, size)] for length in args.input_max_len for size in args.batch_size]
    source_of = models.ModelSource(
        model,
        rebuild=build,
        load_original=lambda: models.load_original_model(directory, dtype).to(device),
    )
    del model  # the source owns it now (and releases it before building the next one)
    progress = report.make_progress(
        env.is_rank0, len(batches) * len(entries) * args.iters * (args.max_new_tokens - 1)
    )
    stopped = None
    try:
        records, answers = measure.run_plan(
            entries,
            source_of,
            batches,
            args.max_new_tokens,
            warmup=args.warmup,
            iters=args.iters,
            device=device,
            progress=progress.update if progress else None,
            after_row=after_row,
        )
    except measure.Interrupted as interrupted:
        if not interrupted.records:
            raise KeyboardInterrupt from None
        stopped, records, answers = interrupted, interrupted.records, interrupted.answers
    finally:
        if progress:
            progress.close()
    hardware = best_over_run(hardware, rereads)
    if not env.is_rank0:
        if stopped:  # the ranks may not all have stopped at the same row: no barrier
            return INTERRUPTED
        distributed.close_distributed()
        return 0
    partial = (
        f"PARTIAL: interrupted (Ctrl-C) after {len(records)} of {stopped.total} runs" if stopped else None
    )

    # Files first: a closed stdout (``| head``) must not cost the results.
    if output:
        environment = report.environment(args, device, dtype, dtype_reason, env.world_size, source, hardware)
        payload = {"environment": environment, "parameter_bytes_per_rank": per_rank}
        if stopped:
            payload.update(partial=True, interrupted=partial)
        report.write_json(output, {**payload, "results": [r.as_dict() for r in records]})
    if plot:
        title = f"{source} · {hardware.device_name} · {dtype_name(dtype)}" + (" · PARTIAL" if stopped else "")
        report.write_plot(plot, records, title)
    if partial:
        say(f"\n{partial}: the rows below are the ones that finished")
    say("\n" + report.header(records, device, dtype, dtype_reason, env.world_size, hardware))
    say(report.latency_table(records, hardware))
    if args.ablation:
        say("\nablation (speed-up vs baseline):")
        say(report.ablation_table(records))
    if tokenizer is not None and answers is not None:
        say(f"\nanswers (greedy, batch {answers.shape[0]}, first {answers.shape[1]} tokens):")
        for row in answers.tolist():
            say("  " + json.dumps(tokenizer.decode(row), ensure_ascii=False))
    if output:
        say(f"\nwrote {output}")
    if plot:
        say(f"wrote {plot}")
    if stopped:
        written = f"; wrote them to {output} marked partial" if output else ""
        print(
            f"benchmark_chatglm.py: interrupted (Ctrl-C) after {len(records)} of {stopped.total} runs{written}",
            file=sys.stderr,
        )
        return INTERRUPTED
    distributed.close_distributed()
    return 0


def exit_process(code: int) -> None:
    """End with ``code``: through :func:`chatglm_bench.distributed.end_process` when this run
    got as far as importing it (a tensor-parallel run skips the interpreter's teardown there)."""
    distributed = sys.modules.get("chatglm_bench.distributed")  # not imported for a usage error
    if distributed is not None:
        distributed.end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
