"""Report: tables, JSON and a plot built from measurement records (no timing here)."""

import contextlib
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .cli import UsageError, dtype_name, remove_stale_temporaries, replacing_file
from .hardware import HardwareRef, cpu_bf16_units, cpu_model
from .measure import Measurement


def _fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _fmt_significant(value: Optional[float], digits: int = 3) -> str:
    """Three significant digits: a small model's 0.0012 TFLOP/s must not print as 0.000."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _pct(value: Optional[float], reference: Optional[float]) -> str:
    if not value or not reference or math.isnan(value):
        return "-"
    return f"{100.0 * value / reference:.0f}%"


def markdown_table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [
        max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _mib(value: Optional[int]) -> str:
    return _fmt(value / 2**20, 0) if value else "-"


def latency_table(records: List[Measurement], hardware: HardwareRef) -> str:
    """The reference's table (batch x mode: prefill ms, decode ms/token) with the figures around it."""
    header = [
        "batch",
        "prompt",
        "mode",
        "attention",
        "rmsnorm",
        "linear",
        "cache",
        "compiler",
        "prefill ms",
        "decode ms/token",
        "p50",
        "p90",
        "p99",
        "tokens/s",
        "e2e s",
        "decode GB/s",
        "% BW",
        "floor ms",
        "prefill peak MiB",
        "decode peak MiB",
        "prefill TFLOP/s",
        "% FLOP/s",
        "compile s",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r.batch_size,
                r.input_len,
                f"{r.exe_mode} ({r.label})" if r.label != "run" else r.exe_mode,
                r.attention,
                r.rmsnorm,
                r.linear,
                r.kv_cache,
                r.graph_backend,
                _fmt(r.prefill_ms),
                _fmt(r.decode_ms_mean, 2),
                _fmt(r.decode_ms_p50, 2),
                _fmt(r.decode_ms_p90, 2),
                _fmt(r.decode_ms_p99, 2),
                _fmt(r.decode_tokens_per_s),
                _fmt(r.e2e_ms / 1e3, 2),
                _fmt(r.decode_bandwidth_gbs),
                _pct(r.decode_bandwidth_gbs, hardware.bandwidth_gbs),
                # Decode floor: the bytes a step reads (weights as held, plus KV) / bandwidth.
                _fmt(r.decode_bytes_per_step / (hardware.bandwidth_gbs * 1e6), 2)
                if hardware.bandwidth_gbs
                else "-",
                _mib(r.prefill_peak_memory_bytes),
                _mib(r.decode_peak_memory_bytes),
                _fmt_significant(r.prefill_tflops),
                _pct(r.prefill_tflops, hardware.tflops),
                _fmt(r.first_run_overhead_s, 2),
            ]
        )
    return markdown_table(header, rows)


def ablation_table(records: List[Measurement]) -> str:
    """Baseline, each optimization alone, all together: per batch size, speed-ups vs the baseline."""
    header = [
        "batch",
        "configuration",
        "weights",
        "attention",
        "rmsnorm",
        "linear",
        "cache",
        "mode",
        "prefill ms",
        "decode ms/token",
        "prefill x",
        "decode x",
    ]
    rows = []
    baselines: Dict[int, Measurement] = {}
    for r in records:
        base = baselines.setdefault(r.batch_size, r)
        rows.append(
            [
                r.batch_size,
                r.label,
                r.quantization,
                r.attention,
                r.rmsnorm,
                r.linear,
                r.kv_cache,
                r.exe_mode,
                _fmt(r.prefill_ms),
                _fmt(r.decode_ms_mean, 2),
                _fmt(base.prefill_ms / r.prefill_ms, 2),
                _fmt(base.decode_ms_mean / r.decode_ms_mean, 2),
            ]
        )
    return markdown_table(header, rows)


def _finite(value):
    """NaN/inf (e.g. decode figures of a run without decode steps) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@contextlib.contextmanager
def replacing(path: Path, option: str):
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    A full disk or a crash leaves the previous file intact and no partial file behind, and a
    symlink at ``path`` is replaced, never written through."""
    try:
        with replacing_file(path) as tmp:
            yield tmp
    except OSError as error:
        raise UsageError(
            f"cannot write {option} {path}: {error.strerror or error}; the previous file is unchanged, "
            "free some space or pick another path"
        ) from None


def write_json(path: Path, payload: Dict) -> None:
    text = json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n"
    with replacing(path, "--output") as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or drop --plot)") from None
    return plt


def check_plot(path: Optional[Path]) -> None:
    """Before the run: matplotlib is importable and can write the file's format."""
    if path is None:
        return
    plt = _pyplot()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    kind = path.suffix.lower().lstrip(".")
    if kind not in formats:
        raise UsageError(
            f"--plot {path}: unknown image type {path.suffix or '(no extension)'!r}; "
            f"end the name with one of: {', '.join('.' + k for k in sorted(formats))}"
        )


def write_plot(path: Path, records: List[Measurement], title: str) -> None:
    """Prefill ms and decode ms/token against batch size, one line per (mode, configuration);
    for a prompt-length sweep (several --input_max_len), prefill ms and prefill peak memory
    against prompt length, one line per (mode, configuration, batch size)."""
    plt = _pyplot()
    by_length = len({r.input_len for r in records}) > 1
    series: Dict[str, List[Measurement]] = {}
    for r in records:
        name = f"{r.label} / {r.exe_mode}" + (f" / batch {r.batch_size}" if by_length else "")
        series.setdefault(name, []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in series.items():
        points = sorted(points, key=lambda r: r.input_len if by_length else r.batch_size)
        xs = [p.input_len if by_length else p.batch_size for p in points]
        left.plot(xs, [p.prefill_ms for p in points], marker="o", label=name)
        if by_length:
            peaks = [(p.prefill_peak_memory_bytes or 0) / 2**20 for p in points]
            right.plot(xs, peaks, marker="o", label=name)
        else:
            right.plot(xs, [p.decode_ms_mean for p in points], marker="o", label=name)
    x_label = "prompt tokens" if by_length else "batch size"
    left.set(title="prefill", xlabel=x_label, ylabel="ms")
    if by_length:
        kind = records[0].peak_memory_kind if records else ""
        right.set(title=f"prefill peak memory ({kind})", xlabel=x_label, ylabel="MiB")
    else:
        right.set(title="decode (per token)", xlabel=x_label, ylabel="ms / token")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with replacing(path, "--plot") as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lower().lstrip("."))
    finally:
        plt.close(fig)


