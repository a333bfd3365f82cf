"""Launch detection, backends, KV-group replication and tensor-parallel sharding (CPU, gloo).

The multi-process tests start real launchers (torchrun, DeepSpeed's) on
``tests/dist_scripts/tp_logits.py``, which compares sharded logits with the unsharded model's.
"""

import glob
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from dist_scripts.tp_logits import TINY, build_tiny_model, run_logits

from chatglm_bench import UsageError
from chatglm_bench.distributed import (
    DistEnv,
    backend_for,
    detect_env,
    gather_per_rank,
    init_distributed,
    kv_groups_for,
    patch_torchair_for_hcom,
    rank_param_bytes,
    replicate_kv_groups,
    shard_model,
)

SCRIPT = REPO / "tests" / "dist_scripts" / "tp_logits.py"
LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
HEADS, GROUPS, HEAD_DIM = TINY["num_attention_heads"], TINY["multi_query_group_num"], TINY["kv_channels"]
VOCAB = TINY["padded_vocab_size"]


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- launch environment and backends ----------------------------------------------------------


def test_plain_python_is_rank_zero_of_one(no_launcher):
    env = detect_env()
    assert (env.rank, env.local_rank, env.world_size, env.is_rank0) == (0, 0, 1, True)


@pytest.mark.parametrize("local_size_var", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])  # torchrun, deepspeed
def test_launcher_variables_give_rank_and_node_size(no_launcher, local_size_var):
    for name, value in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", local_size_var: "4"}.items():
        no_launcher.setenv(name, value)
    env = detect_env()
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert not env.is_rank0


@pytest.mark.parametrize(
    "variables", [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "0"}]
)
def test_inconsistent_launch_variables_are_usage_errors(no_launcher, variables):
    for name, value in variables.items():
        no_launcher.setenv(name, value)
    with pytest.raises(UsageError, match="WORLD_SIZE"):
        detect_env()


@pytest.mark.parametrize(("device", "backend"), [("npu", "hccl"), ("cuda", "nccl"), ("cpu", "gloo")])
def test_each_device_uses_its_collective_library(device, backend):
    assert backend_for(device) == backend


def test_unknown_device_is_a_usage_error():
    with pytest.raises(UsageError, match="npu, cuda, cpu"):
        backend_for("tpu")


def test_single_cpu_process_opens_no_process_group():
    env = init_distributed(DistEnv(), "cpu")
    assert (env.backend, env.device) == (None, "cpu")
    assert not torch.distributed.is_initialized()


def test_more_ranks_than_gpus_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    env = DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2)
    with pytest.raises(UsageError, match="--num_gpus=1"):
        init_distributed(env, "cuda")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_npu_without_torch_npu_is_a_usage_error():
    with pytest.raises(UsageError, match="torch_npu"):
        init_distributed(DistEnv(), "npu")


def test_one_rank_gathers_its_own_value_and_counts_all_parameter_bytes():
    model = build_tiny_model()
    assert gather_per_rank(7, DistEnv()) == [7]
    assert rank_param_bytes(model) == 4 * sum(p.numel() for p in model.parameters())


# --- tensor-parallel plan ---------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "groups"), [(1, 2), (2, 2), (4, 4), (8, 8), (32, 32)])
def test_chatglm3_kv_groups_per_tensor_parallel_size(tp, groups):
    assert kv_groups_for(32, 2, tp) == groups


@pytest.mark.parametrize("tp", [3, 6, 64])
def test_impossible_tensor_parallel_size_names_the_valid_ones(tp):
    with pytest.raises(UsageError, match=r"\[1, 2, 4, 8, 16, 32\]"):
        kv_groups_for(32, 2, tp)


