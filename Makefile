# The two commands of the README. Each creates or reuses .venv and installs what it needs.
#   make demo   train a tiny GPT on the CPU with the monitor attached (writes demo-out/)
#   make test   ruff (lint and format check), then the whole test suite
# torch is pinned (TORCH_SPEC) and installed first, so pip never pulls a multi-GB CUDA build.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT   ?= demo-out
DEMO_ARGS  ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: demo test install install-dev clean FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The torch pin as a file holding TORCH_SPEC: rewritten, and so newer than the install
# stamps, only when the spec given to make differs from the one last installed.
TORCH_STAMP := $(VENV)/.torch-spec
$(TORCH_STAMP): FORCE | $(BIN)/python
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_SPEC)" ]; then echo "$(TORCH_SPEC)" > $@; fi
FORCE:

# Stamps: re-install only when pyproject.toml or the torch pin changes.
$(VENV)/.installed-runtime: pyproject.toml $(TORCH_STAMP) | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[prometheus]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(TORCH_STAMP) | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	touch $@ $(VENV)/.installed-runtime

install: $(VENV)/.installed-runtime
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-runtime
	$(BIN)/fineline-monitor demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
