"""The EMA of the fp32 master weights, with the accessors of those masters under each ZeRO stage,
and which buffers of a model are its state (`persistent_buffers`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Fragment:
    """This rank's slice of a parameter's fp32 master weights: `values` is a view into the
    optimizer's flat partition holding `numel` elements from `start` of the flattened parameter."""
    values: torch.Tensor
    start: int
    numel: int
    shape: torch.Size
    owner: bool = True  # False where every rank holds the whole tensor and only rank 0 reports it


def master_fragments(module: nn.Module) -> dict[str, Fragment | None]:
    """The fp32 master weights of `module` (a DeepSpeed engine's module) as this rank holds them:
    ZeRO 1-2 (and DeepSpeed's bf16 optimizer) map each parameter to a fragment of the flat fp32
    partition (`_hp_mapping`); ZeRO-3 partitions each parameter evenly across ranks; ZeRO-0 keeps
    whole fp32 parameters on every rank. None: this rank holds nothing of that parameter. The
    working copy (`param.data`, bf16 under bf16) is never read: an update smaller than one bf16 step
    shows only in the masters."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    fragments: dict[str, Fragment | None] = {}
    for name, p in module.named_parameters():
        if hasattr(p, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_fp32_param
            local = safe_get_local_fp32_param(p)
            start = rank * local.numel()
            numel = max(0, min(local.numel(), p.ds_numel - start))
            fragments[name] = Fragment(local.narrow(0, 0, numel), start, numel, p.ds_shape) if numel else None
        elif hasattr(p, "_hp_mapping"):  # ZeRO 1-2, bf16 optimizer
            mapping = p._hp_mapping
            fragments[name] = None if mapping is None else Fragment(
                mapping.hp_fragment, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel, p.shape)
        else:  # ZeRO-0 (fp32) or no engine: the parameter is its own master
            fragments[name] = Fragment(p.data.view(-1), 0, p.numel(), p.shape, owner=rank == 0)
    return fragments


def gather_fragments(parts: dict[str, Fragment | None], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Whole fp32 tensors from every rank's fragments (a collective: every rank calls it)."""
    full = {}
    for name, shape in shapes.items():
        buffer = torch.zeros(math.prod(shape), dtype=torch.float32, device=_device_of(parts))
        fragment = parts[name]
        if fragment is not None and fragment.owner:
            buffer.narrow(0, fragment.start, fragment.numel).copy_(fragment.values)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buffer)
        full[name] = buffer.view(shape)
    return full


def _device_of(parts: dict[str, Fragment | None]) -> torch.device:
    return next((f.values.device for f in parts.values() if f is not None), torch.device("cpu"))


def full_fp32_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole fp32 master (a collective)."""
    parts = master_fragments(module)
    return gather_fragments(parts, _shapes(module))


def _shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {name: p.ds_shape if hasattr(p, "ds_id") else p.shape for name, p in module.named_parameters()}


def nonfinite_master(module: nn.Module) -> str | None:
    """The first parameter whose fp32 master fragment on this rank is not finite, or None."""
    for name, fragment in master_fragments(module).items():
        if fragment is not None and not torch.isfinite(fragment.values).all():
            return name
    return None


class MasterEma:
    """An fp32 exponential moving average of the fp32 master weights (and the floating buffers).

    Each rank averages only the fragment of the masters it holds (1/world of the model under ZeRO
    1-3), so the per-step cost does not grow with the model on a rank; `state_dict()` gathers the
    whole EMA (a collective) for a checkpoint or an export, and `load_state_dict` takes a whole
    EMA, whatever the number of ranks that saved it. Buffers (BatchNorm statistics) are whole and
    fp32 on every rank."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        parts = master_fragments(module)
        self.shapes = _shapes(module)
        self.fragments = {n: None if f is None else Fragment(f.values.detach().clone(), f.start, f.numel,
                                                             f.shape, f.owner) for n, f in parts.items()}
        self.buffers = {n: b.detach().float().clone() for n, b in persistent_buffers(module) if b.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, fragment in master_fragments(module).items():
            if fragment is not None:
                self.fragments[name].values.lerp_(fragment.values, 1 - self.decay)
        for name, buffer in persistent_buffers(module):
            if name in self.buffers:
                self.buffers[name].lerp_(buffer.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA on CPU (collective)."""
        full = gather_fragments(self.fragments, self.shapes)
        return {**{k: v.cpu() for k, v in full.items()}, **{k: v.cpu() for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, fragment in self.fragments.items():
            if fragment is not None:
                fragment.values.copy_(state[name].reshape(-1).narrow(0, fragment.start, fragment.numel))
        for name, buffer in self.buffers.items():
            buffer.copy_(state[name])


def persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers that are the model's state (BatchNorm statistics and counts), as its
    `state_dict` holds them: what every rank averages, the EMA follows and a universal restore
    puts back. Non-persistent buffers are derived from the architecture and never saved."""
    persistent = module.state_dict().keys()
    return [(n, b) for n, b in module.named_buffers() if n in persistent]


def average_across_ranks(buffers: list[torch.Tensor]) -> None:
    """Average `buffers` in place over the ranks, in one all-reduce. DeepSpeed broadcasts
    parameters, not buffers, so each rank's BatchNorm statistics would follow its own batches;
    averaged (as timm's `distribute_bn` does) after every step, a few hundred thousand floats at
    most (CvT-W24: 134k), every rank validates with, and every checkpoint keeps, the same
    statistics, and a resumed run's statistics stay those of an uninterrupted one."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not buffers or world == 1:
        return
    with torch.no_grad():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