@pytest.mark.parametrize("groups", [4, 8])
def test_replicated_kv_groups_compute_the_same_logits(groups):
    model = build_tiny_model()
    reference = {kind: run_logits(model, kind) for kind in ("tuple", "static")}
    original_k = (
        model.transformer.encoder.layers[0]
        .self_attention.query_key_value.weight[HEADS * HEAD_DIM : (HEADS + GROUPS) * HEAD_DIM]
        .clone()
    )

    replicate_kv_groups(model, groups)

    assert model.config.multi_query_group_num == groups
    rows = (HEADS + 2 * groups) * HEAD_DIM
    for layer in model.transformer.encoder.layers:
        attention = layer.self_attention
        assert attention.num_multi_query_groups_per_partition == groups
        assert attention.query_key_value.weight.shape == (rows, TINY["hidden_size"])
        assert attention.query_key_value.bias.shape == (rows,)
    new_k = model.transformer.encoder.layers[0].self_attention.query_key_value.weight[
        HEADS * HEAD_DIM : (HEADS + groups) * HEAD_DIM
    ]
    copies = groups // GROUPS
    for j in range(groups):  # new group j is a copy of old group j // copies
        old = j // copies
        torch.testing.assert_close(
            new_k[j * HEAD_DIM : (j + 1) * HEAD_DIM], original_k[old * HEAD_DIM : (old + 1) * HEAD_DIM]
        )
    for kind, logits in reference.items():
        # Same math; only the attention kernel's summation order differs (fp32, |logits| ~ 4).
        assert (run_logits(model, kind) - logits).abs().max().item() <= 1e-5, kind


def test_quantize_refuses_a_sharded_model_by_the_layer_it_found():
    import modeling_chatglm

    model = build_tiny_model()
    attention = model.transformer.encoder.layers[0].self_attention
    dense = attention.dense
    # As after sharding: the row-parallel projection is a ShardedLinear (still an nn.Linear).
    attention.dense = modeling_chatglm.ShardedLinear(dense.weight.detach(), None, lambda y: y)
    with pytest.raises(TypeError, match=r"ShardedLinear at self_attention\.dense.*one rank"):
        model.quantize(8)
    assert model.transformer.encoder.layers[0].self_attention.query_key_value.weight.dtype == torch.float32


def test_kv_groups_that_do_not_divide_the_heads_are_refused():
    with pytest.raises(UsageError, match="cannot turn 2 KV groups into 3"):
        replicate_kv_groups(build_tiny_model(), 3)


def test_one_rank_keeps_the_model_untouched():
    model = build_tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert shard_model(model, DistEnv(), torch.float32) is model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_impossible_rank_count_is_refused_before_touching_the_model():
    model = build_tiny_model()
    with pytest.raises(UsageError, match=r"\[1, 2, 4, 8\]"):
        shard_model(model, DistEnv(world_size=3, local_world_size=3), torch.float32)
    assert model.config.multi_query_group_num == GROUPS


