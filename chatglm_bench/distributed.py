"""Ranks, backends and tensor-parallel sharding for ``benchmark_chatglm.py``.

Launchers (``deepspeed --num_gpus N``, ``deepspeed --num_accelerators N``, ``torchrun``) describe
each process through environment variables; :func:`detect_env` reads them and
:func:`init_distributed` opens the process group on the device's own collective library.
:func:`shard_model` then splits the model with DeepSpeed AutoTP (``deepspeed.init_inference``).

chatglm3 has 32 query heads reading only 2 KV groups. AutoTP cuts attention in KV-group units,
so past 2 ranks some ranks would get no heads at all. We first repeat the KV groups until every
rank can own one (:func:`replicate_kv_groups`: the same model, more KV rows), and where
DeepSpeed's fused-QKV split does not understand the result we cut ``query_key_value`` for this
rank ourselves and let AutoTP shard everything else (see :func:`shard_model`).
"""

import contextlib
import datetime
import io
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, List, NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chatglm_bench import UsageError

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
TIMEOUT_VAR = "CHATGLM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
DEEPSPEED_INSTALL_HINT = "pip install --no-build-isolation deepspeed"


class RendezvousError(UsageError):
    """This rank could not meet the others: each rank says so itself (other errors: rank 0 only)."""

    every_rank = True


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the launch, and (after :func:`init_distributed`) what it runs on.

    ``backend`` is the process group's backend, ``None`` for a single process; ``device`` is the
    torch device string of this rank (``"cuda:3"``, ``"npu:0"``, ``"cpu"``)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: Optional[str] = None
    device: str = "cpu"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(
            f"environment variable {name}={value!r} is not an integer; unset it or fix the launcher"
        ) from None


def detect_env() -> DistEnv:
    """Read the launcher's variables; a plain ``python benchmark_chatglm.py`` is rank 0 of 1.

    DeepSpeed's launcher also appends ``--local_rank=N`` to argv: the CLI accepts and ignores it,
    since ``LOCAL_RANK`` carries the same number."""
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    rank = _env_int("RANK", local_rank)
    # torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE: ranks on this node.
    local_world_size = _env_int("LOCAL_WORLD_SIZE", _env_int("LOCAL_SIZE", world_size))
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise UsageError(
            f"inconsistent launch: RANK={rank} LOCAL_RANK={local_rank} WORLD_SIZE={world_size} "
            f"LOCAL_WORLD_SIZE={local_world_size}; start through deepspeed or torchrun"
        )
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world_size)


def backend_for(device_kind: str) -> str:
    """The collective library of a device type: hccl on Ascend NPUs, nccl on CUDA, gloo on CPU.

    (DeepSpeed alone would take oneCCL on CPU when it is installed; gloo needs nothing extra.)"""
    try:
        return BACKENDS[device_kind]
    except KeyError:
        raise UsageError(f"unknown device {device_kind!r}; use one of: {', '.join(BACKENDS)}") from None


def visible_devices(device_kind: str) -> Optional[int]:
    """Accelerators of ``device_kind`` this process can see; ``None`` for the CPU (no limit)."""
    if device_kind == "cpu":
        return None
    if device_kind == "npu":
        # The model file's import of torch_npu (when present) registers torch.npu and hccl.
        from modeling_chatglm import torch_npu_present

        if not torch_npu_present():
            raise UsageError(
                "--device npu needs torch_npu (pip install -r requirements-npu.txt, with the CANN toolkit)"
            )
    return getattr(torch, device_kind).device_count()


