"""Report: tables, JSON and a plot built from measurement records (no timing here)."""

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import UsageError, replacing_file
from .hardware import HardwareRef
from .measure import Measurement


def _fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


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


def latency_table(records: List[Measurement], hardware: HardwareRef) -> str:
    """The reference's table (batch x mode: prefill ms, decode ms/token) with the figures around it."""
    header = [
        "batch",
        "mode",
        "attention",
        "rmsnorm",
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
        "peak MiB",
        "prefill TFLOP/s",
        "% FLOP/s",
        "compile s",
    ]
    rows = []
    for r in records:
        rows.append(
            [
                r.batch_size,
                f"{r.exe_mode} ({r.label})" if r.label != "run" else r.exe_mode,
                r.attention,
                r.rmsnorm,
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
                _fmt(r.peak_memory_bytes / 2**20, 0) if r.peak_memory_bytes else "-",
                _fmt(r.prefill_tflops, 3),
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
    """Prefill ms and decode ms/token against batch size, one line per (mode, configuration)."""
    plt = _pyplot()
    series: Dict[str, List[Measurement]] = {}
    for r in records:
        series.setdefault(f"{r.label} / {r.exe_mode}", []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in series.items():
        points = sorted(points, key=lambda r: r.batch_size)
        batches = [p.batch_size for p in points]
        left.plot(batches, [p.prefill_ms for p in points], marker="o", label=name)
        right.plot(batches, [p.decode_ms_mean for p in points], marker="o", label=name)
    left.set(title="prefill", xlabel="batch size", ylabel="ms")
    right.set(title="decode (per token)", xlabel="batch size", ylabel="ms / token")
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
