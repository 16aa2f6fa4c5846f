"""The GPU proof in one call (`make gpu-check`): the CUDA tests, the whole pipeline on the GPU, the
training benchmark as users run it and the kernel-level table, on one H100/H200, offline.

    python tools/gpu_check.py --wheels gpu_wheels --out $OUT   # on a bare GPU machine
    python tools/gpu_check.py --dry-run --out DIR              # on CPU: tiny sizes, the same logic

It cannot pass without really running on the GPU: without CUDA it refuses at once (one line, exit
2); `--wheels DIR` installs the wheels `make gpu-wheels` made (`pip install --no-index --no-deps
--target`, a temporary folder) and runs everything with them, so the machine needs no package
index. Parts, each a subprocess with its own time budget, its log under the output folder and a
line in the summary; one that fails or runs out of time does not stop the others:
1. `tests`: `pytest -m gpu tests/test_gpu.py`. Passes only if every GPU test ran and passed: a
   skipped test, or none at all, fails the part. The SDPA kernel report lands beside the log.
2. `demo`: `python -m cvtkit.demo` with one rank; passes only if it reached its accuracy bar and
   every training start it recorded ran on CUDA (the runs' `starts.jsonl`, not a message).
3. `bench`: `python -m cvtkit.bench.recipes`, the Trainer from the recipes (the aims' rows). A row
   that fails is a failure; an OOM row is reported as OOM, a finding, not a measurement.
4. `kernels`: `python -m cvtkit.bench.train`, the kernel-level table, with the profiler's top
   kernels; stopped with SIGINT at its deadline (the compile rows, last, go first), the rows
   measured so far still count, the others are listed as not measured. An error row fails it.
What the machine cannot run (DALI's and ffcv's paths: their packages do not travel) is listed as
not measured, never as passed. `--parts tests bench` reruns only the parts named. Everything lands
in `--out` (default `$OUT`, else `gpu_check_out/`): `<part>.log`, `bench.md`, `kernels.md`,
`kernels.txt`, `sdpa_kernels.json`, `summary.md`, `environment.json`. Exit 0 when every part
passed. `--dry-run` (CPU, no CUDA): the GPU tests must all be collected and skip, the demo must
train on the CPU, the benchmarks run tiny rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cvtkit.errors import CvtkitError  # noqa: E402  (a checkout without `pip install -e .`)

DRY_KERNELS = ["cvt_13@32:b4:ref", "cvt_13@32:b4:sdpa"]
DRY_MODEL_ARGS = json.dumps({"dims": [16, 32, 64], "heads": [1, 2, 2], "depths": [1, 1, 2]})
PARTS = ("tests", "demo", "bench", "kernels")
# Seconds per part on a GPU, at most (the rest of --budget-s goes to the kernel table).
PART_BUDGET_S = {"tests": 150, "demo": 150, "bench": 180}
NEVER_HERE = ["data.format: dali on the GPU (DALI's \"mixed\" decoding, the loader benchmark's DALI rows): "
              "DALI does not travel (about 870 MB)",
              "data.format: ffcv on the GPU: ffcv does not travel"]


class NoCuda(CvtkitError):
    """gpu-check run where CUDA does not start."""


class WheelsError(CvtkitError):
    """`--wheels` names no usable bundle."""


@dataclass
class Outcome:
    part: str
    status: str = "not run"
    passed: bool = False
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)


def require_cuda() -> str:
    """The GPU's name; `NoCuda` where CUDA does not start (a CPU-only torch on a GPU box too)."""
    import torch
    if not torch.cuda.is_available():
        raise NoCuda(f"CUDA is unavailable here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): "
                     f"gpu-check proves the GPU path and cannot pass without one; --dry-run checks the script on CPU")
    return torch.cuda.get_device_name(0)


