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

.PHONY: venv demo test bench clean wheel-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[cpu,dev]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/curate demo demo-output

test: venv
	$(PY) -m pytest -q tests

# the packaged install, as a user gets it: the bare wheel (no extra, so no FAISS) into a fresh
# virtualenv, `curate demo` run from outside the checkout (CI runs this after the suite)
WHEEL_DIR := $(abspath dist)
WHEEL_VENV := $(abspath build/wheel-venv)
wheel-check: venv
	rm -rf $(WHEEL_DIR) $(WHEEL_VENV) build/wheel-demo
	$(PY) -m pip wheel -q --no-deps -w $(WHEEL_DIR) .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(WHEEL_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(WHEEL_VENV)/bin/python -m pip install -q $$(ls $(WHEEL_DIR)/curate-*.whl)
	mkdir -p build/wheel-demo && cd build/wheel-demo \
	  && $(WHEEL_VENV)/bin/python -c "import curate; assert '/site-packages/' in curate.__file__, curate.__file__" \
	  && ! $(WHEEL_VENV)/bin/python -c "import faiss" 2>/dev/null \
	  && $(WHEEL_VENV)/bin/curate demo out \
	  && test -s out/stats.json && test -s out/report.html && ls out/data/*.parquet >/dev/null

bench: venv
	$(PY) bench/download.py

clean:
	rm -rf demo-output .pytest_cache
