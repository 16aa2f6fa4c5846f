"""Training-step speed and memory: SDPA vs the official einsum attention, channels-last, compile,
activation checkpointing, ZeRO, against the device's peak and its measured matmul rate.

    python -m cvtkit.bench.train                                    # default table (GPU or CPU)
    python -m cvtkit.bench.train --configs cvt_13@224:b256:ref cvt_13@224:b256:sdpa+cl+compile
    python -m cvtkit.bench.train --configs cvt_w24@384:b64:sdpa+ckpt --steps 10 --profile prof.txt

A configuration is `MODEL@RES:bBATCH[:OPT+OPT+...]`; the options are
    ref | sdpa       attention: the official einsum + softmax, or scaled_dot_product_attention (default)
    cl               channels-last model and input
    compile[=MODE]   torch.compile of the whole model (dynamic=False; MODE e.g. max-autotune-no-cudagraphs)
    rcompile[=MODE]  regional compile: each transformer block compiled on its own (blocks with
                     the same shapes and drop-path rate share a graph; the per-block drop-path
                     ramp makes most blocks distinct, so the compile time gain is small)
    ckpt             activation checkpointing of every block
    zero1|zero2|zero3  single-process DeepSpeed engine at that ZeRO stage (bf16 parameters,
                     DeepSpeed's AdamW); reported as unavailable where DeepSpeed does not import
    bf16 | fp32      bf16 autocast or plain fp32 (default: --dtype, itself bf16 on GPU, fp32 on CPU,
                     where bf16 autocast is many times slower)

One step = forward (bf16 autocast unless fp32), soft-target cross-entropy against smoothed
one-hot targets, backward, AdamW step (fused on CUDA, foreach on CPU), on one synthetic batch
already on the device (on CUDA with cudnn.benchmark and TF32 for fp32 matmuls). `--warmup`
steps (compilation included) are not timed; each of the `--steps` timed steps is timed with CUDA
events (perf_counter on CPU). images/s = batch / median step time; spread = p90 - p10 of the
step times; peak = torch.cuda.max_memory_allocated over the whole configuration (warm-up
included).
MFU = 6 x MACs per image (2 FLOPs per MAC x forward + 2x backward; MACs are conv + linear +
attention matmuls, `model_macs`; recomputation under ckpt is not counted) x images/s / the
device's dense bf16 peak (989.4 TFLOP/s for H100 SXM / H200); "of GEMM" divides by the
8192^3 bf16 matmul rate measured at start instead. "x ref" is images/s over the first `ref`
configuration of the same model and resolution (else the first configuration of that model and
resolution). A configuration that runs out of memory prints OOM and the run goes on; SIGINT
(`timeout -s INT 480 python -m ...`) stops the run and prints the rows measured so far.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import importlib.util
import json
import os
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvtkit.models import create_model, weight_decay_groups
from cvtkit.models.factory import get_entry
from cvtkit.models.summary import model_macs

# Dense bf16 tensor-core peaks in TFLOP/s, by the vendors' datasheets (performance notes, section 2).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}

GPU_DEFAULT = [
    "cvt_13@224:b256:ref", "cvt_13@224:b256:sdpa", "cvt_13@224:b256:sdpa+cl",
    "cvt_13@224:b256:sdpa+cl+compile",
    "cvt_21@224:b256:ref", "cvt_21@224:b256:sdpa+cl+compile",
    "cvt_w24@224:b128:ref", "cvt_w24@224:b128:sdpa+cl+compile",
    "cvt_w24@384:b64:ref", "cvt_w24@384:b64:sdpa+cl+compile", "cvt_w24@384:b64:sdpa+cl+ckpt",
    "ceit_small@224:b256:ref", "ceit_small@224:b256:sdpa+cl+compile",
    "cvt_13@224:b256:sdpa+zero2",
]
# Small enough for a 2-core CI machine: a few seconds per configuration.
CPU_DEFAULT = ["cvt_13@112:b8:ref", "cvt_13@112:b8:sdpa"]

_SPEC = re.compile(r"^(?P<model>[\w.-]+)@(?P<res>\d+):b(?P<batch>\d+)(?::(?P<opts>.*))?$")


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
        m = _SPEC.match(spec.strip())
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
    status: str = "ok"  # "ok", "OOM", "unavailable: ..." or "error: ..."
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


def _model_overrides(cfg: BenchConfig, model_args: dict) -> dict:
    overrides = dict(model_args)
    entry = get_entry(cfg.model)
    if entry.fixed_res and cfg.res != overrides.get("img_size", entry.default_res):
        overrides["img_size"] = cfg.res  # CeiT: the position embedding is built for one size
    return overrides


def soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: `[B, K]` logits and `[B, K]` target distributions."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _synthetic_batch(cfg: BenchConfig, num_classes: int, device: torch.device, dtype=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.res, cfg.res, generator=g)
    labels = torch.randint(0, num_classes, (cfg.batch,), generator=g)
    target = F.one_hot(labels, num_classes).float() * 0.9 + 0.1 / num_classes  # label smoothing 0.1
    x = x.to(device=device, dtype=dtype or torch.float32)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target.to(device)


def _compile(model: nn.Module, cfg: BenchConfig) -> nn.Module:
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STARTED: dict = {"env": [], "group": False}  # what the ZeRO rows set up, for main() to undo


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


@contextlib.contextmanager
def _zero_teardown():
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
        import deepspeed  # imported only here: the package is optional on benchmark machines

        if not torch.distributed.is_initialized():
            # A one-process group; main() takes these variables and the group down at the end.
            for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
                if key not in os.environ:
                    os.environ[key] = value
                    _STARTED["env"].append(key)
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
            _STARTED["group"] = True
        config = {"train_micro_batch_size_per_gpu": cfg.batch, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05}},
                  "zero_optimization": {"stage": cfg.zero}, "bf16": {"enabled": True},
                  "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                               model_parameters=weight_decay_groups(model, 0.05))
        x, target = _synthetic_batch(cfg, num_classes, device, torch.bfloat16)

        def step():
            loss = soft_target_ce(engine(x), target)
            engine.backward(loss)
            engine.step()
        return step, engine

    forward = _compile(model, cfg) if cfg.compile else model
    opt_kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=1e-4, **opt_kw)
    x, target = _synthetic_batch(cfg, num_classes, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                else contextlib.nullcontext())

    def step():
        with autocast:
            logits = forward(x)
        soft_target_ce(logits, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def _sync(device: torch.device) -> None:
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
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90)
    with open(path, "a") as f:
        f.write(f"\n## {cfg.spec}: {steps} steps, sorted by {sort}\n\n{table}\n")


def run_config(cfg: BenchConfig, args, device: torch.device) -> Row:
    row = Row(cfg)
    overrides = _model_overrides(cfg, args.model_args)
    row.macs = model_macs(cfg.model, cfg.res, num_classes=args.num_classes, **overrides).total
    if cfg.zero and not deepspeed_available():
        row.status = "unavailable: deepspeed not installed"
        return row
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
    _sync(device)
    row.warmup_s = time.perf_counter() - start
    row.step_ms = _time_steps(step, args.steps, device)
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row.reserved_gib = torch.cuda.max_memory_reserved(device) / 2 ** 30
    if args.profile and any(fnmatch.fnmatchcase(cfg.spec, g) for g in args.profile_match):
        _profile(step, cfg, device, args.profile)
    return row


def _is_oom(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_tflops(device: torch.device) -> tuple[float, str]:
    """The measured rate of one large matmul: 8192^3 bf16 on GPU, 1024^3 fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))  # random, not zeros
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1000.0
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - t0
    return 2.0 * n ** 3 * reps / seconds / 1e12, f"{n}^3 {str(dtype).removeprefix('torch.')}"


