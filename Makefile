# cvtkit: `make demo` runs the main job on built-in data, `make test` runs the test suite.
# Both set up first when needed; `make setup` is idempotent and fast once done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# ffcv compiles against OpenCV and libjpeg-turbo; the Slurm tests start real daemons.
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config build-essential slurmctld slurmd slurm-client munge
SETUP_STAMP := $(VENV)/.setup-complete

.PHONY: setup test demo zoo clean

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

test: setup
	$(PY) -m pytest -q -ra

# Until the full pipeline demo lands: the model zoo with its parameter and MAC counts.
demo: setup
	$(PY) -m cvtkit.models.summary

zoo: setup
	$(PY) -m cvtkit.models.summary

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
