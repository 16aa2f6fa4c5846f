"""The offline path of `make gpu-check` on a bare GPU machine: the bundle `make gpu-wheels` makes
installs with `pip install --no-index --no-deps` into an empty folder (what `gpu_check.py --wheels`
runs), and deepspeed, webdataset, simplejpeg, submitit and cvtkit import from it in a fresh
interpreter that sees nothing else of this environment than the GPU image's packages.

Building the bundle needs PyPI (CI has it). It is built for this interpreter's Python, so that it
can be imported here; the GPU machine's is built the same way for 3.12 (the default)."""
import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name, parse_wheel_filename

from helpers import REPO, tool


def bare_image(root: Path, packages, leave_out: set[str], python_version: str) -> Path:
    """This environment's copies of `packages` and of what they need, and nothing else, linked into
    `root` (the GPU image as a folder on `sys.path`); `leave_out`: distributions it must not bring."""
    root.mkdir()
    for name in tool("gpu_wheels").closure(packages, python_version, stop=leave_out):
        dist = metadata.distribution(name)
        base = Path(dist.locate_file(""))
        for parts in {Path(f).parts[:2] for f in dist.files or [] if not str(f).startswith("..")}:
            top = base / parts[0]
            # A namespace folder (nvidia/ holds torch's CUDA libraries and DALI alike): only its parts
            # of this distribution; anything else whole.
            shared = top.is_dir() and not (top / "__init__.py").exists() and not parts[0].endswith(".dist-info")
            rel = Path(*parts) if shared and len(parts) == 2 else Path(parts[0])
            link = root / rel
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(base / rel)
    return root


CHECK = """
import sys
target, image, repo = sys.argv[1:4]
sys.path[:0] = [target, image, repo]
import deepspeed, webdataset, simplejpeg, submitit, cvtkit
import cvtkit.train.trainer, cvtkit.data.wds_loader, cvtkit.data.jpeg_crop, cvtkit.bench.recipes
for module in (deepspeed, webdataset, simplejpeg, submitit):
    assert module.__file__.startswith(target), module.__file__
assert cvtkit.__file__.startswith(repo), cvtkit.__file__
assert not [p for p in sys.path if "site-packages" in p], sys.path
print("imported from the bundle:", deepspeed.__version__, webdataset.__version__, simplejpeg.__version__,
      submitit.__version__)
"""


@pytest.mark.slow
def test_the_bundle_installs_offline_and_imports_in_a_bare_interpreter(tmp_path):
    wheels_tool = tool("gpu_wheels")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    proc = subprocess.run([sys.executable, "tools/gpu_wheels.py", "--out", str(tmp_path / "wheels"),
                           "--python-version", version], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted((tmp_path / "wheels").glob("*.whl"))
    names = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
    assert {canonicalize_name(r) for r in wheels_tool.ROOTS} <= names
    assert not names & {canonicalize_name(n) for n in wheels_tool.GPU_IMAGE}
    assert sum(w.stat().st_size for w in wheels) <= wheels_tool.MAX_BYTES

    target = tmp_path / "site"
    target.mkdir()
    tool("gpu_check").install_wheels(tmp_path / "wheels", target)  # --no-index --no-deps --target
    image = bare_image(tmp_path / "image", wheels_tool.GPU_IMAGE, names | {"deepspeed"}, version)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-S", "-c", CHECK, str(target), str(image), str(REPO)], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines()[-1].startswith("imported from the bundle: 0.19"), proc.stdout