def device_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():  # "H100 PCIe" is tried before "H100"
        if key in name:
            return peak
    return None


def reference_rows(rows: list[Row]) -> dict[int, Row]:
    """For each row index: the row its "x ref" ratio is taken against (None: no ok row)."""
    refs: dict[int, Row] = {}
    for i, row in enumerate(rows):
        group = [r for r in rows if (r.cfg.model, r.cfg.res) == (row.cfg.model, row.cfg.res)
                 and r.status == "ok"]
        refs[i] = next((r for r in group if r.cfg.attn == "reference"), group[0] if group else None)
    return refs


def format_table(rows: list[Row], peak: float | None, gemm: float) -> str:
    head = ("| config | batch | images/s | step ms (median) | spread ms (p90-p10) | peak GiB "
            "| GMACs/img | TFLOP/s | MFU | of GEMM | x ref | warm-up s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    refs = reference_rows(rows)
    for i, r in enumerate(rows):
        c = r.cfg
        if r.status != "ok":
            lines.append(f"| {c.spec} | {c.batch} | {r.status} | | | | {r.macs / 1e9:.4g} | | | | | |")
            continue
        ref = refs[i]
        peak_s = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-"
        mfu = f"{100 * r.tflops / peak:.1f}%" if peak else "-"
        lines.append(
            f"| {c.spec} | {c.batch} | {r.images_per_s:,.0f} | {r.median_ms:.1f} | {r.spread_ms:.1f} "
            f"| {peak_s} | {r.macs / 1e9:.4g} | {r.tflops:.3g} | {mfu} | {100 * r.tflops / gemm:.3g}% "
            f"| {r.images_per_s / ref.images_per_s:.2f} | {r.warmup_s:.1f} |")
    return "\n".join(lines)


def _run_all(configs: list[BenchConfig], args, device: torch.device, peak: float | None):
    """Run every configuration in turn; returns (rows, interrupted)."""
    rows, interrupted = [], False
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {cfg.spec} ...", file=sys.stderr, flush=True)
        failure = None
        try:
            row = run_config(cfg, args, device)
        except KeyboardInterrupt:  # e.g. `timeout -s INT`: print the rows measured so far
            interrupted = True
            break
        except Exception as exc:  # report the row and go on with the next configuration
            first_line = (str(exc).splitlines() or [""])[0][:120]
            failure = "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {first_line}"
            if failure != "OOM":
                import traceback
                traceback.print_exc()
            del exc  # the traceback holds the model's tensors alive
        if failure:
            row = Row(cfg, status=failure)
            with contextlib.suppress(Exception):
                row.macs = model_macs(cfg.model, cfg.res, num_classes=args.num_classes,
                                      **_model_overrides(cfg, args.model_args)).total
        _free(device)
        rows.append(row)
        if row.status == "ok":
            mfu = f", MFU {100 * row.tflops / peak:.1f}%" if peak else ""
            peak_s = f", peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else ""
            print(f"    {row.images_per_s:,.0f} images/s, {row.median_ms:.1f} ms/step "
                  f"(spread {row.spread_ms:.1f}){peak_s}, "
                  f"{row.tflops:.3g} TFLOP/s{mfu}, warm-up {row.warmup_s:.1f} s", file=sys.stderr, flush=True)
        else:
            print(f"    {row.status}", file=sys.stderr, flush=True)
    _free(device)
    return rows, interrupted


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m cvtkit.bench.train",
                                description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--configs", nargs="+", help="MODEL@RES:bBATCH[:OPTS] (default: a table per device)")
    p.add_argument("--steps", type=int, help="timed steps per configuration (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5 GPU, 2 CPU)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--model-args", type=json.loads, default={},
                   help='architecture overrides for every config, JSON, e.g. \'{"dims": [16, 32, 64]}\'')
    p.add_argument("--peak-tflops", type=float, help="MFU denominator (default: by GPU name)")
    p.add_argument("--profile", metavar="FILE", help="write the top kernels of each profiled config to FILE")
    p.add_argument("--profile-match", nargs="+", default=["*"], metavar="GLOB",
                   help="profile only the configs whose spec matches one of these globs (default: all)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        configs = [BenchConfig.parse(s) for s in (args.configs or (GPU_DEFAULT if on_gpu else CPU_DEFAULT))]
        configs = [c if c.dtype else replace(c, dtype="bf16" if c.zero else args.dtype) for c in configs]
    except ValueError as exc:
        p.error(str(exc))
    if args.profile:
        open(args.profile, "w").close()
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left
        name = torch.cuda.get_device_name(device)
    else:
        import platform
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    gemm, gemm_what = matmul_tflops(device)
    peak = device_peak(device, args.peak_tflops)
    _free(device)  # the matmul's buffers stay out of the first configuration's peak

    with _zero_teardown():
        rows, interrupted = _run_all(configs, args, device, peak)

    print(f"device: {name}; torch {torch.__version__}"
          + (f", CUDA {torch.version.cuda}" if on_gpu else ""))
    print(f"matmul {gemm_what}: {gemm:{'.1f' if gemm >= 1 else '.3g'}} TFLOP/s measured; MFU peak: "
          + (f"{peak:.1f} TFLOP/s (dense bf16)" if peak else "none (MFU not shown)"))
    overrides = f"; model overrides {json.dumps(args.model_args)}" if args.model_args else ""
    print(f"{args.warmup} warm-up + {args.steps} timed steps per config; default dtype {args.dtype}; "
          f"{args.num_classes} classes{overrides}")
    print()
    print(format_table(rows, peak, gemm))
    if interrupted:
        print(f"\ninterrupted: {len(configs) - len(rows)} configuration(s) not measured")
    return rows


if __name__ == "__main__":
    main()
