# medsam-rt: `make demo` (install + main job, offline) and `make test` (install + tests). Both idempotent.
PYTHON ?= python3
VENV ?= .venv
TF4_VENV ?= .venv-tf4
# torch first, pinned: this CPU build lies on the development/CI disk; an unpinned torch pulls GBs of CUDA wheels
TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python
MODEL_DIR ?= models/medsam-vitb-random

.PHONY: setup demo test test-full test-tf4 lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[export,dev]'
	touch $@

# The main job: export MedSAM ViT-B (fixed random weights: the real checkpoint needs the hub), then segment samples.
demo: setup
	@test -f $(MODEL_DIR)/manifest.json || $(VENV)/bin/medsam-rt export --random-weights --arch vit-base --out $(MODEL_DIR)
	$(VENV)/bin/medsam-rt demo $(MODEL_DIR) --out demo-out

# Default tier: tiny models, a few minutes on 2 cores.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Full-size ViT-B tier (about 4 minutes, 8 GB RAM).
test-full: setup
	$(PY) -m pytest -q -m full

# The exporter on transformers 4.57 (the default env gets the newest 5.x).
$(TF4_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF4_VENV)/bin/python -m pip install -q $(TORCH_PIN)
	$(TF4_VENV)/bin/python -m pip install -q -e '.[export,dev]' 'transformers==4.57.6'
	touch $@

test-tf4: $(TF4_VENV)/.installed
	$(TF4_VENV)/bin/python -m pytest -q tests/test_export.py tests/test_preprocess.py tests/test_runtime.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(TF4_VENV) demo-out models .pytest_cache
