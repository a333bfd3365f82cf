"""The dense projections' backend (``linear_backend``: dot / gemv / aten) and the weights' memory.

gemv runs a one-row step through ATen's matrix-vector kernel (``torch.mv``; in graph mode the
opaque ``chatglm3::gemv`` op): it must compute the layer's own product, fall back to the layer's
forward for anything it does not take, and leave the model's answers unchanged.
"""

import os
import types

import pytest
import torch
from golden_protocol import (
    build_golden_model,
    compare_to_golden,
    golden_expected,
    run_protocol,
    variant_inputs,
)
from torch import nn

import modeling_chatglm as modeling

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _layer(dtype, bias, in_features=96, out_features=80, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_computes_the_layers_product_for_one_row(dtype, bias):
    layer = _layer(dtype, bias)
    x = torch.randn(1, 1, 96).to(dtype)
    got = modeling._linear_gemv(layer, x)
    want = torch.nn.functional.linear(
        x.float(), layer.weight.float(), None if not bias else layer.bias.float()
    )
    assert got.shape == (1, 1, 80) and got.dtype == dtype
    # fp32 accumulation and one rounding per output: within half an ulp-ish of the exact product.
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    assert (got.float() - want).abs().max() <= tolerance * want.abs().max()


needs_dot = pytest.mark.skipif(
    modeling._NativeDot.load() is None,
    reason=f"the C kernels do not build here: {modeling._NativeDot.failure}",
)


@needs_dot
@pytest.mark.parametrize("path", ["native", "plain-c"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features, in_features", [(80, 96), (67, 1344), (5, 100)])
def test_dot_computes_the_layers_product_for_one_row(monkeypatch, path, bias, out_features, in_features):
    # 67 rows: four at a time and three single ones; 96 / 100 columns: a masked tail.
    if path == "plain-c":
        monkeypatch.setattr(modeling._NativeDot, "lib", modeling._NativeDot.build(("CG_PATH=0",)))
    expected_path = 0 if path == "plain-c" else int(modeling._NativeDot.bf16_vectorised())
    assert modeling._NativeDot.lib.cg_bf16_path() == expected_path
    layer = _layer(torch.bfloat16, bias, in_features, out_features, seed=out_features)
    x = torch.randn(1, 1, in_features).to(torch.bfloat16)
    got = modeling._linear_dot(layer, x)
    want = x.double().view(-1) @ layer.weight.double().t() + (layer.bias.double() if bias else 0)
    assert got.shape == (1, 1, out_features) and got.dtype == torch.bfloat16
    # float32 sums rounded once to bf16: within bf16's half ulp (2^-9) of the exact product, plus
    # the sums' own rounding.
    assert ((got.double().view(-1) - want).abs() <= 2**-8 * want.abs() + 1e-4 * want.abs().max()).all()


@needs_dot
def test_dot_leaves_what_it_does_not_take_to_the_layers_own_forward():
    layer = _layer(torch.bfloat16, True)
    rows = torch.randn(3, 96).to(torch.bfloat16)
    assert torch.equal(modeling._linear_dot(layer, rows), layer(rows))
    for dtype in (torch.float32, torch.float16):
        other = _layer(dtype, True)
        one = torch.randn(1, 96).to(dtype)
        assert torch.equal(modeling._linear_dot(other, one), other(one))


def test_several_rows_and_replaced_layers_run_the_layers_own_forward():
    layer = _layer(torch.bfloat16, True)
    rows = torch.randn(3, 96).to(torch.bfloat16)
    assert torch.equal(modeling._linear_gemv(layer, rows), layer(rows))

    class Scaled(nn.Linear):  # e.g. a DeepSpeed or quantized replacement: not a plain nn.Linear
        def forward(self, x):
            return super().forward(x) * 3

    scaled = Scaled(96, 80).to(torch.bfloat16)
    scaled.load_state_dict(layer.state_dict())
    one = torch.randn(1, 96).to(torch.bfloat16)
    assert torch.equal(modeling._linear_gemv(scaled, one), scaled(one))


@pytest.mark.parametrize("exe_mode", ["eager", "dynamo"])
@pytest.mark.parametrize("linear", ["gemv", pytest.param("dot", marks=needs_dot), "aten"])
def test_a_sharded_layer_runs_the_backends_kernel_on_its_slice_then_combines(monkeypatch, linear, exe_mode):
    # Two "ranks" of a layer split by output rows, in one process: each computes its rows with the
    # backend and the combine puts them in place, as the tensor-parallel gather does.
    project = modeling.LINEAR_BACKENDS[linear]
    layer = _layer(torch.bfloat16, True, out_features=80)
    kernel_rows = []
    if linear == "gemv":
        real = modeling._gemv_eager
        monkeypatch.setattr(
            modeling, "_gemv_eager", lambda x, w, b: kernel_rows.append(w.shape[0]) or real(x, w, b)
        )

    def shard(r):
        rows = slice(40 * r, 40 * (r + 1))

        def combine(y):
            whole = y.new_zeros(*y.shape[:-1], 80)
            whole[..., rows] = y
            return whole

        return modeling.ShardedLinear(layer.weight[rows].clone(), layer.bias[rows].clone(), combine)

    shards = [shard(0), shard(1)]
    x = torch.randn(1, 1, 96).to(torch.bfloat16)
    run = (
        (lambda s, t: project(s, t))
        if exe_mode == "eager"
        else torch.compile(project, fullgraph=True, backend="eager")
    )
    got = run(shards[0], x) + run(shards[1], x)
    assert got.shape == (1, 1, 80)
    # The same kernel on fewer rows: each output exactly as the whole layer's own backend gives it
    # (oneDNN's GEMM, aten, may block 40 rows otherwise than 80: within bf16's rounding there).
    want = project(layer, x)
    if linear == "aten":
        torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
    else:
        assert torch.equal(got, want)
    if linear == "gemv" and exe_mode == "eager":
        assert kernel_rows == [40, 40, 80]  # the one-row kernel ran on each slice, not F.linear
    assert torch.equal(
        shards[0](x)[..., 40:], torch.zeros(1, 1, 40, dtype=torch.bfloat16)
    )  # its forward combines too


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("linear", ["gemv", pytest.param("dot", marks=needs_dot)])
def test_one_row_kernels_in_a_full_graph_are_one_op_with_the_eager_result(linear, bias):
    project, op = {
        "gemv": (modeling._linear_gemv, "chatglm3.gemv"),
        "dot": (modeling._linear_dot, "chatglm3.dot_gemv"),
    }[linear]
    layer = _layer(torch.bfloat16, bias)
    x = torch.randn(1, 1, 96).to(torch.bfloat16)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda t: project(layer, t), fullgraph=True, backend=backend)
    assert torch.equal(compiled(x), project(layer, x))
    assert any(op in target for target in seen), seen
    assert not any("aten.mv" in target or "addmv" in target for target in seen), seen


def test_auto_is_gemv_for_half_weights_on_a_cpu_only(monkeypatch):
    monkeypatch.setattr(modeling, "_cpu_has_fast_half_gemm", lambda: True)
    monkeypatch.setattr(modeling, "_cpu_has_amx", lambda: True)  # a Xeon with AMX: gemv for bf16
    options = modeling.RuntimeOptions()
    for dtype, want in ((torch.bfloat16, "gemv"), (torch.float16, "gemv"), (torch.float32, "aten")):
        chosen = modeling.resolve_backends(options, "cpu", dtype)
        assert chosen.linear == want and chosen.project is modeling.LINEAR_BACKENDS[want]
    assert modeling.resolve_backends(options, "cuda", torch.bfloat16).linear == "aten"
    forced = modeling.RuntimeOptions(linear_backend="gemv")
    assert modeling.resolve_backends(forced, "cpu", torch.float32).linear == "gemv"
    with pytest.raises(ValueError, match="CHATGLM_LINEAR=aten"):
        modeling.resolve_backends(forced, "cuda", torch.bfloat16)


@pytest.mark.parametrize("fast_half, amx", [(False, False), (True, True)])
def test_auto_keeps_the_gemv_for_bf16_elsewhere_on_a_cpu(monkeypatch, fast_half, amx):
    # AVX2 (no native bf16 GEMMs) and AMX Xeons: ATen's mv measured the fastest for one row.
    monkeypatch.setattr(modeling, "_cpu_has_fast_half_gemm", lambda: fast_half)
    monkeypatch.setattr(modeling, "_cpu_has_amx", lambda: amx)
    assert modeling.resolve_backends(modeling.RuntimeOptions(), "cpu", torch.bfloat16).linear == "gemv"


@pytest.mark.parametrize("bf16_kernel, want", [(True, "dot"), (False, "aten")])
def test_auto_takes_dot_for_bf16_on_a_cpu_with_avx512_bf16_and_no_amx(monkeypatch, bf16_kernel, want):
    # Zen 4/5: ATen's mv and oneDNN's GEMM are compute-bound for one row; our kernel, else oneDNN.
    monkeypatch.setattr(modeling, "_cpu_has_fast_half_gemm", lambda: True)
    monkeypatch.setattr(modeling, "_cpu_has_amx", lambda: False)
    monkeypatch.setattr(modeling._NativeDot, "bf16_vectorised", lambda: bf16_kernel)
    options = modeling.RuntimeOptions()
    assert modeling.resolve_backends(options, "cpu", torch.bfloat16).linear == want
    assert modeling.resolve_backends(options, "cpu", torch.float16).linear == "gemv"


def test_dot_is_refused_off_the_cpu_and_without_a_compiler(monkeypatch):
    forced = modeling.RuntimeOptions(linear_backend="dot")
    with pytest.raises(ValueError, match="CHATGLM_LINEAR=aten"):
        modeling.resolve_backends(forced, "cuda", torch.bfloat16)
    monkeypatch.setattr(modeling._NativeDot, "lib", None)
    monkeypatch.setattr(modeling._NativeDot, "failure", "cc failed: no compiler")
    with pytest.raises(
        ValueError, match=r"linear_backend='dot' builds a C kernel .*no compiler.*CHATGLM_LINEAR=aten"
    ):
        modeling.resolve_backends(forced, "cpu", torch.bfloat16)


def test_a_bad_linear_variable_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("CHATGLM_LINEAR", "blas")
    with pytest.raises(ValueError, match="CHATGLM_LINEAR='blas' is not valid"):
        modeling.RuntimeOptions.from_config(types.SimpleNamespace())


def _row(expected, variant: str, r: int):
    """What compare_to_golden reads of the fixture, for batch row ``r`` alone (rows are
    independent computations): name -> the dimension holding the batch."""
    batch_dim = {
        "prefill_logits": 0,
        "greedy_tokens": 0,
        "next_token_after_decode": 0,
        "decode_logits": 1,
        "prefill_past_key_values": 3,
        "final_past_key_values": 3,
    }
    return {variant + name: expected[variant + name].narrow(dim, r, 1) for name, dim in batch_dim.items()}


@pytest.mark.parametrize("exe_mode", ["eager", "dynamo"])
@pytest.mark.parametrize("variant", ["", "nopad_"])
def test_the_model_on_gemv_matches_the_golden_fixture_row_by_row(exe_mode, variant):
    """fp32 with gemv forced (auto keeps fp32 on aten), one batch row at a time, so that every
    decode step's projections and the output layer run through the gemv."""
    expected = golden_expected("tiny-chatglm3")
    model = build_golden_model(
        "tiny-chatglm3",
        linear_backend="gemv",
        exe_mode=exe_mode,
        kv_cache="static",
        graph_backend="aot_eager",
    )
    assert model.transformer.backends.linear == "gemv"
    calls = []
    real = modeling._gemv_eager

    def counting(x, weight, bias):
        calls.append(tuple(weight.shape))
        return real(x, weight, bias)

    ids, mask, positions = variant_inputs(expected, variant)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "_gemv_eager", counting)
        for r in range(ids.shape[0]):
            result = run_protocol(model, ids[r : r + 1], mask[r : r + 1], positions[r : r + 1])
            compare_to_golden(result, _row(expected, variant, r), variant, atol=1e-5)
    if exe_mode == "eager":  # (a compiled step calls the op's registered kernel, not this name)
        layer = model.transformer.encoder.layers[0]
        assert tuple(layer.self_attention.query_key_value.weight.shape) in calls
        assert tuple(model.transformer.output_layer.weight.shape) in calls


def test_bf16_model_on_gemv_gives_the_aten_models_tokens():
    expected = golden_expected("tiny-chatglm3")
    inputs = variant_inputs(expected, "nopad_")
    inputs = tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in inputs)
    runs = {
        linear: run_protocol(
            build_golden_model("tiny-chatglm3", dtype=torch.bfloat16, linear_backend=linear), *inputs
        )
        for linear in ("aten", "gemv", "dot")
    }
    assert torch.equal(runs["gemv"].greedy_tokens, runs["aten"].greedy_tokens)
    assert torch.equal(runs["dot"].greedy_tokens, runs["aten"].greedy_tokens)


