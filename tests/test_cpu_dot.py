"""The cpu_dot kernel: int8 activations x int8/int4 weights in integer dot products (C, built at
first use). Each instruction-set path the CPU can run is checked against the product it defines:
activations rounded to int8 per block (absmax / 127, ties to even), times the dequantized weight."""

import pytest
import torch
from golden_protocol import golden_config
from helpers import CountingBackend, quantized_layer

import modeling_chatglm as M


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The kernel's paths (CG_PATH) and the CPU flags each needs; 0 is plain C and runs anywhere.
_PATH_FLAGS = {2: {"avx512f", "avx512bw", "avx512_vnni"}, 1: {"avx2", "fma"}, 0: set()}

needs_kernel = pytest.mark.skipif(
    M._NativeDot.load() is None, reason=f"the cpu_dot kernel does not build here: {M._NativeDot.failure}"
)


@pytest.fixture(scope="module")
def path_libraries():
    return {}


def _library(path_libraries, path):
    missing = _PATH_FLAGS[path] - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))} (path {path})")
    if path not in path_libraries:
        path_libraries[path] = M._NativeDot.build((f"CG_PATH={path}",))
    lib = path_libraries[path]
    assert lib.cg_path() == path
    return lib


def rel_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def block_quantized(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded to int8 per block of columns as the kernel defines it, in float64."""
    rows, cols = x.shape
    blocks = x.float().view(rows, cols // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # fp32, as in C
    q = torch.round(blocks * inverse).clamp(-127, 127)
    return (q.double() * (amax.double() / 127)).view(rows, cols)


def _stored(bits, out_features, in_features, group, scale_dtype, offset=0, seed=0):
    """A stored layer (random bytes, every nibble) and its scales; ``offset``: the weight is a view
    that many bytes into a buffer (unaligned, as in a mapped checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    shape = (out_features, in_features * bits // 8)
    raw = torch.randint(-128, 128, (shape[0] * shape[1] + offset,), dtype=torch.int8, generator=g)
    weight = raw[offset:].view(shape)
    scale_shape = (out_features, in_features // group) if group else (out_features,)
    scale = (torch.rand(scale_shape, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    return weight, scale


@needs_kernel
@pytest.mark.parametrize("path", [2, 1, 0])
@pytest.mark.parametrize(
    "bits, out_features, in_features, group, scale_dtype, offset",
    [
        (8, 67, 192, 0, torch.bfloat16, 0),  # 67 rows: four at a time and three single ones
        (8, 96, 4096, 0, torch.float32, 1),
        (8, 67, 192, 32, torch.bfloat16, 0),  # int8 in groups (the default: Q8_0's 32)
        (8, 67, 1344, 32, torch.bfloat16, 0),  # 21 blocks of 64: eight, eight and five
        (8, 40, 640, 32, torch.float32, 3),
        (8, 40, 512, 64, torch.float32, 7),
        (8, 44, 384, 128, torch.bfloat16, 0),
        (4, 67, 256, 0, torch.bfloat16, 3),  # per output channel (THUDM's int4 layout)
        (4, 64, 512, 128, torch.bfloat16, 0),
        (4, 67, 2304, 128, torch.float32, 0),  # 18 blocks: the scales 16 at a time, then two
        (4, 40, 4096, 128, torch.bfloat16, 1),  # 32 blocks: two whole spans of 16
        (4, 40, 1024, 256, torch.float32, 0),
        # Blocks of 64 columns: a width or group that is not a multiple of 128 (a half vector last).
        (4, 67, 192, 0, torch.bfloat16, 5),
        (4, 44, 704, 64, torch.bfloat16, 0),
        (4, 40, 512, 64, torch.float32, 0),
    ],
    ids=[
        "int8",
        "int8-fp32-scale-unaligned",
        "int8-g32",
        "int8-g32-1344",
        "int8-g32-fp32-scale-unaligned",
        "int8-g64-fp32-scale-unaligned",
        "int8-g128",
        "int4-per-channel",
        "int4-g128",
        "int4-g128-2304-fp32-scale",
        "int4-g128-4096-unaligned",
        "int4-g256-fp32-scale",
        "int4-per-channel-192",
        "int4-704-g64",
        "int4-g64-fp32-scale",
    ],
)
@pytest.mark.parametrize("rows", [1, 3])
def test_each_path_is_the_product_of_block_quantized_activations(
    path_libraries, path, bits, out_features, in_features, group, scale_dtype, offset, rows
):
    lib = _library(path_libraries, path)
    weight, scale = _stored(bits, out_features, in_features, group, scale_dtype, offset)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)) * 3
    out = M._native_dot_gemm(lib, x, weight, scale, bits, group or in_features)
    dense = M.dequantize_weight(weight, scale, bits).double()
    exact = block_quantized(x, M._native_dot_block(bits, in_features, group or in_features)) @ dense.t()
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    assert rel_error(out, exact) <= 2e-6  # fp32 sums of exact integer dot products
    # ...and not the unquantized product: the activations' rounding is visible.
    assert rel_error(out, x.double() @ dense.t()) > 1e-4


@needs_kernel
def test_an_empty_batch_gives_an_empty_product():
    weight, scale = _stored(4, 8, 128, 0, torch.bfloat16)
    out = M._native_dot_gemm(M._NativeDot.load(), torch.randn(0, 128), weight, scale, 4, 128)
    assert out.shape == (0, 8)


@needs_kernel
def test_the_kernel_refuses_widths_its_blocks_do_not_divide():
    weight, scale = _stored(4, 8, 96, 0, torch.bfloat16)  # 96 columns: not a multiple of 64
    with pytest.raises(RuntimeError, match="refused its operands"):
        M._native_dot_gemm(M._NativeDot.load(), torch.randn(1, 96), weight, scale, 4, 96)


@needs_kernel
@pytest.mark.parametrize("path", [2, 1, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [32, 96])
def test_grouped_int8_dequantizes_in_c_to_the_eager_ops_values(
    monkeypatch, path_libraries, path, dtype, group
):
    # 37 rows (no multiple of the threads' share) x 192 columns; the weight a view 3 bytes into a
    # buffer (unaligned) and the rows a slice, as prefill's chunks are.
    weight, scale = _stored(8, 40, 192, group, dtype, offset=3, seed=5)
    weight, scale = weight[2:39], scale[2:39]
    monkeypatch.setattr(M._NativeDot, "lib", _library(path_libraries, path))
    out = torch.full((37, 192), float("nan"), dtype=dtype)
    M._dequantize_int8_groups(weight, scale, out)
    monkeypatch.setattr(M._NativeDot, "lib", None)  # the eager ops
    eager = torch.empty_like(out)
    M._dequantize_int8_groups(weight, scale, eager)
    assert torch.equal(out, eager)
    assert torch.equal(out, M.dequantize_weight(weight, scale, 8).to(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits, group", [(8, 0), (8, 32), (4, 0), (4, 128), (4, 64)])
def test_quantized_layer_decodes_with_cpu_dot_and_dequantizes_for_prefill(bits, group, dtype):
    layer = quantized_layer(256, 96, bits, group, dtype, "cpu_dot", seed=3)
    dense = M.dequantize_weight(layer.weight, layer.weight_scale, bits).double()
    bias = layer.bias.double()
    tolerance = 2e-6 if dtype == torch.float32 else 6e-3  # the output's rounding to dtype
    for rows in (1, 5, 80):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(dtype)
        with torch.no_grad():
            out = layer(x)
        assert layer.kernel_name == "cpu_dot" and out.dtype == dtype and out.shape == (rows, 96)
        if rows < M._CPU_GEMV_MAX_ROWS:  # decode: int8 activations
            block = M._native_dot_block(bits, 256, layer.group_size or 256)
            expected = block_quantized(x, block) @ dense.t() + bias
        else:  # prefill: the dequantized weight in a GEMM (bf16/fp16: a half GEMM)
            expected = x.double() @ dense.t() + bias
            tolerance = max(tolerance, 1e-5)
        assert rel_error(out, expected) <= tolerance, rows


@needs_kernel
@pytest.mark.parametrize("bits, group", [(8, 0), (8, 32), (4, 0)])
def test_prefill_dequantizes_to_fp32_on_a_cpu_without_fast_half_gemms(monkeypatch, bits, group):
    monkeypatch.setattr(M, "_cpu_has_fast_half_gemm", lambda: False)  # e.g. AVX2, Cascade Lake
    layer = quantized_layer(256, 96, bits, group, torch.bfloat16, "cpu_dot", seed=3)
    x = torch.randn(80, 256, generator=torch.Generator().manual_seed(9)).bfloat16()
    calls = []
    real = M._dequantized_gemm
    monkeypatch.setattr(M, "_dequantized_gemm", lambda *a: calls.append(a[2]) or real(*a))
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel_name == "cpu_dot" and calls == [torch.float32]
    dense = M.dequantize_weight(layer.weight, layer.weight_scale, bits).double()
    assert rel_error(out, x.double() @ dense.t() + layer.bias.double()) <= 6e-3


@pytest.mark.parametrize(
    "kernel, bits, group", [("cpu_dot", 8, 32), ("cpu_dot", 4, 0), ("cpu", 8, 0), ("cpu", 4, 32)]
)
@pytest.mark.parametrize(
    "amx, amd_family, gemm_dtype",
    [(True, 0, torch.bfloat16), (False, 26, torch.bfloat16), (False, 0, torch.float32)],
    ids=["intel-amx", "amd-zen5", "intel-avx512bf16-no-amx"],
)
def test_prefill_gemm_is_half_with_amx_or_on_amd_and_fp32_on_an_intel_cpu_without_amx(
    monkeypatch, kernel, bits, group, amx, amd_family, gemm_dtype
):
    # oneDNN reports native bf16 on all three; only where bf16 dot products beat fp32 FMAs per
    # cycle (AMX, AMD's AVX512-BF16) does the prefill take a half GEMM.
    if kernel == "cpu_dot" and M._NativeDot.load() is None:
        pytest.skip("the cpu_dot kernel does not build here (no C compiler with OpenMP)")
    monkeypatch.setenv("CHATGLM_INT4_DEQUANT", "eager")  # no inductor compile in this test
    monkeypatch.setattr(M, "_cpu_has_fast_half_gemm", lambda: True)
    monkeypatch.setattr(M, "_cpu_has_amx", lambda: amx)
    monkeypatch.setattr(M, "_amd_cpu_family", lambda: amd_family)
    layer = quantized_layer(256, 96, bits, group, torch.bfloat16, kernel, seed=3)
    x = torch.randn(80, 256, generator=torch.Generator().manual_seed(9)).bfloat16()
    calls = []
    real = M._dequantized_gemm
    monkeypatch.setattr(
        M, "_dequantized_gemm", lambda layer, x, dtype, *a: calls.append(dtype) or real(layer, x, dtype, *a)
    )
    with torch.no_grad():
        out = layer(x)
    # int4 unpacked in eager ops on AMX stays on its kernel's rows (the faster there).
    on_rows = amx and bits == 4
    assert layer.kernel_name == kernel and calls == ([] if on_rows else [gemm_dtype])
    dense = M.dequantize_weight(layer.weight, layer.weight_scale, bits).double()
    # The dot kernel's rows round the activations to int8 blocks: a looser bound there.
    bound = 1.5e-2 if on_rows and kernel == "cpu_dot" else 6e-3
    assert rel_error(out, x.double() @ dense.t() + layer.bias.double()) <= bound


@needs_kernel
@pytest.mark.parametrize(
    "bits, in_features, group",
    [(4, 256, 32), (4, 160, 0), (8, 96, 0), (8, 96, 32)],
    ids=["int4-g32", "int4-160", "int8-96", "int8-96-g32"],
)
def test_layers_cpu_dot_cannot_take_run_the_cpu_kernel(bits, in_features, group):
    layer = quantized_layer(in_features, 64, bits, group, torch.bfloat16, "cpu_dot", seed=3)
    x = torch.randn(2, in_features).bfloat16()
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel_name == "cpu"
    expected = x.double() @ M.dequantize_weight(layer.weight, layer.weight_scale, bits).double().t()
    assert rel_error(out, expected + layer.bias.double()) <= 1e-2


def _model_256(**options):
    """chatglm3's flags at widths cpu_dot takes (2 layers, hidden 256, ffn 512), random weights
    by the golden fixtures' recipe (seed 0)."""
    from chatglm_protocol import randomize_
    from configuration_chatglm import ChatGLMConfig

    sizes = dict(
        hidden_size=256, num_attention_heads=4, kv_channels=64, multi_query_group_num=2, ffn_hidden_size=512
    )
    config = ChatGLMConfig(
        **{**golden_config("tiny-chatglm3"), **sizes, **options, "torch_dtype": torch.float32}
    )
    return randomize_(M.ChatGLMForConditionalGeneration(config, empty_init=True), 0).eval()


@needs_kernel
@pytest.mark.parametrize("int8_group", [None, 0], ids=["int8-grouped", "int8-per-channel"])
def test_auto_takes_cpu_dot_for_int4_and_grouped_int8_layers_and_cpu_for_per_channel_int8(int8_group):
    model = _model_256().to(torch.bfloat16).quantize(4, int8_group_size=int8_group)  # output layer: int8
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long))
    kernels = {(m.bits, m.kernel_name) for m in model.modules() if isinstance(m, M.QuantizedLinear)}
    int4 = "cpu_dot" if M._NativeDot.vectorised() else "cpu"
    # Grouped int8 (the default) takes cpu_dot on any path: torch's kernel does not take its scales.
    assert kernels == {(4, int4), (8, "cpu" if int8_group == 0 else "cpu_dot")}, kernels


@needs_kernel
def test_cpu_dot_named_at_run_time_takes_the_int8_layers_too():
    model = _model_256().to(torch.bfloat16).quantize(4, int8_group_size=0)  # output layer: int8
    model.transformer.set_runtime_options(quant_kernel="cpu_dot")
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long))
    kernels = {(m.bits, m.kernel_name) for m in model.modules() if isinstance(m, M.QuantizedLinear)}
    assert kernels == {(4, "cpu_dot"), (8, "cpu_dot")}, kernels


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_model_decode_with_cpu_dot_follows_the_math_reference(bits):
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(7))
    scores = {}
    for kernel in ("math", "cpu_dot"):
        model = _model_256(quant_kernel=kernel).to(torch.bfloat16).quantize(bits)
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        names = {m.kernel_name for m in model.modules() if isinstance(m, M.QuantizedLinear)}
        assert names == {kernel}, names
        scores[kernel] = torch.stack(out.scores).float()
    # The first score is the prefill (5 prompt tokens: the dot kernel too); the rest are decode
    # steps through the cache. int8 activations add well under 1 % to the bf16 model's logits.
    assert rel_error(scores["cpu_dot"], scores["math"]) <= 2e-2


@needs_kernel
def test_graph_mode_calls_the_kernel_as_one_op():
    layer = quantized_layer(256, 96, 4, 128, torch.bfloat16, "cpu_dot", seed=3)
    x = torch.randn(1, 256).bfloat16()
    backend = CountingBackend()
    torch._dynamo.reset()  # conftest clears the CHATGLM_* variables; a fresh dynamo cache here
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, backend=backend, fullgraph=True)
        assert torch.equal(compiled(x), expected)
    targets = [str(node.target) for node in backend.graphs[0].graph.nodes if node.op == "call_function"]
    assert "chatglm3.native_dot.default" in targets, targets


@needs_kernel
def test_eager_calls_the_kernel_itself_and_graph_mode_the_op():
    """Eager skips the op dispatch (it cost more than a small layer's product); graph mode
    keeps the one op, whose Python kernel runs where dynamo is compiling."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = quantized_layer(256, 96, 8, 32, torch.bfloat16, "cpu_dot", seed=5)
    x = torch.randn(1, 256).bfloat16()
    with torch.no_grad():
        seen = Ops()
        with seen:
            eager = layer(x)
        assert seen.names and not any("native_dot" in name for name in seen.names), seen.names
        # The op itself gives the same product (graph mode's path), the bias added as forward does.
        scale, group = layer._kernel_state[:2]
        op = M._NATIVE_DOT(x, layer.weight, scale, 8, group).to(x.dtype) + layer.bias
    assert torch.equal(eager, op)


def test_without_a_compiler_auto_keeps_cpu_and_cpu_dot_says_why(monkeypatch, caplog):
    monkeypatch.setattr(M._NativeDot, "lib", None)
    monkeypatch.setattr(M._NativeDot, "failure", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING"):
        assert M.resolve_quant_kernel("auto", cpu, torch.bfloat16, 4) == "cpu"
        assert M.resolve_quant_kernel("auto", cpu, torch.bfloat16, 4) == "cpu"
    assert "did not run" in M._NativeDot.failure
    warnings = [
        r.getMessage()
        for r in caplog.records
        if "C kernels (quant_kernel cpu_dot, linear_backend dot) are unavailable" in r.getMessage()
    ]
    assert len(warnings) == 1 and "/nonexistent/cc" in warnings[0], warnings  # once, with the cause
    with pytest.raises(RuntimeError) as raised:
        M.resolve_quant_kernel("cpu_dot", cpu, torch.bfloat16, 4)
    message = str(raised.value)
    assert "\n" not in message and "config.quant_kernel='cpu_dot'" in message
    assert "install a C compiler" in message and "CHATGLM_QUANT_KERNEL=cpu" in message


@needs_kernel
@pytest.mark.parametrize(
    "bits, out_features, in_features, group",
    # Tiles over 12 KiB, where "near" does not prefetch the next one and "all" does: int8 rows of
    # 4096 bytes (16 KiB tiles, the 6B shape's), int4 rows of 8192 columns, int4 in blocks of 64.
    [(8, 35, 4096, 32), (8, 36, 4096, 0), (4, 35, 8192, 128), (4, 36, 6208, 64)],
    ids=["int8-g32", "int8-per-channel", "int4-g128", "int4-g64"],
)
def test_the_next_tile_prefetch_leaves_the_products_unchanged(
    monkeypatch, bits, out_features, in_features, group
):
    weight, scale = _stored(bits, out_features, in_features, group, torch.bfloat16, offset=1)
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(2))
    lib = M._NativeDot.load()
    outs = {}
    for mode in ("near", "all"):
        monkeypatch.setenv("CHATGLM_DOT_PREFETCH", mode)
        outs[mode] = M._native_dot_gemm(lib, x, weight, scale, bits, group or in_features)
    assert torch.equal(outs["near"], outs["all"])
    dense = M.dequantize_weight(weight, scale, bits).double()
    exact = block_quantized(x, M._native_dot_block(bits, in_features, group or in_features)) @ dense.t()
    assert rel_error(outs["all"], exact) <= 2e-6


@needs_kernel
@pytest.mark.parametrize("in_features", [2304, 4096])  # 18 and 32 blocks of 128 columns
def test_int4_tiles_of_four_and_eight_rows_both_give_the_block_products(monkeypatch, in_features):
    # 45 rows: five tiles of eight and a remainder of five, or eleven of four and one row.
    weight, scale = _stored(4, 45, in_features, 128, torch.bfloat16, offset=1)
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(5))
    lib = M._NativeDot.load()
    outs = {}
    for tiles in ("narrow", "wide"):
        monkeypatch.setenv("CHATGLM_DOT_TILES", tiles)
        outs[tiles] = M._native_dot_gemm(lib, x, weight, scale, 4, 128)
    # The same products, scaled in another order (x4: per block and row; x8: 16 blocks at once).
    exact = block_quantized(x, 128) @ M.dequantize_weight(weight, scale, 4).double().t()
    for tiles, out in outs.items():
        assert rel_error(out, exact) <= 2e-6, tiles
    if lib.cg_path() == 2:  # the AVX-512 tiles (elsewhere every row runs alone)
        assert not torch.equal(outs["narrow"], outs["wide"])  # both tile kinds really ran


@needs_kernel
@pytest.mark.parametrize("group", [32, 0])  # grouped, per output channel
def test_int8_tiles_of_two_and_four_rows_give_the_same_products(monkeypatch, group):
    # 43 rows: 21 tiles of two and one row, or ten of four and three rows; each row's sums are
    # made by the same instructions either way, so the outputs are bitwise the same.
    weight, scale = _stored(8, 43, 4096, group, torch.bfloat16, offset=1)
    x = torch.randn(3, 4096, generator=torch.Generator().manual_seed(6))
    lib = M._NativeDot.load()
    outs = {}
    for tiles in ("narrow", "wide"):
        monkeypatch.setenv("CHATGLM_DOT_TILES", tiles)
        outs[tiles] = M._native_dot_gemm(lib, x, weight, scale, 8, group or 4096)
    assert torch.equal(outs["narrow"], outs["wide"])
    exact = block_quantized(x, 32) @ M.dequantize_weight(weight, scale, 8).double().t()
    assert rel_error(outs["narrow"], exact) <= 2e-6


@needs_kernel
@pytest.mark.parametrize("k", [4224, 4160, 4100, 96, 31])
def test_the_bf16_kernel_rounds_each_exact_sum_once_at_every_width(k):
    # Widths: whole 128-column steps, then 32-column ones, then a masked tail, and a tail alone.
    # Small whole numbers make every float32 sum exact, so each output must be torch's rounding of
    # the exact product, bitwise; 37 rows (odd) split unevenly between the threads.
    g = torch.Generator().manual_seed(k)
    weight = torch.randint(-8, 9, (37, k), generator=g).to(torch.bfloat16)
    x = torch.randint(-8, 9, (k,), generator=g).to(torch.bfloat16)
    bias = torch.randint(-64, 65, (37,), generator=g).to(torch.bfloat16)
    exact = weight.double() @ x.double() + bias.double()
    out = M._dot_gemv_eager(x, weight, bias)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.to(torch.bfloat16))
    assert torch.equal(M._dot_gemv_eager(x, weight, None), (exact - bias.double()).to(torch.bfloat16))


@needs_kernel
def test_the_bf16_kernel_sums_random_rows_in_float32_and_keeps_a_nan():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(37, 8256, generator=g).to(torch.bfloat16)
    x = torch.randn(8256, generator=g).to(torch.bfloat16)
    weight[5, 100] = float("nan")
    out = M._dot_gemv_eager(x, weight, None)
    keep = torch.arange(37) != 5
    assert torch.isnan(out[5]) and not torch.isnan(out[keep]).any()
    want = (weight.double() @ x.double())[keep]
    assert ((out[keep].double() - want).abs() <= 2**-8 * want.abs() + 1e-4 * want.abs().max()).all()


_CPUINFO = (
    "processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\nflags\t\t: fpu avx2\n"
)


@pytest.mark.parametrize(
    "vendor, family, want",
    [("AuthenticAMD", 26, 26), ("AuthenticAMD", 25, 25), ("GenuineIntel", 6, 0)],
)
def test_the_amd_family_is_read_from_cpuinfo(vendor, family, want):
    assert M._amd_family_in(_CPUINFO.format(vendor=vendor, family=family)) == want
    assert M._amd_family_in("") == 0


# (env, its resolver's name, auto on Zen 5 and later, auto elsewhere)
_CPU_TUNED = [
    ("CHATGLM_DOT_PREFETCH", "_dot_prefetch_mode", "all", "near"),
    ("CHATGLM_DOT_TILES", "_dot_tiles", "narrow", "wide"),
]


@pytest.mark.parametrize("env, resolver, zen5, other", _CPU_TUNED, ids=["prefetch", "tiles"])
@pytest.mark.parametrize("family", [26, 27, 25, 0])
def test_auto_takes_the_zen_5_setting_from_zen_5_on(monkeypatch, env, resolver, zen5, other, family):
    monkeypatch.setattr(M, "_amd_cpu_family", lambda: family)
    want, named = (zen5, other) if family >= 26 else (other, zen5)
    assert getattr(M, resolver)() == want
    monkeypatch.setenv(env, named)
    assert getattr(M, resolver)() == named  # named, it overrides the CPU's default


@needs_kernel
@pytest.mark.parametrize(
    "env, value, bits, group, choices",
    [
        ("CHATGLM_DOT_PREFETCH", "sometimes", 8, 32, "near, all"),
        ("CHATGLM_DOT_TILES", "16", 4, 128, "narrow, wide"),
    ],
    ids=["prefetch", "tiles"],
)
def test_a_bad_kernel_setting_is_refused_when_the_kernel_is_chosen(
    monkeypatch, env, value, bits, group, choices
):
    layer = quantized_layer(128, 64 if bits == 8 else 128, bits, group, torch.float32, "cpu_dot")
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=rf"^{env}='{value}' is not valid; use one of: auto, {choices}$"):
        layer.select_kernel(torch.device("cpu"), torch.float32, "cpu_dot")


@needs_kernel
@pytest.mark.parametrize("path", [2, 1, 0])
@pytest.mark.parametrize("mode", ["near", "all"])
def test_the_yardstick_read_passes_over_every_byte(monkeypatch, path_libraries, path, mode):
    monkeypatch.setattr(M._NativeDot, "lib", _library(path_libraries, path))
    monkeypatch.setenv("CHATGLM_DOT_PREFETCH", mode)
    buffer = torch.randint(
        -128, 128, (12, 4096), dtype=torch.int8, generator=torch.Generator().manual_seed(4)
    )
    assert M.native_stream_read(buffer) == buffer.view(torch.uint8).long().sum().item()
    # A partial last tile is left out: whole tiles of four rows only.
    assert M.native_stream_read(buffer[:7].contiguous()) == buffer[:4].view(torch.uint8).long().sum().item()
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        M.native_stream_read(buffer[:, ::2])


@needs_kernel
@pytest.mark.parametrize("path", [2, 0])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "in_features, group, scale_dtype",
    [(256, 0, torch.bfloat16), (512, 128, torch.bfloat16), (384, 64, torch.float32)],
    ids=["per-channel", "g128", "g64-fp32-scale"],
)
def test_int4_unpacks_in_c_to_the_eager_ops_values(
    path_libraries, monkeypatch, path, out_dtype, in_features, group, scale_dtype
):
    monkeypatch.setattr(M._NativeDot, "lib", _library(path_libraries, path))
    weight, scale = _stored(4, 37, in_features, group, scale_dtype, offset=0, seed=5)
    half = in_features // 2
    want = torch.zeros(37, in_features, dtype=out_dtype)
    M._int4_halves_into(weight, scale, want[:, :half], want[:, half:])
    got = torch.full(
        (37, in_features), float("nan"), dtype=out_dtype
    )  # as a reused chunk: the halves are views
    assert M._native_int4_halves_into(weight, scale, got[:, :half], got[:, half:])
    assert torch.equal(got, want)
    # int4_dequant=eager keeps the eager ops (auto's use of it: the next test).
    calls = []
    monkeypatch.setattr(M, "_native_int4_halves_into", lambda *a: calls.append(1) or False)
    M._Int4Unpacker.run("eager", weight, scale, got[:, :half], got[:, half:])
    assert calls == []


@needs_kernel
def test_int4_unpack_leaves_what_it_does_not_take_to_the_other_paths():
    weight, scale = _stored(4, 8, 128, 0, torch.bfloat16)
    out = torch.empty(8, 128, dtype=torch.float16)
    assert not M._native_int4_halves_into(weight, scale, out[:, :64], out[:, 64:])  # fp16 out
    out = torch.empty(8, 128)
    assert not M._native_int4_halves_into(weight[:, ::2], scale, out[:, :32], out[:, 32:64])  # strided weight


@needs_kernel
def test_auto_unpacks_int4_prefill_in_c(monkeypatch):
    weight, scale = _stored(4, 16, 256, 128, torch.bfloat16, seed=6)
    monkeypatch.setattr(
        M._Int4Unpacker, "_run_compiled", lambda *a: pytest.fail("auto ran the inductor kernel")
    )
    out = torch.empty(16, 256, dtype=torch.bfloat16)
    M._Int4Unpacker.run("auto", weight, scale, out[:, :128], out[:, 128:])
    want = torch.empty_like(out)
    M._int4_halves_into(weight, scale, want[:, :128], want[:, 128:])
    assert torch.equal(out, want)
