# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv themselves (CPU torch via constraints/cpu.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints/cpu.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed JIT-compiles CPU ops once; keep them inside the venv so runs share them.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false
export OMP_NUM_THREADS ?= 2


.PHONY: setup demo test test-all test-slurm bench clean mm1-small

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[dev]'
	$(PY) -m ablate.warmup
	touch $@

demo: $(STAMP)
	$(PY) -m ablate.demo --data data/synth --runs runs

# A small MM1 reproduction on CPU: resolution, image tokens, connector, data mix x 3 seeds
# (27 runs of experiment=demo, 63 min measured on 2 cores, 2026-11-23), then a report
# comparing each finding's direction with MM1's: runs/mm1_small/mm1_small.md.
mm1-small: $(STAMP)
	$(PY) -m sweeps.mm1_small --data data/synth --runs runs

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu and not slurm" --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slurm" --durations=15

# Sweeps, multi-task jobs and failures against a real one-node SLURM cluster on
# localhost (slurm/local/: installs the Debian packages and starts it; needs root).
test-slurm: $(STAMP)
	$(PY) -m pytest -q -m slurm --durations=15

bench: $(STAMP)
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