# --- weights that are views of a file mapping --------------------------------------------------


def _map_parameters_from_a_file(model, tmp_path):
    """Make every parameter of ``model`` a view of a private file mapping holding its values
    (what from_pretrained leaves on transformers 5); the mapping is only read, never written."""
    path = tmp_path / "weights.bin"
    params = list(model.parameters())
    blobs = [p.detach().contiguous().view(-1).view(torch.uint8) for p in params]
    path.write_bytes(b"".join(blob.numpy().tobytes() for blob in blobs))
    _as_a_file_on_disk(path)
    total = sum(blob.numel() for blob in blobs)
    mapped = torch.from_file(str(path), shared=False, size=total, dtype=torch.uint8)
    offset = 0
    for p, blob in zip(params, blobs):
        p.data = mapped[offset : offset + blob.numel()].view(p.dtype).view(p.shape)
        offset += blob.numel()
    return path, mapped  # the caller keeps the whole mapping alive, as transformers 5 does


def _as_a_file_on_disk(path) -> None:
    """Leave ``path`` as a downloaded checkpoint is: written back and out of the page cache, so
    the mapping's pages are read in by its own faults (fresh pages just written are dirty and
    can sit in the writer's per-core LRU batches, where MADV_PAGEOUT cannot take them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _resident_kib(path) -> int:
    """Resident size of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps", encoding="utf-8"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:
            inside = line.rstrip().endswith(str(path))
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