def install_wheels(wheels: Path, target: Path) -> list[str]:
    """The bundle of `make gpu-wheels` into `target`, offline and without resolving anything;
    returns the wheels' names."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise WheelsError(f"--wheels {wheels}: no .whl files there (make gpu-wheels writes them)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--target", str(target), *map(str, files)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise WheelsError(f"--wheels {wheels}: pip could not install them here: {last[-1].strip()}")
    return [f.name for f in files]


def run_part(name: str, cmd: list, out: Path, timeout_s: float, env: dict, interrupt: bool = False) -> tuple[int | None, float]:
    """Run `cmd` with stdout+stderr to `out/<name>.log`; at `timeout_s` it gets SIGINT (`interrupt`,
    so that it can still print what it has) or SIGKILL. Returns (exit code or None, seconds)."""
    start = time.monotonic()
    with open(out / f"{name}.log", "w") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT if interrupt else signal.SIGKILL)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    return code, time.monotonic() - start


def tests_part(out: Path, env: dict, timeout_s: float, dry_run: bool) -> Outcome:
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           "tests/test_gpu.py", f"--junitxml={xml}"]
    code, seconds = run_part("tests", cmd, out, timeout_s, {**env, "GPU_CHECK_OUT": str(out)})
    outcome = Outcome("tests", seconds=seconds)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
        outcome.figures += [f"skipped: {r}" for r in sorted({m.get("message", "") for m in suite.iter("skipped")}) if r]
    outcome.status, outcome.passed = tests_status(code, counts, dry_run)
    outcome.figures.insert(0, _ran(counts))
    kernels = out / "sdpa_kernels.json"
    if kernels.is_file():
        for case, found in json.loads(kernels.read_text()).items():
            outcome.figures.append(f"SDPA {case}: {', '.join(found)}")
    return outcome


def _ran(counts: dict) -> str:
    failed = counts["failures"] + counts["errors"]
    return (f"{counts['tests'] - failed - counts['skipped']} of {counts['tests']} GPU tests passed, {failed} failed, "
            f"{counts['skipped']} skipped")


def tests_status(code: int | None, counts: dict, dry_run: bool) -> tuple[str, bool]:
    """(status, passed) of the GPU tests from pytest's exit code and junit counts (tests,
    failures, errors, skipped). On a GPU every test must have run and passed: a skip is a test that
    did not run, so it fails the part, as does an empty run. In a dry run (no CUDA) the honest
    outcome is the opposite: every test collected, every one skipped."""
    total, failed, skipped = counts["tests"], counts["failures"] + counts["errors"], counts["skipped"]
    if code is None:
        return (f"TIMEOUT ({_ran(counts)})" if total else "TIMEOUT"), False
    if dry_run:
        if total > 0 and skipped == total and code == 0:
            return f"not run: CPU dry run, all {total} GPU tests skipped", True
        return f"FAILED (exit {code}: {_ran(counts)})", False
    if code == 0 and total > 0 and failed == 0 and skipped == 0:
        return "ok", True
    return (f"FAILED (exit {code}: {_ran(counts)})" if total else f"FAILED (exit {code}: no GPU test ran)"), False


def demo_status(code: int | None, starts: list[dict], expected: str, dry_run: bool) -> tuple[str, bool]:
    """(status, passed) of the demo: it exited 0 (its accuracy bar) and every training start it
    recorded ran on the `expected` device type."""
    wrong = sorted({s.get("device", "unknown") for s in starts if s.get("device", "").split(":")[0] != expected})
    if code is None:
        return "TIMEOUT", False
    if code != 0:
        return f"FAILED (exit {code})", False
    if not starts or wrong:
        return f"FAILED (trained on {', '.join(wrong) or 'nothing'}, not {expected})", False
    return ("ok: CPU dry run" if dry_run else "ok"), True


def _demo_starts(demo: Path) -> list[dict]:
    """Every training start the demo's runs recorded (their `starts.jsonl`)."""
    return [json.loads(line) for path in sorted(demo.glob("runs/*/starts.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def demo_part(out: Path, env: dict, timeout_s: float, dry_run: bool) -> Outcome:
    """The demo as `make demo` runs it, one rank on the GPU (two CPU ranks in the dry run); it
    passes only if it exits 0 (its 95% bar) and every training start ran on the expected device."""
    expected = "cpu" if dry_run else "cuda"
    nproc = "2" if dry_run else "1"
    demo = out / "demo"
    code, seconds = run_part("demo", [sys.executable, "-m", "cvtkit.demo", "--out", demo, "--nproc", nproc],
                             out, timeout_s, env)
    outcome = Outcome("demo", seconds=seconds)
    text = (out / "demo.log").read_text()
    outcome.figures = [line.strip() for line in text.splitlines()
                       if re.match(r"\s+(pretraining|fine-tuning|throughput|time)\s+:", line)]
    outcome.not_measured = [f"the demo's {m.group(1).strip()}" for m in re.finditer(r"^\s*(.*): not installed here", text, re.M)]
    starts = _demo_starts(demo)
    devices = sorted({s.get("device_name") or s.get("device", "?") for s in starts})
    outcome.figures.append(f"{len(starts)} training starts, on {', '.join(devices) or 'nothing'}")
    outcome.status, outcome.passed = demo_status(code, starts, expected, dry_run)
    return outcome


def _rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "not_measured": []}


def bench_part(out: Path, env: dict, timeout_s: float, dry_run: bool) -> Outcome:
    """The Trainer from the recipes (`cvtkit.bench.recipes`); the aims are read off these rows."""
    cmd = [sys.executable, "-m", "cvtkit.bench.recipes", "--json", out / "bench.json", "--keep", out / "bench_runs"]
    cmd += ["--rows", "pretrain/tiny_cpu", "--steps", "2"] if dry_run else []
    code, seconds = run_part("bench", cmd, out, timeout_s, {**env, "PYTHONUNBUFFERED": "1"}, interrupt=True)
    return table_outcome("bench", out, code, seconds, _rows(out / "bench.json"), cut_ok=False)


def kernels_part(out: Path, env: dict, timeout_s: float, dry_run: bool) -> Outcome:
    """The kernel-level table (`cvtkit.bench.train`, its GPU_DEFAULT list) with the top kernels."""
    cmd = [sys.executable, "-m", "cvtkit.bench.train", "--json", out / "kernels.json", "--profile",
           out / "kernels.txt", "--profile-match", "cvt_13@*:sdpa*", "cvt_w24@224:*:sdpa+cl"]
    cmd += ["--configs", *DRY_KERNELS, "--model-args", DRY_MODEL_ARGS, "--num-classes", "10", "--warmup", "1",
            "--steps", "2"] if dry_run else ["--warmup", "3", "--steps", "10"]
    code, seconds = run_part("kernels", cmd, out, timeout_s, {**env, "PYTHONUNBUFFERED": "1"}, interrupt=True)
    return table_outcome("kernels", out, code, seconds, _rows(out / "kernels.json"), cut_ok=True)


def table_outcome(part: str, out: Path, code: int | None, seconds: float, rows: dict, cut_ok: bool) -> Outcome:
    """A benchmark part's outcome from its rows: an error row fails it, an OOM row is a finding,
    rows cut by the deadline are not measured (which fails the part unless `cut_ok`)."""
    outcome = Outcome(part, seconds=seconds)
    table = [line for line in (out / f"{part}.log").read_text().splitlines() if line.startswith("|")]
    if table:
        (out / f"{part}.md").write_text("\n".join(table) + "\n")
    measured = [r for r in rows["rows"] if r["status"] == "ok"]
    errors = [f"{r['spec']}: {r['status']}" for r in rows["rows"] if r["status"].startswith("error")]
    outcome.figures.append(f"{len(measured)} rows measured ({part}.md)")
    outcome.figures += [f"OOM (a finding, not a measurement): {r['spec']}" for r in rows["rows"] if r["status"] == "OOM"]
    outcome.figures += [f"error: {e}" for e in errors]
    outcome.not_measured = [f"{part} row {spec}: cut at the part's deadline" for spec in rows["not_measured"]]
    if code is None and not rows["rows"] and not rows["not_measured"]:
        outcome.status = "TIMEOUT (no row measured)"
    elif errors:
        outcome.status = f"FAILED ({len(errors)} row(s) failed)"
    elif code not in (0, None) and not rows["not_measured"]:
        outcome.status = f"FAILED (exit {code})"
    elif rows["not_measured"] and not cut_ok:
        outcome.status = f"TIMEOUT ({len(rows['not_measured'])} row(s) not measured)"
    else:
        outcome.passed = True
        outcome.status = "ok" + (f" (cut at its deadline: {len(rows['not_measured'])} row(s) not measured)"
                                 if rows["not_measured"] else "")
    return outcome


def environment(dry_run: bool, site: Path | None) -> dict:
    import importlib.metadata as metadata

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if dry_run:
        info["dry run"] = "CPU"
    elif torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver, memory"] = smi.stdout.strip() or smi.stderr.strip()
    paths = [str(site)] if site else None
    for package in ("deepspeed", "timm", "webdataset", "simplejpeg"):
        found = next(iter(metadata.distributions(name=package, path=paths)), None) if paths else None
        try:
            info[package] = (found or metadata.distribution(package)).version
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["wheels"] = "installed from --wheels" if site else "the environment's"
    return info


def summarize(outcomes: list[Outcome], info: dict, out: Path, dry_run: bool) -> str:
    lines = [f"# gpu-check{' (dry run, CPU)' if dry_run else ''}: {info.get('gpu', 'no GPU')}", "",
             ", ".join(f"{k} {v}" for k, v in info.items()), "", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.part} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    for o in outcomes:
        lines += ["", f"## {o.part}", *[f"- {f}" for f in o.figures]]
    never = [*NEVER_HERE, *(m for o in outcomes for m in o.not_measured)]
    lines += ["", "## not measured (never counted as passed)", *[f"- {m}" for m in never]]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def prepare(args) -> tuple[dict, Path | None]:
    """The parts' environment: refuses without CUDA (unless a dry run), installs `--wheels`."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        require_cuda()
    site = None
    if args.wheels:
        site = Path(tempfile.mkdtemp(prefix="cvtkit-gpu-site-"))
        try:
            names = install_wheels(Path(args.wheels), site)
        except WheelsError:
            shutil.rmtree(site, ignore_errors=True)
            raise
        print(f"gpu-check: installed {len(names)} wheels from {args.wheels} into {site}", flush=True)
    env["PYTHONPATH"] = os.pathsep.join([*([str(site)] if site else []), str(REPO),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    return env, site


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU and tiny sizes: check the script, not the GPU")
    p.add_argument("--wheels", metavar="DIR", help="install the wheels of `make gpu-wheels` from DIR, offline")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="rerun only these parts")
    p.add_argument("--budget-s", type=float, default=540, help="wall time for all parts together")
    args = p.parse_args(argv)
    try:
        env, site = prepare(args)
    except CvtkitError as e:
        print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
        return e.exit_code
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        info = environment(args.dry_run, site)
        (out / "environment.json").write_text(json.dumps(info, indent=1) + "\n")
        deadline = time.monotonic() + args.budget_s
        run = {"tests": tests_part, "demo": demo_part, "bench": bench_part, "kernels": kernels_part}
        outcomes = []
        for part in args.parts:
            left = deadline - time.monotonic()
            # the kernel table is cut at its deadline and keeps what it measured; a dry run checks
            # logic, not speed, on a CPU that trains the demo for minutes
            budget = max(60.0, left) if part == "kernels" else left if args.dry_run else min(PART_BUDGET_S[part], left)
            outcomes.append(run[part](out, env, budget, args.dry_run))
            print(f"gpu-check: {part}: {outcomes[-1].status} ({outcomes[-1].seconds:.0f} s)", flush=True)
        print(summarize(outcomes, info, out, args.dry_run), flush=True)
        return 0 if all(o.passed for o in outcomes) else 1
    finally:
        if site is not None:
            shutil.rmtree(site, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
