# cvtkit: `make demo` runs the main job on built-in data, `make test` runs the test suite.
# Both set up first when needed; `make setup` is idempotent and fast once done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# ffcv compiles against OpenCV and libjpeg-turbo; the Slurm tests start real daemons.
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config build-essential slurmctld slurmd slurm-client munge
SETUP_STAMP := $(VENV)/.setup-complete

.PHONY: setup test test-fast gpu-wheels gpu-check demo zoo bench clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "setup: installing Debian packages: $(APT_PACKAGES)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[ffcv,test]'
	@touch $@

# The whole suite (CI's command; `.ci/run` also sets CVTKIT_NO_SKIP=1, so that a Slurm or tmpfs
# test that cannot run here fails instead of skipping), on two workers: the Slurm tests share one
# worker (tests/conftest.py), and the ranks' start-up on one core overlaps another test's waits.
test: setup
	$(PY) -m pytest -q -ra -m "not gpu" --durations=20 -n 2 --dist loadgroup

# All but the slow end-to-end tests (`@pytest.mark.slow`): a few minutes, while you work.
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not gpu" -n 2 --dist loadgroup

# Step 1 of the GPU proof, where PyPI answers: the wheels a bare GPU machine lacks (DeepSpeed built
# here, webdataset, submitit, simplejpeg and what they need), for CPython 3.12 on manylinux
# x86-64, at this environment's versions, into gpu_wheels/ (about 6 MiB; at most 60).
gpu-wheels: setup
	$(PY) tools/gpu_wheels.py --out gpu_wheels $(GPU_WHEELS_ARGS)

# Step 2, on the GPU machine, offline, from the checkout with gpu_wheels/ beside it:
#   python tools/gpu_check.py --wheels gpu_wheels --out $OUT
# (no `make setup` there). In one call (about 9 minutes): the CUDA tests (`pytest -m gpu`),
# `make demo` on the GPU, the Trainer from the recipes, the kernel-level table; everything under
# $OUT (or gpu_check_out/). Without CUDA it refuses at once. `make gpu-check` runs it from this
# environment; GPU_CHECK_ARGS="--parts bench" reruns one part, "--dry-run" checks it on CPU.
gpu-check: setup
	$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# The whole pipeline on scikit-learn's bundled digits, on CPU: shards -> DeepSpeed pretraining
# (2 processes, stopped halfway and resumed) -> fine-tuning at a higher resolution -> evaluation.
demo: setup
	$(PY) -m cvtkit.demo

zoo: setup
	$(PY) -m cvtkit.models.summary

# The Trainer from the recipes (GPU: the aims' rows; CPU: the tiny recipe), the kernel-level
# training-step table (GPU: the BENCHMARKS.md configurations; CPU: a small smoke configuration),
# then the loader and shard-writing benchmarks; one summary at the end. Progress goes to stderr.
# `make bench BENCH_TRAIN_ARGS="--configs cvt_13@224:b256:ref cvt_13@224:b256:sdpa+cl+rcompile"`
bench: setup
	@set -e -o pipefail; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	echo "bench: the Trainer from the recipes (python -m cvtkit.bench.recipes $(BENCH_RECIPES_ARGS))"; \
	$(PY) -m cvtkit.bench.recipes $(BENCH_RECIPES_ARGS) > "$$d/recipes.md"; \
	echo "bench: training step (python -m cvtkit.bench.train $(BENCH_TRAIN_ARGS))"; \
	$(PY) -m cvtkit.bench.train $(BENCH_TRAIN_ARGS) > "$$d/train.md"; \
	echo "bench: loaders (python -m cvtkit.bench.loaders)"; \
	$(PY) -m cvtkit.bench.loaders > "$$d/loaders.txt"; \
	echo "bench: shard writing (python -m cvtkit.bench.shards)"; \
	$(PY) -m cvtkit.bench.shards > "$$d/shards.txt"; \
	printf '\n# cvtkit benchmarks (%s, %s)\n\n## The Trainer from the recipes\n\n' "$$(hostname)" "$$(date -u +%Y-%m-%dT%H:%MZ)"; \
	cat "$$d/recipes.md"; printf '\n## Training step, kernel by kernel\n\n'; \
	cat "$$d/train.md"; printf '\n## Loaders\n\n'; cat "$$d/loaders.txt"; \
	printf '\n## Shard writing\n\n'; cat "$$d/shards.txt"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
