"""What the hardware allows: nominal peaks of known accelerators, measured figures on a CPU."""

import time
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch

from .cli import dtype_name


@dataclass(frozen=True)
class Peak:
    """Vendor-nominal dense 16-bit throughput and memory bandwidth of one device."""

    name: str
    tflops_16bit: float
    bandwidth_gbs: float
    source: str


# Nominal datasheet figures (dense fp16/bf16, no sparsity), used only to express measurements as a
# share of what the card advertises. Matched against the device name, first hit wins.
KNOWN_PEAKS = (
    Peak("H200", 989.0, 4800.0, "NVIDIA H200 SXM datasheet"),
    Peak("H100", 989.0, 3350.0, "NVIDIA H100 SXM datasheet (PCIe: 756 TFLOPS, 2000 GB/s)"),
    Peak("A100", 312.0, 2039.0, "NVIDIA A100 80GB SXM datasheet"),
    Peak("910B", 313.0, 1600.0, "Ascend 910B (Atlas 800T/800I A2), vendor figures"),
    Peak("800I A2", 280.0, 1600.0, "Atlas 800I A2 inference server (910B4), vendor figures"),
)


# CPU flags (as /proc/cpuinfo spells them) of the units that run bfloat16 matmuls natively.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo_field(name: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    import platform

    return _cpuinfo_field("model name") or platform.processor() or "cpu"


def cpu_bf16_units() -> List[str]:
    """Which of :data:`BF16_FLAGS` this CPU reports (empty off Linux or on CPUs without them)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in BF16_FLAGS if flag in flags]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)
    return cpu_model()


def known_peak(name: str) -> Optional[Peak]:
    for peak in KNOWN_PEAKS:
        if peak.name.lower() in name.lower():
            return peak
    return None


# The smallest buffer the read-bandwidth yardstick streams: far beyond any CPU cache (this
# repository's CI VMs report a 480 MiB L3), so it reads memory as a large model's decode does.
YARDSTICK_MIN_BYTES = 2**30


def _native_reads(weight: torch.Tensor) -> list:
    """Reads of ``weight``'s bytes as our C decode kernels stream theirs (modeling_chatglm's
    ``native_stream_read``: four rows at a time, the next tile prefetched), from where it is and
    from a copy in transparent huge pages (where the model keeps its CPU weights when Linux
    offers them); none where that library is not built here."""
    try:
        import modeling_chatglm as modeling
    except ImportError:
        return []
    if modeling._NativeDot.load() is None:
        return []
    reads = [lambda: modeling.native_stream_read(weight)]
    huge = modeling._huge_page_empty_like(weight)
    if huge is not None:
        huge.copy_(weight)
        reads += [lambda: modeling.native_stream_read(huge), huge.sum]
    return reads


def _best_read_rate(nbytes: int, passes: int) -> float:
    """GB/s of the fastest of ``passes`` passes over an ``nbytes`` buffer, each pass read by every
    reader: a reduction, a one-row float32 GEMV over it as a [rows, 1024] weight, and our C
    kernels' tiled read in small and in huge pages (``_native_reads``), as the decode kernels
    stream their weights (all on every thread torch uses)."""
    weight = torch.ones(max(4, nbytes // 4096 // 4 * 4), 1024, dtype=torch.float32)
    x = torch.ones(1, 1024, dtype=torch.float32)
    reads = (weight.sum, lambda: torch.nn.functional.linear(x, weight), *_native_reads(weight))
    for read in reads:
        read()  # first touch and any one-time setup
    best = float("inf")
    for _ in range(passes):
        for read in reads:
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return weight.numel() * 4 / best / 1e9


def measure_cpu_bandwidth(working_set_bytes: int = 0, passes: int = 5) -> float:
    """Read bandwidth in GB/s, the yardstick of decode's "% BW": the best rate over a buffer of
    at least :data:`YARDSTICK_MIN_BYTES` and, when a decode step reads less
    (``working_set_bytes``), over a buffer of that size too, since a model that fits a cache is
    read from it. Taking the best of both (and of every pass) keeps a step's rate from passing
    100 % by construction, up to measurement noise."""
    sizes = {YARDSTICK_MIN_BYTES}
    if 0 < working_set_bytes < YARDSTICK_MIN_BYTES:
        sizes.add(int(working_set_bytes))
    return max(_best_read_rate(size, passes) for size in sorted(sizes))


def measure_cpu_matmul_tflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """Achieved TFLOP/s of an n x n matmul in ``dtype`` on this CPU, best of ``repeats``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


@dataclass
class HardwareRef:
    """The references a run's bandwidth and FLOP/s are compared with."""

    device_name: str
    bandwidth_gbs: Optional[float]
    tflops: Optional[float]
    source: str


def best_over_run(ref: HardwareRef, rates: Sequence[float]) -> HardwareRef:
    """``ref`` with the best of its bandwidth and ``rates`` (the same read taken again after each
    row of the run) as its bandwidth, and its source saying so. The memory of a shared VM can
    change its rate 1.6x within minutes (a 2-core EPYC VM: 48 and 81 GB/s in one sitting), so a
    single read at the start may be a slow minute's while a row is timed in a fast one: its
    "% BW" passed 100 % (137 % measured). Against the best read of the run it does not, up to the
    noise of a read within a row."""
    if not rates or ref.bandwidth_gbs is None:
        return ref
    every = [ref.bandwidth_gbs, *rates]
    return replace(
        ref,
        bandwidth_gbs=max(every),
        source=f"{ref.source}; bandwidth the best of {len(every)} reads, at the start and after each row: "
        f"{min(every):.1f}-{max(every):.1f} GB/s",
    )


def hardware_reference(device: torch.device, dtype: torch.dtype, working_set_bytes: int = 0) -> HardwareRef:
    """What this run is compared with; on a CPU measured here (``working_set_bytes``: what one
    decode step reads, see :func:`measure_cpu_bandwidth`)."""
    name = device_name(device)
    if device.type == "cpu":
        sizes = "1 GiB and the weights' size" if 0 < working_set_bytes < YARDSTICK_MIN_BYTES else "1 GiB"
        # The best matmul path of this CPU is the yardstick: on CPUs without AVX512-BF16/AMX the
        # 16-bit GEMMs are much slower than float32, and a share of a slow path would flatter.
        rates = {d: measure_cpu_matmul_tflops(d) for d in dict.fromkeys((torch.float32, dtype))}
        best = max(rates, key=rates.get)
        return HardwareRef(
            name,
            measure_cpu_bandwidth(working_set_bytes),
            rates[best],
            f"measured here: best read bandwidth (all threads, best of 5 passes of a sum, a GEMV and our "
            f"kernels' tiled read, small and huge pages) over "
            f"{sizes}, best 1024^3 matmul ({dtype_name(best)})",
        )
    peak = known_peak(name)
    if peak is None:
        return HardwareRef(name, None, None, "unknown device: no nominal peak on file")
    return HardwareRef(name, peak.bandwidth_gbs, peak.tflops_16bit, f"nominal: {peak.source}")