def test_missing_deepspeed_is_a_usage_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    for name, value in {"DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)  # what shard_model would set, restored afterwards
    with pytest.raises(UsageError, match="pip install --no-build-isolation deepspeed"):
        shard_model(build_tiny_model(), DistEnv(world_size=2, local_world_size=2), torch.float32)


# --- real launchers, several processes ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftover_shm(port: str) -> list:
    """DeepSpeed's CPU all-reduce files of the launch on ``port`` still in /dev/shm."""
    return sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"))


def _launch(launcher: str, ranks: int, out: Path) -> str:
    port = str(_free_port())
    if launcher == "torchrun":
        prefix = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            f"--master_port={port}",
        ]
    else:
        deepspeed_cli = Path(sys.executable).with_name("deepspeed")
        prefix = [str(deepspeed_cli), "--num_accelerators", str(ranks), "--master_port", port]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # A crash says where it happened (Python frames of every thread) in the output we assert on.
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONFAULTHANDLER="1")
    done = subprocess.run(
        [*prefix, str(SCRIPT), "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert _leftover_shm(port) == [], "each rank must unlink its all-reduce segment"
    return output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "ranks"),
    [
        ("torchrun", 2),  # DeepSpeed splits the fused QKV (2 KV groups, 1 per rank)
        ("torchrun", 4),  # groups replicated to 4, QKV cut by us, the rest by AutoTP
        ("deepspeed", 2),  # the user's launcher: LOCAL_SIZE set, --local_rank=N in argv
    ],
)
def test_tensor_parallel_logits_match_one_rank(tmp_path, launcher, ranks):
    out = tmp_path / "result.json"
    output = _launch(launcher, ranks, out)
    result = json.loads(out.read_text())

    assert result["world_size"] == ranks and result["backend"] == "gloo"
    assert output.count("per-rank parameter bytes:") == 1, "only rank 0 may print"
    assert output.count("AutoTP:") == 2, "only rank 0 may print (the script shards two models)"
    for rank, report in enumerate(result["ranks"]):
        assert report["rank"] == rank
        assert max(report["max_abs_diff"].values()) <= 1e-5, report
        # The model's own layer types run the shards (the one-row kernels apply to them), and the
        # output layer is split by vocabulary rows, not kept whole on every rank.
        assert report["layer_types"] == {
            "query_key_value": "Linear",
            "dense": "ShardedLinear",
            "dense_h_to_4h": "Linear",
            "dense_4h_to_h": "ShardedLinear",
            "output_layer": "ShardedLinear",
        }, report
        assert report["output_rows"] == VOCAB // ranks, report
        # bf16 through the gemv kernel: the row-parallel sums round differently, nothing more.
        assert report["bf16_max_abs_diff"] <= 0.05 * report["bf16_max_abs_logit"], report
        assert (report["heads"], report["kv_groups"]) == (HEADS // ranks, 1)
        # Layers really split: about 1/N each (norms and the replicated KV group stay whole).
        assert report["layer_bytes"] <= 1.1 * result["full_layer_bytes"] / ranks, report
        assert report["param_bytes"] < result["full_param_bytes"], report
        if launcher == "deepspeed":
            assert report["local_rank_arg"] == rank


@pytest.mark.slow
def test_benchmark_under_the_deepspeed_launcher_prints_once_with_per_rank_bytes(tmp_path):
    """The user's command shape, `deepspeed --num_accelerators 2 benchmark_chatglm.py ...`, on CPU."""
    out = tmp_path / "bench.json"
    port = str(_free_port())
    deepspeed_cli = Path(sys.executable).with_name("deepspeed")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # A crash says where it happened (Python frames of every thread) in the output we assert on.
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONFAULTHANDLER="1")
    argv = [
        str(deepspeed_cli),
        "--num_accelerators",
        "2",
        "--master_port",
        port,
        str(REPO / "benchmark_chatglm.py"),
        "--preset",
        "tiny",
        "--input_max_len",
        "16",
        "--max_new_tokens",
        "4",
        "--iters",
        "1",
        "--execute_mode",
        "eager",
        "--output",
        str(out),
    ]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert _leftover_shm(port) == [], "each rank must unlink its all-reduce segment"
    assert output.count("parameter bytes per rank:") == 1 and output.count("| batch | prompt | mode") == 1, (
        output[-3000:]
    )
    payload = json.loads(out.read_text())
    assert payload["environment"]["world_size"] == 2
    per_rank = payload["parameter_bytes_per_rank"]
    assert payload["results"][0]["batch_size"] == 1 and len(per_rank) == 2
    # The tiny preset's float32 weights, one copy; each rank must hold clearly less.
    from chatglm_bench.presets import preset_params

    assert max(per_rank) < 0.8 * 4 * preset_params("tiny"), per_rank
    # Each rank's prefill FLOPs count its shards of the layers AutoTP replaced: about half of one
    # rank's whole model (the replicated head and norms aside), not only the untouched layers.
    from chatglm_bench.measure import model_facts, prefill_flops
    from chatglm_bench.presets import build_preset_model

    whole = prefill_flops(model_facts(build_preset_model("tiny", torch.float32, 0, context=32)), 1, 16)
    assert 0.4 * whole < payload["results"][0]["prefill_flops"] < 0.75 * whole, (payload["results"][0], whole)


