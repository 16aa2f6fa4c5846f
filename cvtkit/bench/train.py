"""Training-step speed and memory, kernel by kernel: SDPA vs the official einsum attention,
channels-last, compile, activation checkpointing, against the device's peak and its measured
matmul rate. These rows are plain PyTorch (autocast, fp32 parameters, torch's AdamW), one option
at a time; what users run (the Trainer from a recipe: DeepSpeed ZeRO, bf16 parameters, the
recipe's micro batch) is `python -m cvtkit.bench.recipes`, the table the aims are read off.

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
resolution). A configuration that runs out of memory prints OOM (a finding, not a measurement)
and the run goes on; one that fails otherwise prints its error, and the command exits 1. SIGINT
(`timeout -s INT 480 python -m ...`) stops the run and prints the rows measured so far.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from cvtkit.models.summary import model_macs
from cvtkit.train.metrics import device_peak_flops

from .train_step import BenchConfig, Row, free_memory, is_oom, model_overrides, run_config, sync

# The GPU table (also `make gpu-check`'s), most important first: a deadline (SIGINT) cuts the
# compile rows, which come last, first.
GPU_DEFAULT = [
    "cvt_13@224:b256:ref", "cvt_13@224:b256:sdpa", "cvt_13@224:b256:sdpa+cl",
    "cvt_w24@224:b128:ref", "cvt_w24@224:b128:sdpa+cl",
    "cvt_w24@384:b64:ref", "cvt_w24@384:b64:sdpa+cl", "cvt_w24@384:b64:sdpa+cl+ckpt",
    "cvt_21@224:b256:ref", "cvt_21@224:b256:sdpa+cl",
    "ceit_small@224:b256:ref", "ceit_small@224:b256:sdpa+cl",
    "cvt_13@224:b256:sdpa+cl+compile", "cvt_w24@224:b128:sdpa+cl+compile",
    "cvt_w24@384:b64:sdpa+cl+compile", "cvt_21@224:b256:sdpa+cl+compile", "ceit_small@224:b256:sdpa+cl+compile",
]
# Small enough for a 2-core CI machine: a few seconds per configuration.
CPU_DEFAULT = ["cvt_13@112:b8:ref", "cvt_13@112:b8:sdpa"]

def matmul_tflops(device: torch.device) -> tuple[float, str]:
    """The measured rate of one large matmul: 8192^3 bf16 on GPU, 1024^3 fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))  # random, not zeros
    for _ in range(3):
        a @ b
    sync(device)
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
    """TFLOP/s: `override`, else the table training's MFU uses."""
    if override:
        return override
    peak = device_peak_flops(device)
    return peak / 1e12 if peak else None


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
            failure = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {first_line}"
            if failure != "OOM":
                import traceback
                traceback.print_exc()
            del exc  # the traceback holds the model's tensors alive
        if failure:
            row = Row(cfg, status=failure)
            with contextlib.suppress(Exception):
                row.macs = model_macs(cfg.model, cfg.res, num_classes=args.num_classes,
                                      **model_overrides(cfg, args.model_args)).total
        free_memory(device)
        rows.append(row)
        if row.status == "ok":
            mfu = f", MFU {100 * row.tflops / peak:.1f}%" if peak else ""
            peak_s = f", peak {row.peak_gib:.1f} GiB" if row.peak_gib is not None else ""
            print(f"    {row.images_per_s:,.0f} images/s, {row.median_ms:.1f} ms/step "
                  f"(spread {row.spread_ms:.1f}){peak_s}, "
                  f"{row.tflops:.3g} TFLOP/s{mfu}, warm-up {row.warmup_s:.1f} s", file=sys.stderr, flush=True)
        else:
            print(f"    {row.status}", file=sys.stderr, flush=True)
    free_memory(device)
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
    p.add_argument("--json", metavar="FILE", help="also write the rows' status and figures as JSON")
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
        configs = [c if c.dtype else replace(c, dtype=args.dtype) for c in configs]
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
    free_memory(device)  # the matmul's buffers stay out of the first configuration's peak

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
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": [{"spec": r.cfg.spec, "status": r.status, **({"images_per_s": r.images_per_s, "peak_gib":
                       r.peak_gib, "tflops": r.tflops} if r.status == "ok" else {})} for r in rows],
             "not_measured": [c.spec for c in configs[len(rows):]]}, indent=1) + "\n")
    return rows


def exit_code(rows: list[Row]) -> int:
    """1 when a configuration failed with an error (an OOM is a finding, not a failure)."""
    return 1 if any(r.status.startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(exit_code(main()))
