"""One training step of a benchmark configuration: parsing `MODEL@RES:bBATCH[:OPT+...]`, building
the model and its step (plain PyTorch or a one-process DeepSpeed engine), timing and profiling
it. `cvtkit.bench.train` runs the table; its docstring explains the options and the figures.
"""
from __future__ import annotations

import contextlib
import fnmatch
import gc
import os
import re
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtkit.device import backend_for
from cvtkit.models import create_model, weight_decay_groups
from cvtkit.models.factory import get_entry
from cvtkit.models.summary import model_macs
from cvtkit.train.loss import soft_target_cross_entropy

_CONFIG_RE = re.compile(r"^(?P<model>[\w.-]+)@(?P<res>\d+):b(?P<batch>\d+)(?::(?P<opts>.*))?$")


@dataclass(frozen=True)
class BenchConfig:
    model: str
    res: int
    batch: int
    attn: str = "sdpa"
    channels_last: bool = False
    compile: str | None = None  # None, "model" or "blocks"
    compile_mode: str | None = None
    ckpt: bool = False
    zero: int | None = None
    dtype: str | None = None  # "bf16" (autocast) or "fp32"; None: --dtype
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> "BenchConfig":
        """`cvt_13@224:b256:sdpa+cl+compile` -> BenchConfig; an unknown option is an error."""
        m = _CONFIG_RE.match(spec.strip())
        if not m:
            raise ValueError(f"config {spec!r}: expected MODEL@RES:bBATCH[:OPT+OPT...]")
        get_entry(m["model"])  # raises on an unknown model, listing the known ones
        kw: dict = dict(model=m["model"], res=int(m["res"]), batch=int(m["batch"]), spec=spec.strip())
        for opt in filter(None, (m["opts"] or "").split("+")):
            key, _, value = opt.partition("=")
            if key in ("ref", "sdpa") and not value:
                kw["attn"] = "reference" if key == "ref" else "sdpa"
            elif key == "cl" and not value:
                kw["channels_last"] = True
            elif key in ("compile", "rcompile"):
                kw["compile"] = "model" if key == "compile" else "blocks"
                kw["compile_mode"] = value or None
            elif key == "ckpt" and not value:
                kw["ckpt"] = True
            elif key in ("zero1", "zero2", "zero3") and not value:
                kw["zero"] = int(key[-1])
            elif key in ("bf16", "fp32") and not value:
                kw["dtype"] = key
            else:
                raise ValueError(f"config {spec!r}: unknown option {opt!r} (options: ref, sdpa, cl, "
                                 "compile[=MODE], rcompile[=MODE], ckpt, zero1|2|3, bf16, fp32)")
        if kw["batch"] < 1 or kw["res"] < 16:
            raise ValueError(f"config {spec!r}: batch must be >= 1 and resolution >= 16")
        if kw.get("zero") and kw.get("dtype") == "fp32":
            raise ValueError(f"config {spec!r}: the ZeRO rows run bf16 parameters; drop fp32")
        return cls(**kw)


@dataclass
class Row:
    cfg: BenchConfig
    status: str = "ok"  # "ok", "OOM" or "error: ..."
    step_ms: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    reserved_gib: float | None = None
    warmup_s: float = 0.0
    macs: float = 0.0  # per image, forward

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def spread_ms(self) -> float:
        if len(self.step_ms) < 2:
            return 0.0
        q = statistics.quantiles(self.step_ms, n=10, method="inclusive")
        return q[8] - q[0]

    @property
    def images_per_s(self) -> float:
        return self.cfg.batch * 1000.0 / self.median_ms

    @property
    def tflops(self) -> float:
        return 6.0 * self.macs * self.images_per_s / 1e12


def model_overrides(cfg: BenchConfig, model_args: dict) -> dict:
    overrides = dict(model_args)
    entry = get_entry(cfg.model)
    if entry.fixed_res and cfg.res != overrides.get("img_size", entry.default_res):
        overrides["img_size"] = cfg.res  # CeiT: the position embedding is built for one size
    return overrides