def environment(args, device, dtype, dtype_reason: str, world_size: int, source: str, hardware) -> Dict:
    """What a result file says about the run: versions, device, CPU, dtype and the arguments."""
    import torch
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    # From the installed metadata: importing deepspeed on a plain one-rank run would print its
    # "Setting accelerator to CPU" warning into the benchmark's output.
    for name in ("deepspeed", "torch_npu"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "versions": versions,
        "device": str(device),
        "device_name": hardware.device_name,
        "cpu": {"model": cpu_model(), "bf16_units": cpu_bf16_units()},
        "hardware_reference": vars(hardware),
        "dtype": dtype_name(dtype),
        "dtype_choice": dtype_reason,
        "world_size": world_size,
        "threads_per_rank": torch.get_num_threads(),
        "model": source,
        "args": {k: v for k, v in vars(args).items() if k != "local_rank"},
    }


def header(records: List[Measurement], device, dtype, dtype_reason: str, world_size: int, hardware) -> str:
    """The lines above the tables: what ran where, and the hardware yardstick."""
    import torch

    units = " ".join(cpu_bf16_units()) or "none"
    first = records[0]
    lengths = sorted({r.input_len for r in records})
    shown = f"{lengths[0]}" if len(lengths) == 1 else " / ".join(map(str, lengths))
    return (
        f"device: {hardware.device_name} ({device}), dtype {dtype_name(dtype)} ({dtype_reason}), world size "
        f"{world_size}, input {shown} tokens, {first.new_tokens} new tokens, "
        f"{first.iters} timed runs\n"
        f"cpu: {cpu_model()}; bf16 units (AVX512-BF16/AMX): {units}; torch threads per rank: "
        f"{torch.get_num_threads()}\n"
        f"hardware reference ({hardware.source}): "
        f"{_fmt(hardware.bandwidth_gbs)} GB/s, {_fmt(hardware.tflops, 2)} TFLOP/s\n"
    )


def check_writable(path: Optional[str], option: str) -> Optional[Path]:
    """Fail before a long benchmark, not after, if an output file cannot be written: open it for
    appending (never truncating what is there) and remove it again if we created it."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(
            f"{option} {path}: directory {parent} does not exist; create it or pick another path"
        )
    existed = target.exists()
    try:
        with open(target, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise UsageError(
            f"{option} {path} is not writable ({error.strerror}); pick a writable path"
        ) from None
    if not existed:
        target.unlink()
    return target


def _same_file(a: Path, b: Path) -> bool:
    """The same file on disk, through symlinks and hard links (False when either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_an_input(
    path: Optional[str], option: str, inputs: Sequence[tuple], checkpoint_dir: Optional[str]
) -> None:
    """An output must not be one of the run's inputs (a prompts file, our own code) or anything in
    the checkpoint directory: ``--output CKPT/config.json`` would replace the checkpoint's config.
    Compared after following symlinks, and by inode, so a hard link is caught too."""
    if path is None:
        return
    target = Path(path)
    resolved = target.resolve()
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir).expanduser().resolve()
        if resolved == directory or directory in resolved.parents:
            raise UsageError(
                f"{option} {path} is inside the checkpoint directory {checkpoint_dir}; write the "
                "results somewhere else (the checkpoint's files are the run's input)"
            )
        if target.exists() and directory.is_dir():
            for entry in sorted(directory.iterdir()):
                if _same_file(entry, target):
                    raise UsageError(
                        f"{option} {path} is the checkpoint's {entry.name} (a link to it); write "
                        "the results somewhere else"
                    )
    for label, source in inputs:
        if source is not None and (resolved == Path(source).resolve() or _same_file(target, Path(source))):
            raise UsageError(f"{option} {path} is the run's {label} {source}; give {option} another file")


def check_outputs(
    output: Optional[str],
    plot: Optional[str],
    inputs: Sequence[tuple] = (),
    checkpoint_dir: Optional[str] = None,
):
    """--output and --plot: not an input of the run, writable, distinct, and a plot matplotlib
    can make, before any work. ``inputs``: (label, path or None) of each file the run reads."""
    for path, option in ((output, "--output"), (plot, "--plot")):
        check_not_an_input(path, option, inputs, checkpoint_dir)
        if path is not None:  # a killed run's hidden temporary of this file
            remove_stale_temporaries(Path(path).parent, (Path(path).name,))
    output_path = check_writable(output, "--output")
    plot_path = check_writable(plot, "--plot")
    if (
        output_path
        and plot_path
        and (output_path.resolve() == plot_path.resolve() or _same_file(output_path, plot_path))
    ):
        raise UsageError(f"--output and --plot both name {output}; give them different files")
    check_plot(plot_path)
    return output_path, plot_path


def make_progress(is_rank0: bool, total_steps: int):
    """A progress bar over decode steps, on rank 0, for runs long enough to need one."""
    if not is_rank0 or total_steps < 256:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total_steps, desc="decode steps", unit="step", mininterval=1.0, leave=False)
