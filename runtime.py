"""Where and how the computation runs: the device, autocast precision, batches moved to the device,
torchrun's process group, and a warning when processes x threads oversubscribe the cores. Shared by
training and prediction (prediction never imports train.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch
import torch.distributed as dist

from config import ConfigError


# --------------------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def amp_dtype(amp: str, device: torch.device):
    """Autocast dtype, None = fp32. CUDA: auto = bf16 where supported, else fp16. CPU: bf16 when asked
    (train.amp: bf16); auto stays fp32 on the CPU (measured: docs/benchmarks.md, "Training steps
    (`scripts/bench.py`)"); fp16 is CUDA-only."""
    if amp == "none":
        return None
    if device.type != "cuda":
        if amp == "fp16":
            raise ConfigError("train.amp: fp16 needs CUDA; on the CPU use bf16 or none (auto = fp32 on the CPU)")
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def init_distributed(config) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process, else gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(config.device)
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_oversubscription(processes: int, threads: int, cores: int) -> str | None:
    """A warning saying what to set when `processes` x `threads` (torch intra-op threads per
    process) exceed `cores`; None when they fit."""
    if processes * threads <= cores:
        return None
    per = max(cores // processes, 1)
    fix = f"set OMP_NUM_THREADS={per} (or torch.set_num_threads({per}))"
    if processes > cores:
        fix += f" and run at most {cores} processes"
    return (f"{processes} process(es) x {threads} torch threads = {processes * threads} threads on {cores} available "
            f"core(s): the cores are oversubscribed and training slows down several-fold; {fix}. torchrun sets "
            f"OMP_NUM_THREADS=1 only when it is not already in the environment")


def warn_thread_oversubscription(log: logging.Logger) -> None:
    """Log thread_oversubscription's warning for this machine's processes (LOCAL_WORLD_SIZE under torchrun)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    warning = thread_oversubscription(processes, torch.get_num_threads(), available_cores())
    if warning:
        log.warning(warning)


def check_compiler(device: torch.device) -> None:
    """train.compile: torch.compile must work on this platform (a C++ compiler for the CPU, Triton for CUDA):
    a tiny function is compiled and run once, at start-up; a ConfigError naming the key otherwise."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=True)(torch.ones(3, device=device))
    except Exception as err:  # the compiler's own errors are of many kinds
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"train.compile: true, but torch.compile does not work on this platform ({type(err).__name__}: "
                          f"{first}); set train.compile: false") from None


def shard_model(model) -> None:
    """train.parallel: fsdp: FSDP2 (fully_shard) on every transformer layer, then on the rest of the model, so
    each process holds 1 / world of the weights, gradients and optimiser state, and a layer's weights are
    gathered just for its forward and backward. The layers' fused forwards (packed_forward, padded_forward)
    are registered as forward methods, so FSDP gathers for them as for forward. Each backbone call takes the
    whole batch (no token budget): processes whose windows would fill different numbers of calls would issue
    different numbers of gathers and wait for each other forever."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    model.chunk_tokens = 0  # one backbone call per forward: every process gathers each layer equally often
    for layer in model.backbone.layers:
        fully_shard(layer)
        for name in ("packed_forward", "padded_forward"):
            register_fsdp_forward_method(layer, name)
    fully_shard(model)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """(model state, optimiser state) as a checkpoint stores them: whole tensors whatever the sharding (a
    sharded model gathers them onto the CPU: every process must call this), the optimiser's keyed by parameter
    name, so that any number of processes can resume them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not is_sharded(model):
        return model.state_dict(), None if optimizer is None else get_optimizer_state_dict(model, optimizer)
    return (get_model_state_dict(model, options=options),
            None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=options))


def load_model_full_state(model, state: dict, path) -> None:
    """A checkpoint's whole model state into the model, checked first (model.check_model_state: a ConfigError
    naming the file when it does not fit); sharded, each process takes its part."""
    from model import check_model_state
    check_model_state(model, state, path)
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model, optimizer, state: dict, path) -> None:
    """A checkpoint's optimiser state: keyed by parameter name (this version, any number of processes) or by
    position (earlier checkpoints: unsharded models only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    sharded = is_sharded(model)
    if state["state"] and all(isinstance(k, int) for k in state["state"]) or \
            all(isinstance(p, int) for group in state["param_groups"] for p in group["params"]):
        if sharded:
            raise ConfigError(f"{path}: an optimiser state of an earlier version (parameters by position) cannot be "
                              f"sharded; resume it once with train.parallel: ddp, then continue with fsdp")
        optimizer.load_state_dict(state)
        return
    # strict=False: parameters that have had no gradient yet (the heads during a warm start) have no state
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=sharded, strict=False))


def loader_workers(num_workers, device: torch.device) -> int:
    """data.num_workers; auto: none on the CPU (the cores compute), else up to 4 worker processes that sample
    and collate the next batches while the GPU runs the current one, from this process's share of the cores
    (torchrun's LOCAL_WORLD_SIZE processes share the machine; one core left to each process itself)."""
    if num_workers != "auto":
        return num_workers
    per_process = available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return 0 if device.type != "cuda" else max(0, min(4, per_process - 1))


def average_over_ranks(stats):
    """An epoch's statistics (train.EpochStats) over all processes: losses and the gradient norm averaged, counts
    and work summed; unchanged in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    means = sorted(stats.losses) + (["grad_norm"] if stats.grad_norm is not None else [])
    sums = sorted(stats.fallbacks) + sorted(stats.work) + ["seconds"]
    values = torch.tensor([float(stats.losses.get(k, stats.grad_norm)) for k in means]
                          + [float(stats.fallbacks.get(k, stats.work.get(k, stats.seconds))) for k in sums],
                          dtype=torch.float64)
    dist.all_reduce(values)
    world = dist.get_world_size()
    mean = dict(zip(means, (v / world for v in values[:len(means)].tolist())))
    total = dict(zip(sums, values[len(means):].tolist()))
    return dataclasses.replace(stats, losses={k: mean[k] for k in stats.losses}, grad_norm=mean.get("grad_norm"),
                               fallbacks={k: int(total[k]) for k in stats.fallbacks},
                               work={k: int(total[k]) for k in stats.work}, seconds=total["seconds"] / world)


def build_datasets_once(config, main_process: bool, world: int) -> dict:
    """build_datasets; under torchrun the main process goes first (it may write synthetic data)."""
    from data import build_datasets
    datasets = build_datasets(config) if main_process else None
    if world > 1:
        dist.barrier()
    return datasets if main_process else build_datasets(config)