def _synthetic_batch(cfg: BenchConfig, num_classes: int, device: torch.device, dtype=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.res, cfg.res, generator=g)
    labels = torch.randint(0, num_classes, (cfg.batch,), generator=g)
    target = F.one_hot(labels, num_classes).float() * 0.9 + 0.1 / num_classes  # label smoothing 0.1
    x = x.to(device=device, dtype=dtype or torch.float32)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target.to(device)


def compile_model(model: nn.Module, cfg: BenchConfig) -> nn.Module:
    kw = dict(dynamic=False, mode=cfg.compile_mode)
    if cfg.compile == "model":
        return torch.compile(model, **kw)
    blocks = [b for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and name.endswith("blocks") for b in m]
    # Dynamo guards on each block's drop-path rate (a Python float that ramps from block to block),
    # so with drop_path_rate > 0 every block is its own graph: let all of them compile rather than
    # fall back to eager after the default limit of 8.
    dyn = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    setattr(dyn, limit, max(getattr(dyn, limit), len(blocks) + 8))
    for block in blocks:
        block.compile(**kw)
    return model


_STARTED: dict = {"env": [], "group": False}  # what the ZeRO rows set up, for main() to undo


@contextlib.contextmanager
def zero_teardown():
    """Undo what the ZeRO rows set up (process group, launcher variables), so that a caller's
    process, a test run say, is left as it was."""
    try:
        yield
    finally:
        if _STARTED["group"] and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key in _STARTED["env"]:
            os.environ.pop(key, None)
        _STARTED.update(env=[], group=False)


def _build_step(cfg: BenchConfig, model: nn.Module, num_classes: int, device: torch.device):
    """Returns `step()` that runs one training step on a fixed synthetic batch."""
    if cfg.zero:
        import deepspeed  # imported when a ZeRO row runs: it takes seconds

        if not torch.distributed.is_initialized():
            # A one-process group (its store on port 0: the system picks one); main() takes these
            # variables and the group down at the end.
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
                if key not in os.environ:
                    os.environ[key] = value
                    _STARTED["env"].append(key)
            deepspeed.init_distributed(dist_backend=backend_for(device))
            _STARTED["group"] = True
        config = {"train_micro_batch_size_per_gpu": cfg.batch, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05}},
                  "zero_optimization": {"stage": cfg.zero}, "bf16": {"enabled": True},
                  "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                               model_parameters=weight_decay_groups(model, 0.05))
        x, target = _synthetic_batch(cfg, num_classes, device, torch.bfloat16)

        def step():
            loss = soft_target_cross_entropy(engine(x), target)
            engine.backward(loss)
            engine.step()
        return step, engine

    forward = compile_model(model, cfg) if cfg.compile else model
    opt_kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=1e-4, **opt_kw)
    x, target = _synthetic_batch(cfg, num_classes, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                else contextlib.nullcontext())

    def step():
        with autocast:
            logits = forward(x)
        soft_target_cross_entropy(logits, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, steps: int, device: torch.device) -> list[float]:
    """Milliseconds per step; on CUDA, events between consecutive steps (launch gaps included)."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _profile(step, cfg: BenchConfig, device: torch.device, path: str, steps: int = 3) -> None:
    """Append the top kernels (self time over `steps` steps) of this configuration to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
    with open(path, "a") as f:
        f.write(f"\n## {cfg.spec}: {steps} steps, sorted by {sort}\n\n{table}\n")


def run_config(cfg: BenchConfig, args, device: torch.device) -> Row:
    row = Row(cfg)
    overrides = model_overrides(cfg, args.model_args)
    row.macs = model_macs(cfg.model, cfg.res, num_classes=args.num_classes, **overrides).total
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=args.num_classes, attn_impl=cfg.attn, **overrides)
    model.set_grad_checkpointing(cfg.ckpt)
    model.to(device).train()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    step, _state = _build_step(cfg, model, args.num_classes, device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    row.warmup_s = time.perf_counter() - start
    row.step_ms = _time_steps(step, args.steps, device)
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row.reserved_gib = torch.cuda.max_memory_reserved(device) / 2 ** 30
    if args.profile and any(fnmatch.fnmatchcase(cfg.spec, g) for g in args.profile_match):
        _profile(step, cfg, device, args.profile)
    return row


def is_oom(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
