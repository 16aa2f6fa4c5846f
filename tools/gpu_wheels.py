"""`make gpu-wheels`: the wheels a bare GPU machine lacks for `tools/gpu_check.py` (the CUDA tests,
the demo, the benchmarks), made here, where PyPI answers, into one folder that travels with the
checkout (at most 60 MiB) and installs there offline (`gpu_check.py --wheels gpu_wheels`).

    python tools/gpu_wheels.py [--out gpu_wheels] [--python-version 3.12]

What the GPU machine has is GPU_IMAGE (its Python 3.12 image); what it lacks is what ROOTS need,
followed through their requirements (as this environment's metadata states them, markers taken
for the target Python on Linux x86-64) and stopping at GPU_IMAGE's packages. Every version is this
environment's, the one the CPU tests run. DeepSpeed is on PyPI only as an sdist: it is built
here as a pure wheel with DS_BUILD_OPS=0, so that its ops compile just in time on the GPU
machine (ninja is in the image; cvtkit's training uses torch's own optimizers). Everything else
is a binary wheel for the target CPython on manylinux x86-64. ffcv and DALI (about 870 MB) cannot
travel; gpu_check reports what needs them as not measured.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cvtkit.errors import CvtkitError  # noqa: E402  (a checkout without `pip install -e .`)

# The GPU machine's image: Python 3.12, torch 2.11 (CUDA 13) and these (issue #25).
GPU_IMAGE = ("torch", "torchvision", "timm", "numpy", "tensorboard", "pyyaml", "safetensors", "tqdm",
             "scikit-learn", "matplotlib", "pytest", "psutil", "ninja")
# What the tests, the demo and the benchmarks import beyond the image.
ROOTS = ("deepspeed", "webdataset", "submitit", "simplejpeg")
BUILT_HERE = ("deepspeed",)  # sdist only on PyPI
MAX_BYTES = 60 * 2 ** 20  # what may travel with one call is 64 MiB, the checkout included
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


class WheelError(CvtkitError):
    """The bundle cannot be made as asked (no package index, a missing wheel, too large)."""


def marker_environment(python_version: str) -> dict[str, str]:
    """Requirement markers as they evaluate for CPython `python_version` on Linux x86-64."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64",
            "os_name": "posix", "extra": ""}


def closure(names, python_version: str, stop=()) -> dict[str, str]:
    """{canonical name: installed version} of `names` and what they require, through this
    environment's metadata; the packages in `stop` are left out and not followed."""
    env, stop = marker_environment(python_version), {canonicalize_name(n) for n in stop}
    found, todo = {}, [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found or name in stop:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise WheelError(f"{name}: not installed in this environment ({sys.prefix}); "
                             f"run `make setup` first") from None
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return found


def _pip(args: list[str], env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise WheelError(f"pip {args[0]} failed: {last[-1].strip()} (needs PyPI; the GPU machine does not)")


def build(out: Path, python_version: str) -> list[Path]:
    """Write the bundle for `python_version` into `out` (its old wheels removed); returns the wheels."""
    wanted = closure(ROOTS, python_version, stop=GPU_IMAGE)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    for name in BUILT_HERE:  # pure Python once its ops are left to compile just in time
        _pip(["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), f"{name}=={wanted[name]}"],
             env={"DS_BUILD_OPS": "0"})
    abi = "cp" + python_version.replace(".", "")
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _pip(["download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(out), "--python-version", python_version,
          "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", *platforms,
          *[f"{name}=={version}" for name, version in sorted(wanted.items()) if name not in BUILT_HERE]])
    wheels = sorted(out.glob("*.whl"))
    got = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels}
    if set(got) != set(wanted):
        raise WheelError(f"{out}: expected wheels of {', '.join(sorted(wanted))}; got {', '.join(sorted(got))}")
    for name in BUILT_HERE:
        tags = {str(t) for t in parse_wheel_filename(got[name].name)[3]}
        if tags != {"py3-none-any"}:
            raise WheelError(f"{got[name].name}: expected a pure wheel (py3-none-any), got {sorted(tags)}")
    size = sum(w.stat().st_size for w in wheels)
    if size > MAX_BYTES:
        raise WheelError(f"{out}: {size / 2 ** 20:.1f} MiB of wheels, more than the {MAX_BYTES / 2 ** 20:.0f} MiB "
                         f"that may travel")
    return wheels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "gpu_wheels"), help="the folder (default: gpu_wheels/)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = p.parse_args(argv)
    try:
        wheels = build(Path(args.out), args.python_version)
    except CvtkitError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    for w in wheels:
        print(f"  {w.stat().st_size / 2 ** 20:6.2f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in wheels) / 2 ** 20
    print(f"gpu-wheels: {len(wheels)} wheels, {total:.1f} MiB, for CPython {args.python_version} on manylinux "
          f"x86-64, in {args.out}; on the GPU machine: python tools/gpu_check.py --wheels {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
