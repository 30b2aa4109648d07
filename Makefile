# `make test` sets up everything it needs by itself: a fresh clone on a fresh machine passes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_PIN ?= 2.13.0

.PHONY: test lint demo tensorboard screenshots env bench results clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# Prefer the CPU torch wheel that lies on this project's machines (a plain `torch` requirement
# would pull a multi-GB CUDA build); fall back to whatever the registry offers elsewhere.
$(VENV)/.installed: $(BIN)/activate setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_PIN)" 2>/dev/null \
	  || $(BIN)/python -m pip install --quiet "torch==$(TORCH_PIN)+cpu" 2>/dev/null \
	  || $(BIN)/python -m pip install --quiet torch
	$(BIN)/python -m pip install --quiet -e ".[test,lint]"
	touch $@

env: $(VENV)/.installed

test: env
	$(BIN)/python -m pytest -q

# ruff (lint and format) on everything, mypy on the package; configured in pyproject.toml
lint: env
	$(BIN)/ruff check lightning_repsim tests examples benchmarks docs
	$(BIN)/ruff format --check lightning_repsim tests examples benchmarks docs
	$(BIN)/mypy

demo: env
	$(BIN)/python examples/quickstart.py

# every image of every logging point: TensorBoard keeps only 10 per tag by default
tensorboard: env
	$(BIN)/tensorboard --logdir runs --samples_per_plugin images=1000

# the README's TensorBoard screenshots, from the runs/ that make demo wrote (needs Debian's chromium)
screenshots: env
	$(BIN)/python docs/screenshots.py --logdir runs --size 1400,900

bench: env
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py

# rerun every example at its documented settings (examples/results.py FULL; about 20 minutes on
# 2 busy cores, most of it the 10-seed sanity check), rewrite the generated blocks
# (<!-- results:NAME -->) of README.md and examples/RESULTS*.md from the numbers the runs return,
# and copy the README's figures to docs/figures/. Each run's log and numbers stay in
# examples/output/results-logs/ (`examples/results.py --logs DIR --from-logs` formats them again).
results: env
	$(BIN)/python examples/results.py --logs examples/output/results-logs

clean:
	rm -rf $(VENV) build *.egg-info