def _in_a_file(t, ranges):
    address = t.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in ranges)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_weights_in_a_file_mapping_move_to_process_memory_at_the_first_forward(tmp_path):
    expected = golden_expected("tiny-chatglm3")
    model = build_golden_model("tiny-chatglm3")
    _map_parameters_from_a_file(model, tmp_path)
    ranges = modeling._file_mapped_ranges()
    assert all(_in_a_file(p, ranges) for p in model.parameters())
    ids = model.transformer.embedding.word_embeddings.weight  # the same Parameter object after
    result = run_protocol(model, *variant_inputs(expected, ""))
    compare_to_golden(result, expected, "", atol=1e-5)
    ranges = modeling._file_mapped_ranges()
    assert not any(_in_a_file(p, ranges) for p in model.parameters())
    assert model.transformer.embedding.word_embeddings.weight is ids


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux /proc/self/smaps")
def test_the_file_pages_the_weights_left_are_handed_back(tmp_path):
    """The loader keeps the file mapped after the copies: its pages must not stay resident (the
    6B model's footprint would double).

    One thread on one core: a page another core touched last can sit in that core's LRU batch,
    out of MADV_PAGEOUT's reach until the batch drains (torch's worker threads keep their own
    cores when the main thread is pinned), a residue that is nothing beside 6B's 11.5 GB but is
    all of this tiny model's 400 KiB."""
    threads = torch.get_num_threads()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    if cores:
        os.sched_setaffinity(0, {min(cores)})
    try:
        _check_the_pages_are_handed_back(tmp_path)
    finally:
        torch.set_num_threads(threads)
        if cores:
            os.sched_setaffinity(0, cores)


