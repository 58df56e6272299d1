# make demo  -- set up .venv and run the offline demo
# make test  -- set up .venv and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.curate-installed

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export WANDB_DISABLED := true
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/curate demo demo-output

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/download.py

clean:
	rm -rf demo-output .pytest_cache
