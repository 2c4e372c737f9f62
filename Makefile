# Set-up and checks. `make test` and `make demo` work from a fresh clone: they create .venv,
# install torch (the CPU build on our machines) and the pinned requirements, and build the
# compiled core (CUDA kernels too when nvcc is found).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

DEMO_DIR ?= runs/demo

.PHONY: test demo build bench clean

$(VENV)/.installed: requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Always re-run: CMake rebuilds only what changed.
build: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# Two workers: most tests keep one core busy (subprocess runs, the Triton interpreter).
test: build
	$(PY) -m pytest -q -ra -n 2 tests

# The pretrained `shapes` model finetuned on JPEG compressibility (preset shapes-compressibility; why
# those settings: the comment above it in ddpo_fast/config.py), then the base and the finetuned model
# on the run's fixed evaluation prompts and seeds: runs/demo/eval/comparison.png.
# One OpenMP thread by default: on a 2-core machine with anything else running, torch with 2 threads
# was ~35x slower per step than with 1 (measured: 10 s against 0.3 s per training step); on an
# idle machine, DEMO_THREADS=2 may be a little faster.
DEMO_THREADS ?= 1
demo: build
	rm -rf $(DEMO_DIR)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m ddpo_fast.train --preset shapes-compressibility --run-dir $(DEMO_DIR)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m ddpo_fast.evaluate --finetuned $(DEMO_DIR)
	@echo "reward per epoch: $(DEMO_DIR)/metrics.jsonl (eval/reward_mean: the fixed prompts every 5 epochs)"
	@echo "sample grids:     $(DEMO_DIR)/samples/"
	@echo "reward curve:     $(DEMO_DIR)/reward_curve.png"
	@echo "base | finetuned: $(DEMO_DIR)/eval/comparison.png"

bench: build
	$(PY) benchmarks/ops.py

clean:
	rm -rf build $(VENV) ddpo_fast/_C*.so
