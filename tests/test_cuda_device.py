"""The ``cuda`` quantized-matmul kernel on a real GPU (``pytest -m cuda``): written from the ops'
contracts, so these are its truth check. Skipped, with the reason, where no GPU is visible."""

import pytest
import torch
from golden_protocol import build_golden_model

import modeling_chatglm as M

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to this torch"),
]


def rel_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("rows", [1, 5, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bits, group", [(8, 0), (8, 32), (4, 32), (4, 128), (4, 0)])
def test_cuda_kernel_matches_the_math_reference_per_layer(bits, group, dtype, rows):
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.05)
    layer = M.QuantizedLinear.from_linear(linear.to(dtype), bits, group).cuda()
    layer.kernel_option = "cuda"
    x = torch.randn(rows, 256, generator=generator).to(dtype).cuda()
    expected = x.double() @ M.dequantize_weight(layer.weight, layer.weight_scale, bits).double().t()
    expected = expected + layer.bias.double()
    with torch.no_grad():
        out = layer(x)
    assert layer.kernel_name == "cuda" and out.dtype == dtype and out.device.type == "cuda"
    assert rel_error(out, expected) <= (1e-4 if dtype == torch.float32 and bits == 8 else 1e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_on_cuda_gives_the_cpu_math_logits(bits):
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    cpu = (
        build_golden_model("tiny-chatglm3", quant_kernel="math")
        .to(torch.bfloat16)
        .quantize(bits, group_size=32)
    )
    gpu = build_golden_model("tiny-chatglm3").to(torch.bfloat16).quantize(bits, group_size=32).cuda()
    with torch.no_grad():
        expected = cpu(ids).logits
        logits = gpu(ids.cuda()).logits
    assert {m.kernel_name for m in gpu.modules() if isinstance(m, M.QuantizedLinear)} == {"cuda"}
    assert rel_error(logits.cpu(), expected) <= 2e-2
