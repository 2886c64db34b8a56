# Set-up and checks. `make test` and `make demo` work on a fresh machine: they create .venv first.
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= outputs/demo
DEMO_TRAIN ?= 800
DEMO_VAL ?= 100

GPU_CHECK_OUT ?= outputs/gpu_check

.PHONY: install test demo gpu-check clean

# Reinstalls only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

# pytest exits non-zero on failures and when no test ran.
test: install
	$(PY) -m pytest -q tests

# Synthetic data, a fresh training run (7-8 minutes on 2 CPU cores), then curves.png and predictions.png.
demo: install
	test -n "$(DEMO_DIR)"
	$(PY) tools/make_synthetic_coco.py --out $(DEMO_DIR)/data --train $(DEMO_TRAIN) --val $(DEMO_VAL)
	rm -rf $(DEMO_DIR)/run
	PYTHON=$(abspath $(PY)) bash configs/demo_synthetic.sh --coco_path $(DEMO_DIR)/data --output_dir $(DEMO_DIR)/run
	$(PY) tools/demo_report.py $(DEMO_DIR)/run --coco_path $(DEMO_DIR)/data

# On a machine with a CUDA GPU: build the kernel, CUDA tests, op and model benchmarks, mixed-precision and
# deterministic training; report.md and results.jsonl in $(GPU_CHECK_OUT) (tools/gpu_check.py).
gpu-check: install
	$(PY) tools/gpu_check.py $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
