"""DeepSpeed from the run config: the process group, the batch plan for this world size, the
DeepSpeed config and the optimizer."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from cvtkit.config_loader import ConfigError
from cvtkit.device import backend_for, local_device
from cvtkit.dist import DistEnv
from cvtkit.models.factory import weight_decay_groups

from .run_config import RunConfig


def init_distributed(env: DistEnv, timeout_s: int) -> tuple[torch.device, int, int]:
    """Start the process group; returns (device, rank, world). A single process binds its store to
    port 0, which the system picks (no other rank needs to know it)."""
    import deepspeed
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        env = DistEnv(0, 0, 1, "127.0.0.1", 0, "single")
    env.export()
    device = local_device(env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend=backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the machine's cores; oversubscribed OpenMP threads spin for seconds.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return device, rank, world


def close_distributed() -> None:
    """End the process group after a run that returned: a process that exits while gloo's or
    NCCL's threads still run can abort at exit ("terminate called without an active exception",
    status -6) in place of its own exit code."""
    if dist.is_initialized():
        dist.destroy_process_group()


def batch_plan(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) for the global batch on `world` ranks.

    With `engine.micro_batch` pinned (every recipe pins it), the per-GPU batch and so its memory
    and BatchNorm's batch stay the same on any number of ranks, and accumulation takes up the
    difference: `global = micro x accumulation x world`."""
    global_batch = cfg.data.batch_size
    micro = cfg.engine.micro_batch or global_batch // world
    if micro == 0 or global_batch % (micro * world):
        if cfg.engine.micro_batch and global_batch % cfg.engine.micro_batch == 0:
            per_micro = global_batch // micro
            sizes = [w for w in range(1, per_micro + 1) if per_micro % w == 0]
            raise ConfigError(f"data.batch_size={global_batch} = engine.micro_batch={micro} x accumulation x "
                              f"world size cannot hold on {world} ranks; the world sizes that can: "
                              f"{', '.join(map(str, sizes))}")
        raise ConfigError(f"data.batch_size={global_batch} is not engine.micro_batch={micro} x "
                          f"accumulation x {world} ranks; choose a global batch divisible by "
                          f"{micro * world} or another engine.micro_batch")
    augment = cfg.data.augment
    if augment.kind != "none" and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0) and micro % 2:
        raise ConfigError(f"engine.micro_batch={micro}: Mixup/CutMix pair images, so the per-rank "
                          f"batch must be even")
    return micro, cfg.data.batch_size // (micro * world)


def deepspeed_config(cfg: RunConfig, micro: int, accum: int, universal: bool) -> dict:
    e = cfg.engine
    config = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": e.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "checkpoint": {"load_universal": universal},
    }
    if e.precision == "bf16":
        # A non-finite gradient skips the update, as fp16's loss scaler does.
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        # Without these DeepSpeed reduces and accumulates gradients in the model's dtype.
        config["communication_data_type"] = e.grad_reduce_dtype
        config["data_types"] = {"grad_accum_dtype": e.grad_reduce_dtype}
    elif e.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    return config


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or SGD over the official weight-decay groups."""
    o = cfg.optim
    groups = weight_decay_groups(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **fused)