# --- torchair and HCCL collectives in graph mode ---------------------------------------------


class RecordingTorchair:
    """Test data standing in for the torchair module: it only records that it was asked to patch."""

    def __init__(self):
        self.calls = 0

    def patch_for_hcom(self):
        self.calls += 1


GRAPH = {"exe_mode": "dynamo", "graph_backend": "auto"}
EAGER = {"exe_mode": "eager", "graph_backend": "auto"}


@pytest.mark.parametrize(
    "world_size, device, plan, patched",
    [
        (2, "npu", [GRAPH], True),
        (8, "npu", [EAGER, dict(GRAPH, graph_backend="torchair")], True),
        (1, "npu", [GRAPH], False),  # no tensor parallelism, no collectives in the graph
        (2, "npu", [EAGER], False),
        (2, "npu", [dict(GRAPH, graph_backend="inductor")], False),
        (2, "cuda", [GRAPH], False),
        (2, "cpu", [GRAPH], False),
    ],
)
def test_torchair_is_patched_for_hcom_only_for_tensor_parallel_npu_graphs(world_size, device, plan, patched):
    torchair = RecordingTorchair()
    env = DistEnv(world_size=world_size, local_world_size=world_size)
    assert patch_torchair_for_hcom(env, device, plan, torchair=torchair) is patched
    assert torchair.calls == int(patched)


def test_torchair_patch_off_npu_needs_no_torchair():
    # Off-NPU the decision is made before any import: no torchair module, no error.
    assert patch_torchair_for_hcom(DistEnv(world_size=2, local_world_size=2), "cpu", [GRAPH]) is False


def test_cpu_ranks_on_one_node_split_the_cores_evenly():
    from chatglm_bench.distributed import cpu_share

    cores = list(range(8))
    assert [cpu_share(cores, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [cpu_share(cores, r, 3) for r in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [cpu_share([0, 1], r, 4) for r in range(4)] == [[0], [1], [0], [1]]
    assert cpu_share([5], 0, 1) == [5]


_SPLIT_SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
from chatglm_bench.distributed import DistEnv, split_cpu_cores
cores = sorted(os.sched_getaffinity(0))
threads = split_cpu_cores(DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2))
print(len(cores), threads, torch.get_num_threads(), sorted(os.sched_getaffinity(0)) == cores[len(cores) // 2:] if len(cores) > 1 else True)
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity API on this OS")
def test_a_cpu_rank_is_pinned_to_its_share_with_as_many_threads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run(
        [sys.executable, "-c", _SPLIT_SCRIPT, str(REPO)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    cores, threads, torch_threads, pinned = result.stdout.split()
    assert int(threads) == int(torch_threads) == max(1, int(cores) // 2) and pinned == "True"


_END_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import atexit
from chatglm_bench import distributed
atexit.register(lambda: print("teardown ran"))
distributed._opened_group = sys.argv[2] == "opened"
print("results", end="")  # still in the pipe's buffer
distributed.end_process(3)
"""


@pytest.mark.parametrize("group", ["opened", "none"])
def test_end_process_keeps_the_code_and_the_output_and_skips_teardown_after_a_group(group):
    """A multi-rank process ends at once (no interpreter teardown: the SIGABRT/SIGBUS at exit),
    yet its buffered output and exit code survive; a single process exits the normal way."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a buffered pipe
    result = subprocess.run(
        [sys.executable, "-c", _END_SCRIPT, str(REPO), group],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.startswith("results"), result.stdout
    assert ("teardown ran" in result.stdout) == (group == "none"), result.stdout
