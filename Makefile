# make demo  -- set up .venv and run the offline demo
# make test  -- set up .venv, check the import layers (make lint-imports) and run the whole test suite
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

.PHONY: venv demo test lint-imports bench clean wheel-check gpu-device-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[cpu,dev]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/curate demo demo-output

test: venv lint-imports
	$(PY) -m pytest -q tests

# the import contracts of pyproject.toml ([tool.importlinter]): layers import downward only, no cycles
lint-imports: venv
	$(VENV)/bin/lint-imports --no-logo

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

# bench/gpu.py as on the lent GPU machine (docs: README, "Benchmarks"): a fresh virtualenv with torch/torchvision
# and the packages that machine's image has, none of curate's other dependencies (no ray, duckdb, faiss, ...),
# plus exactly the wheels bench/gpu_device.sh carries there (built for this Python); the checkout on PYTHONPATH
GPU_VENV := $(abspath build/gpu-device-venv)
GPU_SITE := $(abspath build/gpu-device-site)
GPU_IMAGE_PKGS := numpy pyarrow pillow scikit-image opencv-python-headless transformers timm tokenizers safetensors \
	huggingface_hub sentencepiece regex tqdm pyyaml rich fsspec jinja2 urllib3 certifi scipy nvidia-ml-py
gpu-device-check:
	rm -rf $(GPU_VENV) $(GPU_SITE) build/gpu-device-wheels build/gpu-device-run
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 $(GPU_IMAGE_PKGS)
	$(GPU_VENV)/bin/python -m pip uninstall -q -y pydantic pydantic-core  # pulled in here, absent from the image
	PY=$$($(GPU_VENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
	  DEST=build/gpu-device-wheels bash bench/gpu_device.sh
	$(GPU_VENV)/bin/python -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) build/gpu-device-wheels/*.whl
	mkdir -p build/gpu-device-run && cd build/gpu-device-run \
	  && ! PYTHONPATH=$(GPU_SITE) $(GPU_VENV)/bin/python -c "import ray" 2>/dev/null \
	  && ! PYTHONPATH=$(GPU_SITE) $(GPU_VENV)/bin/python -c "import faiss" 2>/dev/null \
	  && ! $(GPU_VENV)/bin/python -c "import pydantic" 2>/dev/null \
	  && PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_VENV)/bin/python $(CURDIR)/bench/gpu.py --device cpu --small \
	     --out gpu.json --tmp . \
	  && $(GPU_VENV)/bin/python -c "import json; r = json.load(open('gpu.json')); \
	     s = r['clip']['curate-ViT-T-32']['skipped']; assert 'ray_gpu_decode' in s, s; \
	     assert r['faiss']['backend'] == 'torch', r['faiss']['path']; \
	     assert all(k in r for k in ('clip', 'perplexity', 'recaption', 'faiss')); print('gpu-device-check: ok', s, r['faiss']['path'])"

bench: venv
	$(PY) bench/download.py

clean:
	rm -rf demo-output .pytest_cache
