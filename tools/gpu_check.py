"""The GPU proof in one call (`make gpu-check`): the CUDA tests, the whole pipeline on the GPU, and
the training benchmark table, within about 9 minutes of wall time on one H100/H200.

    python tools/gpu_check.py --out $OUT            # on a GPU machine
    python tools/gpu_check.py --dry-run --out DIR   # on CPU: tiny sizes, the same script logic

Parts, each a subprocess with its own time budget, its log under the output folder, and a line in
the summary; a part that fails or runs out of time does not stop the others:
1. `tests`: `pytest -m gpu tests/test_gpu.py` (SDPA kernels against the reference attention,
   DeepSpeed ZeRO-2 bf16 over NCCL with a kill and a resume, CUDA RNG states, the on-device
   augmentation); junit XML and the SDPA kernel report beside the log. Without CUDA they skip,
   with the reason.
2. `demo`: `python -m cvtkit.demo` (shards, pretraining stopped and resumed, fine-tuning at a
   higher resolution, evaluation) with its training on the GPU, one rank; it must reach the
   demo's own accuracy bar (95% top-1).
3. `bench`: `python -m cvtkit.bench.train` over the BENCHMARKS.md configurations that fit the
   remaining time (`compile` rows are the first to go), with the profiler's top kernels; stopped
   with SIGINT at its deadline, so that the rows measured so far are still printed.
`--parts tests bench` reruns only the parts named. Everything lands in `--out` (default `$OUT`,
else `gpu_check_out/`): `<part>.log`, `bench.md`, `kernels.txt`, `sdpa_kernels.json`,
`summary.md`, `environment.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# BENCHMARKS.md's table, most important first; the compile rows are dropped first when time is short.
GPU_BENCH = [
    "cvt_13@224:b256:ref", "cvt_13@224:b256:sdpa", "cvt_13@224:b256:sdpa+cl",
    "cvt_w24@224:b128:ref", "cvt_w24@224:b128:sdpa+cl",
    "cvt_w24@384:b64:ref", "cvt_w24@384:b64:sdpa+cl", "cvt_w24@384:b64:sdpa+cl+ckpt",
    "cvt_21@224:b256:ref", "cvt_21@224:b256:sdpa+cl",
    "ceit_small@224:b256:ref", "ceit_small@224:b256:sdpa+cl",
    "cvt_13@224:b256:sdpa+zero2",
    "cvt_13@224:b256:sdpa+cl+compile", "cvt_w24@224:b128:sdpa+cl+compile",
    "cvt_w24@384:b64:sdpa+cl+compile",
]
DRY_BENCH = ["cvt_13@32:b4:ref", "cvt_13@32:b4:sdpa"]
DRY_MODEL_ARGS = json.dumps({"dims": [16, 32, 64], "heads": [1, 2, 2], "depths": [1, 1, 2]})
PARTS = ("tests", "demo", "bench")


@dataclass
class Outcome:
    part: str
    status: str = "not run"  # ok, FAILED (exit N), TIMEOUT, not run
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)


def run_part(name: str, cmd: list[str], out: Path, timeout_s: float, env: dict, interrupt: bool = False) -> tuple[int | None, float]:
    """Run `cmd` with stdout+stderr to `out/<name>.log`; at `timeout_s` it gets SIGINT (`interrupt`,
    so that it can still print what it has) or SIGKILL. Returns (exit code or None, seconds)."""
    log = out / f"{name}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT if interrupt else signal.SIGKILL)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    return code, time.monotonic() - start


def status_of(code: int | None) -> str:
    return "TIMEOUT" if code is None else ("ok" if code == 0 else f"FAILED (exit {code})")


def tests_part(out: Path, env: dict, timeout_s: float) -> Outcome:
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           "tests/test_gpu.py", f"--junitxml={xml}"]
    code, seconds = run_part("tests", cmd, out, timeout_s, {**env, "GPU_CHECK_OUT": str(out)})
    outcome = Outcome("tests", status_of(code), seconds)
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        outcome.figures.append(f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
                               f"{counts['skipped']} skipped")
        reasons = {m.get("message", "") for m in suite.iter("skipped")}
        outcome.figures += [f"skipped: {r}" for r in sorted(reasons) if r]
    kernels = out / "sdpa_kernels.json"
    if kernels.is_file():
        for case, found in json.loads(kernels.read_text()).items():
            outcome.figures.append(f"SDPA {case}: {', '.join(found) or 'math only'}")
    return outcome


def demo_part(out: Path, env: dict, timeout_s: float, dry_run: bool) -> Outcome:
    # On a GPU: one rank, as a one-GPU machine has; dry run: the CPU demo as `make demo` runs it.
    nproc = "2" if dry_run else "1"
    code, seconds = run_part("demo", [sys.executable, "-m", "cvtkit.demo", "--out", out / "demo", "--nproc", nproc],
                             out, timeout_s, env)
    outcome = Outcome("demo", status_of(code), seconds)
    text = (out / "demo.log").read_text()
    outcome.figures = [line.strip() for line in text.splitlines()
                       if re.match(r"\s+(pretraining|fine-tuning|throughput|time)\s+:", line)]
    return outcome


def bench_part(out: Path, env: dict, timeout_s: float, dry_run: bool) -> Outcome:
    configs = DRY_BENCH if dry_run else GPU_BENCH
    cmd = [sys.executable, "-m", "cvtkit.bench.train", "--configs", *configs, "--profile", out / "kernels.txt",
           "--profile-match", "cvt_13@*:sdpa*", "cvt_w24@224:*:sdpa+cl"]
    cmd += ["--model-args", DRY_MODEL_ARGS, "--num-classes", "10", "--warmup", "1", "--steps", "2"] if dry_run \
        else ["--warmup", "3", "--steps", "10"]
    code, seconds = run_part("bench", cmd, out, timeout_s, {**env, "PYTHONUNBUFFERED": "1"}, interrupt=True)
    outcome = Outcome("bench", status_of(code), seconds)
    table = [line for line in (out / "bench.log").read_text().splitlines() if line.startswith("|")]
    if table:
        (out / "bench.md").write_text("\n".join(table) + "\n")
        outcome.figures.append(f"{len(table) - 2} configurations measured (bench.md)")
        if code is None:
            outcome.status = "ok (stopped at its deadline; the rows measured are in bench.md)"
    return outcome


def environment() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver, memory"] = smi.stdout.strip() or smi.stderr.strip()
    for package in ("deepspeed", "timm"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = "not installed"
    return info


def summarize(outcomes: list[Outcome], info: dict, out: Path, dry_run: bool) -> str:
    lines = [f"# gpu-check{' (dry run, CPU)' if dry_run else ''}: {info.get('gpu', 'no GPU')}", "",
             ", ".join(f"{k} {v}" for k, v in info.items()), "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.part} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    for o in outcomes:
        lines += ["", f"## {o.part}", *[f"- {f}" for f in o.figures]]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU and tiny sizes: check the script, not the GPU")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="rerun only these parts")
    p.add_argument("--budget-s", type=float, default=540, help="wall time for all parts together")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    info = environment() if not args.dry_run else {"python": platform.python_version(), "dry run": "CPU"}
    (out / "environment.json").write_text(json.dumps(info, indent=1) + "\n")
    deadline = time.monotonic() + args.budget_s
    outcomes = []
    for part in args.parts:
        left = deadline - time.monotonic()
        if part == "tests":
            outcomes.append(tests_part(out, env, min(180, left)))
        elif part == "demo":
            outcomes.append(demo_part(out, env, min(600 if args.dry_run else 240, left), args.dry_run))
        else:
            outcomes.append(bench_part(out, env, max(60, left), args.dry_run))
        print(f"gpu-check: {outcomes[-1].part}: {outcomes[-1].status} ({outcomes[-1].seconds:.0f} s)", flush=True)
    print(summarize(outcomes, info, out, args.dry_run), flush=True)
    return 0 if all(o.status.startswith("ok") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