def _check_the_pages_are_handed_back(tmp_path):
    model = build_golden_model("tiny-chatglm3")
    path, whole_file = _map_parameters_from_a_file(model, tmp_path)
    for p in model.parameters():
        p.sum()  # read every page in
    before = _resident_kib(path)
    assert before >= path.stat().st_size // 1024 - 8
    assert modeling.move_weights_off_files(model) > 0
    assert _resident_kib(path) <= 8, (before, _resident_kib(path))
    assert whole_file.numel() == path.stat().st_size  # still mapped, its pages handed back


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_weights_stay_mapped_when_the_copies_would_not_fit(tmp_path, monkeypatch):
    model = build_golden_model("tiny-chatglm3")
    _map_parameters_from_a_file(model, tmp_path)
    monkeypatch.setattr(modeling, "memory_available_bytes", lambda: 1024)
    assert modeling.move_weights_off_files(model) == 0
    ranges = modeling._file_mapped_ranges()
    assert all(_in_a_file(p, ranges) for p in model.parameters())
    monkeypatch.undo()
    moved = modeling.move_weights_off_files(model)
    assert moved == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_weights_moved_under_inference_mode_still_serve_a_recorded_forward(tmp_path):
    expected = golden_expected("tiny-chatglm3")
    model = build_golden_model("tiny-chatglm3")
    _map_parameters_from_a_file(model, tmp_path)
    ids = expected["nopad_input_ids"]
    with torch.inference_mode():
        model(input_ids=ids)  # the first forward moves the weights
    assert not any(p.is_inference() for p in model.parameters())
    model(input_ids=ids).logits.sum().backward()  # autograd saves the weights: no error


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_cpu_weights_mapped_leaves_the_mapping_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATGLM_CPU_WEIGHTS", "mapped")
    expected = golden_expected("tiny-chatglm3")
    model = build_golden_model("tiny-chatglm3")
    _map_parameters_from_a_file(model, tmp_path)
    assert model.transformer.options.cpu_weights == "mapped"
    compare_to_golden(run_protocol(model, *variant_inputs(expected, "")), expected, "", atol=1e-5)
    ranges = modeling._file_mapped_ranges()
    assert all(_in_a_file(p, ranges) for p in model.parameters())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux /proc/self/maps")