def cpu_share(cores: List[int], local_rank: int, local_world_size: int) -> List[int]:
    """The cores of rank ``local_rank`` when ``local_world_size`` ranks split ``cores`` evenly
    (contiguous slices; with more ranks than cores, ranks share a core round-robin)."""
    n = len(cores)
    if local_world_size >= n:
        return [cores[local_rank % n]]
    return cores[local_rank * n // local_world_size : (local_rank + 1) * n // local_world_size]


def split_cpu_cores(env: DistEnv) -> int:
    """On a CPU, several ranks on one node each get their share of the cores (what DeepSpeed's
    ``--bind_cores_to_rank`` intends): pinned to it, with as many torch threads (fewer when
    OMP_NUM_THREADS asks so). Without this every rank runs a thread per core and they thrash
    (TP 2 decode was 78x slower than one rank). Returns this rank's thread count."""
    if env.local_world_size > 1 and hasattr(os, "sched_getaffinity"):
        share = cpu_share(sorted(os.sched_getaffinity(0)), env.local_rank, env.local_world_size)
        os.sched_setaffinity(0, share)
        threads = len(share)
        asked = os.environ.get("OMP_NUM_THREADS", "").strip()
        if asked.isdigit() and int(asked) > 0:
            threads = min(threads, int(asked))
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def init_distributed(env: DistEnv, device_kind: str) -> DistEnv:
    """Bind this rank to its device (on a CPU: to its share of the cores) and, for several
    ranks, open the process group.

    Returns ``env`` with ``backend`` and ``device`` filled in."""
    backend = backend_for(device_kind)
    count = visible_devices(device_kind)
    if device_kind == "cpu":
        split_cpu_cores(env)
    device = torch.device("cpu")
    if count is not None:
        if env.local_world_size > count:
            raise UsageError(
                f"{env.local_world_size} rank(s) on this node but {count} {device_kind} device(s) visible; "
                f"launch at most {count} (deepspeed --num_gpus={count}) or pick another --device"
            )
        device = torch.device(device_kind, env.local_rank)
        getattr(torch, device_kind).set_device(device)
    if env.world_size == 1:
        return replace(env, backend=None, device=str(device))
    if not dist.is_initialized():
        _rendezvous(env, backend)
    return replace(env, backend=dist.get_backend(), device=str(device))


_opened_group = False  # whether this process opened a process group (see end_process)


def close_distributed() -> None:
    """Close this rank's process group, once every rank is done: a rank that exits with its
    communication threads still alive can abort at interpreter exit ("terminate called without
    an active exception", SIGABRT), seen under load at 4 CPU ranks."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """Exit with ``code``; a process that opened a process group skips the interpreter's teardown.

    Closing the group (:func:`close_distributed`) is not enough: under load about 1 CPU
    tensor-parallel run in 12 still died after its last line of Python, while the interpreter
    tore down torch and DeepSpeed (rank 0 "terminate called without an active exception",
    SIGABRT; rank 1 SIGBUS; no Python frame on either), so a run that had written its results
    exited 134. Everything this project writes is closed by then and it registers no exit
    handlers, so the streams are flushed and the process ends at once."""
    if not _opened_group:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (| head) must not change the code
            stream.flush()
    logging.shutdown()
    os._exit(code)


def launch_hint(world_size: int) -> str:
    return (
        f"start the {world_size} ranks with a launcher: deepspeed --num_gpus {world_size} "
        f"benchmark_chatglm.py ... (or torchrun --nproc_per_node {world_size} benchmark_chatglm.py ...), "
        "or unset WORLD_SIZE and RANK for one process"
    )


def rendezvous_timeout() -> float:
    """Seconds a rank waits for the others (``CHATGLM_DIST_TIMEOUT``, default 600): never forever.
    torch uses the same bound for each collective of the run."""
    value = os.environ.get(TIMEOUT_VAR, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or math.isinf(seconds):
        raise UsageError(f"{TIMEOUT_VAR}={value!r} is not a positive number of seconds; unset it or fix it")
    return seconds


def _listening(addr: str, port: str, seconds: float) -> bool:
    """Whether something accepts connections at addr:port before ``seconds`` have passed."""
    try:
        port_number = int(port)
    except ValueError:
        raise UsageError(f"MASTER_PORT={port!r} is not a port number; fix the launcher settings") from None
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((addr, port_number), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _rendezvous(env: DistEnv, backend: str) -> None:
    # Every launcher sets these; without them torch fails deep inside its env:// handler, and
    # with only MASTER_ADDR it waits for ranks that nobody started.
    missing = [
        name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name, "").strip()
    ]
    if missing:
        raise UsageError(
            f"WORLD_SIZE={env.world_size} but {'/'.join(missing)} not set; {launch_hint(env.world_size)}"
        )
    seconds = rendezvous_timeout()
    addr, port = os.environ["MASTER_ADDR"].strip(), os.environ["MASTER_PORT"].strip()
    where = f"{addr}:{port}"
    if env.rank != 0 and not _listening(addr, port, seconds):
        # Checked with a plain socket first: torch's own client would fill stderr with C++
        # retry logs and stack frames before giving up.
        raise RendezvousError(
            f"rank {env.rank} found nothing listening at {where} within {seconds:g} s (rank 0 never "
            f"started); {launch_hint(env.world_size)}; {TIMEOUT_VAR} sets the wait"
        )
    global _opened_group
    try:
        _opened_group = True  # set first: a half-opened group has threads to tear down too
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=seconds),
        )
    except (RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RendezvousError(
            f"rank {env.rank} could not meet the other {env.world_size - 1} rank(s) at {where} within "
            f"{seconds:g} s ({reason}); {launch_hint(env.world_size)}; {TIMEOUT_VAR} sets the wait"
        ) from None


def uses_torchair_graphs(device_kind: str, plan_options: List[dict]) -> bool:
    """Whether any configuration of a run compiles with torchair: graph mode on an NPU with the
    ``torchair`` backend (``auto`` picks it there)."""
    return device_kind == "npu" and any(
        options.get("exe_mode") == "dynamo"
        and str(options.get("graph_backend", "auto")) in ("auto", "torchair")
        for options in plan_options
    )


def patch_torchair_for_hcom(env: DistEnv, device_kind: str, plan_options: List[dict], torchair=None) -> bool:
    """Call ``torchair.patch_for_hcom()`` when tensor-parallel graphs will hold collectives.

    torchair's docs ask for it whenever a torchair-compiled graph contains HCCL collectives (the
    all-reduces AutoTP inserts), and torch < 2.3.1 cannot capture them without it. Only on an NPU,
    with several ranks, in graph mode with the torchair backend; anywhere else it does nothing.
    ``torchair`` is the module to use (imported here when ``None``). Returns whether it patched."""
    if env.world_size == 1 or not uses_torchair_graphs(device_kind, plan_options):
        return False
    if torchair is None:
        try:
            import torch_npu  # noqa: F401  (torchair needs it imported first)
            import torchair
        except ImportError:
            raise UsageError(
                "graph mode on NPU needs torchair (shipped with torch_npu); reinstall torch_npu or "
                "pass --graph_backend eager"
            ) from None
    torchair.patch_for_hcom()
    return True


def rank_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (after sharding: its shard plus replicated ones)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gather_per_rank(value: Any, env: DistEnv) -> List[Any]:
    """``value`` from every rank, in rank order (a collective: every rank must call it)."""
    if env.world_size == 1:
        return [value]
    values: List[Any] = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


# ---------------------------------------------------------------------------------------------
# Tensor parallelism
# ---------------------------------------------------------------------------------------------


def _attention_layers(model: nn.Module) -> List[nn.Module]:
    # By duck type: a model loaded as remote code has its own copy of the SelfAttention class.
    return [
        m
        for m in model.modules()
        if hasattr(m, "query_key_value") and hasattr(m, "num_multi_query_groups_per_partition")
    ]


def valid_tp_sizes(heads: int, groups: int) -> List[int]:
    """Rank counts that give every rank whole query heads plus the whole KV groups they read."""
    return [n for n in range(1, heads + 1) if heads % (groups * n // math.gcd(groups, n)) == 0]


def kv_groups_for(heads: int, groups: int, tp_size: int) -> int:
    """KV groups the model needs so that each of ``tp_size`` ranks owns whole groups.

    ``lcm(groups, tp_size)``: chatglm3 (32 heads, 2 groups) keeps 2 groups for 1-2 ranks and
    needs 4 for 4 ranks, 8 for 8 ranks, each a copy of the original group its heads read."""
    sizes = valid_tp_sizes(heads, groups)
    if tp_size not in sizes:
        raise UsageError(
            f"{tp_size} ranks cannot share {heads} query heads in {groups} KV groups; "
            f"use a tensor parallel size in {sizes}"
        )
    return groups * tp_size // math.gcd(groups, tp_size)


def _split_qkv(tensor: torch.Tensor, heads: int, groups: int, head_dim: int):
    # Rows of query_key_value (weight [rows, hidden] or bias [rows]): [q | k | v].
    return tensor.split([heads * head_dim, groups * head_dim, groups * head_dim], dim=0)


def replicate_kv_groups(model: nn.Module, groups: int) -> None:
    """Give every attention layer ``groups`` KV groups (``SelfAttention.replicate_kv_groups``, the
    model's own tensor-parallel contract), and update ``config.multi_query_group_num``, which
    DeepSpeed AutoTP reads as the KV-head count that sets its split unit. Call before sharding."""
    config = model.config
    if not getattr(config, "multi_query_attention", False):
        raise UsageError("KV groups exist only in multi-query checkpoints (chatglm2/chatglm3)")
    old = config.multi_query_group_num
    heads = config.num_attention_heads
    if groups % old or heads % groups:
        raise UsageError(f"cannot turn {old} KV groups into {groups} for {heads} query heads")
    for attention in _attention_layers(model):
        if (
            attention.num_multi_query_groups_per_partition != old
            or attention.num_attention_heads_per_partition != heads
        ):
            raise ValueError("replicate_kv_groups() needs the unsharded model; call it before shard_model()")
        attention.replicate_kv_groups(groups)
    config.multi_query_group_num = groups


def _autotp_splits_qkv(config, groups: int) -> bool:
    # DeepSpeed's fused-QKV split for GLM blocks (fusedqkv_utils.prepare_tp_fused_qkvw and
    # fused_qkv_subparam_sizes, 'glmtype') knows grouped KV only for exactly 2 groups, taking
    # the query rows as hidden_size; any other count it cuts into three equal thirds.
    return groups == 2 and config.hidden_size == config.num_attention_heads * config.kv_channels


class _RankQKV(nn.Module):
    """This rank's rows of ``query_key_value`` while AutoTP runs. Not an ``nn.Linear``, so AutoTP
    leaves it alone; :func:`shard_model` turns it back into one afterwards."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features = linear.in_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.weight.shape[0], bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def _cut_qkv_for_rank(attention: nn.Module, heads: int, groups: int, rank: int, tp_size: int) -> None:
    # The split AutoTP applies to every other tensor-parallel weight, per sub-parameter: rank r
    # keeps the r-th of tp_size equal parts of q, of k and of v (heads, then KV groups, in order).
    linear = attention.query_key_value
    d = attention.hidden_size_per_attention_head
    parts = []
    for param in (linear.weight, linear.bias):
        if param is None:
            parts.append(None)
            continue
        pieces = [t.chunk(tp_size)[rank] for t in _split_qkv(param.detach(), heads, groups, d)]
        parts.append(torch.cat(pieces))
    attention.query_key_value = _RankQKV(linear, *parts)


def shard_model(model: nn.Module, env: DistEnv, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Split ``model`` over the ``env.world_size`` ranks with DeepSpeed AutoTP; returns the
    module to run (the same object, sharded in place). One rank: the model, untouched.

    AutoTP cuts ``self_attention.dense`` (row-parallel, all-reduce), the SwiGLU
    ``dense_h_to_4h`` (gate and up halves apart) and ``dense_4h_to_h`` (row-parallel), and
    divides the per-rank head counts the forward reads; embedding and norms stay whole on every
    rank, and we split the output layer by vocabulary rows (:func:`_adopt_shards`, which also
    turns AutoTP's layers into the model's own layer types). Its KV-group unit is
    ``config.multi_query_group_num``, so we first repeat KV groups until every rank owns one. DeepSpeed splits the fused ``query_key_value``
    itself for 2 groups (1-2 ranks); for more groups we cut it for this rank the same way,
    q, k and v each into equal parts, and hide it from AutoTP while it runs."""
    if env.world_size == 1:
        return model
    config = model.config
    if getattr(config, "pre_seq_len", None) is not None:
        raise UsageError(
            "a P-tuning prefix (pre_seq_len) is not supported with tensor parallelism; run on 1 rank"
        )
    if not getattr(config, "multi_query_attention", False):
        raise UsageError("tensor parallelism supports multi-query checkpoints (chatglm2/chatglm3) only")
    heads, groups = config.num_attention_heads, config.multi_query_group_num
    tp_groups = kv_groups_for(heads, groups, env.world_size)
    dtype = dtype or next(model.parameters()).dtype
    deepspeed = _import_deepspeed(env)

    if tp_groups != groups:
        replicate_kv_groups(model, tp_groups)
    own_qkv = not _autotp_splits_qkv(config, tp_groups)
    if own_qkv:
        for attention in _attention_layers(model):
            _cut_qkv_for_rank(attention, heads, tp_groups, env.rank, env.world_size)
    # init_inference prints on every rank ("AutoTP: ...", op builds); only rank 0 may print.
    quiet = contextlib.nullcontext() if env.is_rank0 else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        engine = deepspeed.init_inference(
            model, tensor_parallel={"tp_size": env.world_size}, dtype=dtype, replace_with_kernel_inject=False
        )
    release_shm_names(env)
    module = engine.module
    for attention in _attention_layers(module):
        if own_qkv:
            attention.query_key_value = attention.query_key_value.to_linear()
        _check_rank_shapes(attention, heads // env.world_size, tp_groups // env.world_size)
    _adopt_shards(module, env, deepspeed)
    return module


def _summed(all_reduce, group, bias: Optional[torch.Tensor]):
    # A layer split along its input: the ranks' partial products add up to the output (in
    # place, as AutoTP's own row-parallel layer does), then the whole bias once.
    def combine(y: torch.Tensor) -> torch.Tensor:
        y = y.contiguous()
        all_reduce(y, group=group)
        return y if bias is None else y + bias

    return combine


def _gathered(all_reduce, group, start: int, rows: int):
    # A layer split along its output: each rank writes its columns of the output into zeros and
    # the ranks' outputs are summed, which leaves every value exactly as its rank computed it
    # (x + 0 = x) in one shared-memory all-reduce (gloo's all_gather took 351 us against 4).
    def combine(y: torch.Tensor) -> torch.Tensor:
        whole = y.new_zeros(*y.shape[:-1], rows)
        whole[..., start : start + y.shape[-1]] = y
        all_reduce(whole, group=group)
        return whole

    return combine


def _autotp_layer(layer: nn.Module, cls) -> bool:
    # ``layer`` is an instance of AutoTP's ``cls`` that runs that class's own forward (no
    # subclass that computes something else).
    return cls is not None and isinstance(layer, cls) and type(layer).forward is cls.forward


def _adopt_shards(model: nn.Module, env: DistEnv, deepspeed) -> None:
    """Hand AutoTP's split projections back to the model as its own layer types, and split the
    output layer by vocabulary rows, which AutoTP leaves whole on every rank (it knows it only
    by the names ``lm_head`` / ``embed_out``).

    AutoTP's layers run their own ``F.linear`` (oneDNN's GEMM), so the model's one-row kernels
    (``linear_backend`` gemv / dot) skipped them; and the whole output layer on every rank was a
    third of a TP 2 decode step on the default preset (2-core Xeon, one thread per rank: the
    vocabulary's mv 3.1 ms of 9.0). A column-parallel layer becomes an ``nn.Linear`` over its
    rows (it needs no collective); a row-parallel one, and the output layer, the model's
    ``ShardedLinear`` with the collective as its ``combine``. ``all_reduce(tensor, group=...)``
    sums in place (DeepSpeed's ``inference_all_reduce``: shared memory on a CPU node). Layers
    of any other class are left as they are."""
    sharded_linear = getattr(sys.modules[type(model).__module__], "ShardedLinear", None)
    layers = sys.modules.get("deepspeed.module_inject.layers")
    if sharded_linear is None or layers is None:  # AutoTP's layers as they are
        return
    column = getattr(layers, "LinearLayer", None)
    row = getattr(layers, "LinearAllreduce", None)
    all_reduce = deepspeed.comm.inference_all_reduce
    for parent in list(model.transformer.encoder.layers.modules()):
        for name, layer in list(parent.named_children()):
            column_parallel = _autotp_layer(layer, column) and not getattr(layer, "gather_output", False)
            if not column_parallel and not _autotp_layer(layer, row):
                continue
            weight = layer.weight.detach()
            bias = None if layer.bias is None else layer.bias.detach()
            if column_parallel:
                plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
                plain.weight = nn.Parameter(weight, requires_grad=False)
                plain.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
                setattr(parent, name, plain)
            else:
                group = getattr(layer, "mp_group", None)
                setattr(parent, name, sharded_linear(weight, None, _summed(all_reduce, group, bias)))
    head = model.transformer.output_layer
    rows = head.weight.shape[0]
    if type(head) is not nn.Linear or rows % env.world_size:
        return
    share = rows // env.world_size
    start = env.rank * share
    weight = head.weight.detach()[start : start + share].clone()
    bias = None if head.bias is None else head.bias.detach()[start : start + share].clone()
    model.transformer.output_layer = sharded_linear(weight, bias, _gathered(all_reduce, None, start, rows))


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's CPU all-reduce: deepspeed/ops/csrc/cpu/comm/shm.cpp


def shm_segment_path(rank: int) -> Optional[str]:
    """The shared-memory file DeepSpeed's CPU all-reduce opened for ``rank`` of this launch
    (named after uid, MASTER_ADDR, MASTER_PORT and rank), or ``None`` when it has none."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not hasattr(os, "getuid"):
        return None
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def release_shm_names(env: DistEnv) -> None:
    """Unlink this rank's DeepSpeed all-reduce segment once every rank has mapped it.

    DeepSpeed creates one ~69 MB file per rank in /dev/shm and never removes it: every CPU
    tensor-parallel run left them behind, RAM that stays taken until reboot (14 GB after a day
    of test runs). After the barrier every rank holds its mappings, which outlive the name, so
    the all-reduce keeps working and nothing is left even if the run is killed later."""
    path = shm_segment_path(env.rank)
    if path is None or torch.device(env.device).type != "cpu":
        return
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _check_rank_shapes(attention: nn.Module, heads: int, groups: int) -> None:
    # Verify, not assume: the head counts the forward will read must match the weights this
    # rank holds (DeepSpeed issues #3688/#3690: chatglm "sharded" while every rank kept it all).
    d = attention.hidden_size_per_attention_head
    got = (
        attention.num_attention_heads_per_partition,
        attention.num_multi_query_groups_per_partition,
        attention.query_key_value.weight.shape[0],
        attention.dense.weight.shape[1],
    )
    want = (heads, groups, (heads + 2 * groups) * d, heads * d)
    if got != want:
        raise RuntimeError(
            "tensor-parallel shapes are off (heads, KV groups, qkv rows, dense columns): "
            f"got {got}, expected {want}; this DeepSpeed version splits chatglm differently"
        )


def _import_deepspeed(env: DistEnv):
    device_type = torch.device(env.device).type
    # DeepSpeed picks its accelerator once, at first use: make it the device we run on (a CUDA
    # machine asked for --device cpu would otherwise move the model to the GPU).
    os.environ.setdefault("DS_ACCELERATOR", device_type)
    # DeepSpeed's CPU all-reduce (a shared-memory kernel) sets itself up only when LOCAL_SIZE
    # equals the world size, yet runs regardless: with LOCAL_SIZE unset it segfaults. Its own
    # launcher sets it; torchrun calls it LOCAL_WORLD_SIZE.
    os.environ.setdefault("LOCAL_SIZE", str(env.local_world_size))
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        raise UsageError(f"tensor parallelism needs DeepSpeed: {DEEPSPEED_INSTALL_HINT}") from None
    picked = get_accelerator().device_name()
    if picked != device_type:
        raise UsageError(
            f"DeepSpeed uses the {picked} accelerator but the model runs on {device_type}; "
            f"set DS_ACCELERATOR={device_type}"
        )
    return deepspeed
