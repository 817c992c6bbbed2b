# bevctl — every target creates/refreshes .venv as needed, so each is the only command you need.
#
# The CPU install pins torch==2.13.0 (a GPU machine installs its own torch first: see README).
# nuscenes-devkit 1.2.0 declares numpy<2 although it runs on numpy 2: it is installed with
# --no-deps and its runtime dependencies are listed in pyproject.toml, which keeps numpy 2 and
# zarr 3.1.6.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
NUSCENES_DEVKIT := nuscenes-devkit==1.2.0

export OMP_NUM_THREADS ?= 2
# with other jobs on the cores, OpenMP busy-waiting made training steps ~40x slower (docs/demo_tuning.md)
export OMP_WAIT_POLICY ?= PASSIVE
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/torchinductor
export BEVCTL_CACHE_DIR ?= $(CURDIR)/.cache/bevctl
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED ?= 1

.PHONY: install test test-slow test-all demo bench bench-paper bench-paper-long bench-paper-gpu gpu-check gpu-wheels mutants clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "$(NUSCENES_DEVKIT)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check
	$(PY) -m pytest -q -m "not slow" --timeout 600

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow" --timeout 3600

test-all: $(STAMP)
	$(PY) -m pytest -q --timeout 3600

demo: $(STAMP)
	$(VENV)/bin/bevctl demo

bench: $(STAMP)
	$(PY) bench/run_all.py

# The label-efficiency table (~1 hour on 2 cores; resumable): bench/results/paper.{json,md}
bench-paper: $(STAMP)
	$(PY) bench/paper.py --seeds 3 --ablation-seeds 1

# The same with 2x the from-scratch steps, 5 seeds (~2 h 15 min): bench/results/paper-long.{json,md}
bench-paper-long: $(STAMP)
	$(PY) bench/paper.py --plan long --seeds 5 --other-fraction-seeds 3 --ablation-seeds 1

# The gpu plan, run ON THE GPU MACHINE (one CUDA GPU, 16 cores; no venv: bevctl and the wheels of
# ../shared/tools/gpu-wheels.sh on PYTHONPATH, no Ray; README "At GPU scale"): stops itself before
# 8 minutes with the table so far. GPU_RESULTS/paper-gpu.{json,md}
GPU_RESULTS ?= bench/results
bench-paper-gpu:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) bench/paper.py --plan gpu --seeds 3 --no-ablations \
		--time-budget 480 --out /tmp/bevctl-paper-gpu-run --results $(GPU_RESULTS)

# Every GPU path on one CUDA GPU, measured (docs/gpu_check.md): bench/results/gpu.{json,md}.
# Runs with the python that has torch + CUDA (no .venv, no Ray, bevctl from this checkout):
# on a GPU machine without internet, install the wheels of `make gpu-wheels` first.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(GPU_PYTHON) bench/gpu_check.py --out bench/results $(GPU_CHECK_ARGS)

# The wheels an offline GPU machine lacks (python 3.12, x86-64), into .whl/ (git-ignored locally:
# `echo /.whl/ >> .git/info/exclude`): bevctl's dependencies (../shared/tools/gpu-wheels.sh when
# present) plus pytest for `pytest -m gpu`.
gpu-wheels:
	bash ../shared/tools/gpu-wheels.sh .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  -d .whl pytest pluggy iniconfig

# Mutation testing of the core modules with mutmut, one module at a time against its fast tests
# (hours on 2 cores; resumable; not in CI): bench/results/mutation.{json,md}.
# MODULES="evaluate geometry" runs some of them (names: python bench/mutation.py --help);
# MINUTES=30 stops each module after 30 min (rerun to go on).
mutants: $(STAMP)
	env -u PYTHONPATH nice -n 19 $(PY) bench/mutation.py $(if $(MODULES),--modules $(MODULES)) $(if $(MINUTES),--minutes $(MINUTES))

clean:
	rm -rf $(VENV) .cache demo-run .pytest_cache
