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
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED ?= 1

.PHONY: install test test-slow test-all demo bench bench-paper bench-paper-long mutants clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "$(NUSCENES_DEVKIT)"
	touch $(STAMP)

test: $(STAMP)
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

# Mutation testing of the core modules with mutmut, one module at a time against its fast tests
# (hours on 2 cores; resumable; not in CI): bench/results/mutation.{json,md}.
# MODULES="evaluate geometry" runs some of them (names: python bench/mutation.py --help);
# MINUTES=30 stops each module after 30 min (rerun to go on).
mutants: $(STAMP)
	env -u PYTHONPATH nice -n 19 $(PY) bench/mutation.py $(if $(MODULES),--modules $(MODULES)) $(if $(MINUTES),--minutes $(MINUTES))

clean:
	rm -rf $(VENV) .cache demo-run .pytest_cache