def test_a_shared_file_mapping_is_not_copied(tmp_path):
    """Pages mapped shared are shared with other processes on purpose (e.g. server workers)."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 8192)
    shared = torch.from_file(str(path), shared=True, size=8192, dtype=torch.uint8)
    layer = nn.Linear(64, 32, bias=False)
    layer.weight.data = shared[: 64 * 32 * 4].view(torch.float32).view(32, 64)
    assert modeling.move_weights_off_files(layer) == 0
    assert layer.weight.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()


def test_large_weight_copies_ask_for_huge_pages_where_the_kernel_offers_them():
    big = torch.randn(1024, 1024)  # 4 MiB
    fresh = modeling._huge_page_empty_like(big)
    if not modeling._transparent_huge_pages():
        assert fresh is None  # ordinary memory then (the caller clones)
        return
    assert fresh.shape == big.shape and fresh.dtype == big.dtype and fresh.is_contiguous()
    assert fresh.data_ptr() % (2 << 20) == 0  # whole huge pages from its first byte
    fresh.copy_(big)
    assert torch.equal(fresh, big)
    del big
    assert fresh.sum().isfinite()  # the memory outlives the source and stays readable
    assert modeling._huge_page_empty_like(torch.zeros(1000)) is None  # under 2 MiB: not worth a page


@pytest.mark.parametrize(
    "amx, amd_family, fp32_prefill", [(False, 0, True), (False, 26, False), (True, 0, False)]
)
def test_dot_prefill_runs_fp32_gemms_only_where_half_gemms_are_the_slower(
    monkeypatch, amx, amd_family, fp32_prefill
):
    # An Intel CPU with AVX512-BF16 but no AMX: oneDNN's bf16 GEMM is slower than its fp32 one.
    monkeypatch.setattr(modeling, "_cpu_has_fast_half_gemm", lambda: True)
    monkeypatch.setattr(modeling, "_cpu_has_amx", lambda: amx)
    monkeypatch.setattr(modeling, "_amd_cpu_family", lambda: amd_family)
    chosen = modeling.resolve_backends(modeling.RuntimeOptions(linear_backend="dot"), "cpu", torch.bfloat16)
    want = modeling._linear_dot_fp32_prefill if fp32_prefill else modeling.LINEAR_BACKENDS["dot"]
    assert chosen.linear == "dot" and chosen.project is want


@pytest.mark.parametrize("bias", [False, True])
def test_fp32_prefill_is_the_fp32_product_rounded_once_in_eager_and_graph_mode(monkeypatch, bias):
    if modeling._NativeDot.load() is None:
        pytest.skip("the dot kernel does not build here (no C compiler with OpenMP)")
    monkeypatch.setattr(modeling, "_DEQUANT_CHUNK_ROWS", 32)  # several chunks, a short last one
    layer = _layer(torch.bfloat16, bias, in_features=128, out_features=80)
    x = torch.randn(2, 40, 128, generator=torch.Generator().manual_seed(4)).bfloat16()  # 80 rows
    reference = nn.functional.linear(
        x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float()
    )
    project = modeling._linear_dot_fp32_prefill
    with torch.no_grad():
        out = project(layer, x)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 40, 80)
        # fp32 sums in another order than the reference's: equal up to a rare last-bit flip.
        assert (out.float() - reference.bfloat16().float()).abs().max() <= reference.abs().max() * 2**-7
        assert (out.float() - reference).abs().max() <= reference.abs().max() * 2**-8
        compiled = torch.compile(lambda t: project(layer, t), fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), out)
        one_row = project(layer, x[:1, :1])  # a decode step: the dot kernel, not the fp32 GEMMs
        assert torch.equal(one_row, modeling._linear_dot(layer, x[:1, :1]))
