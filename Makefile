# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first: without it, opacus pulls a multi-GB CUDA build. On a machine whose pip
# finds a local CPU wheel (find-links) this takes it; elsewhere PyPI's default build
# (CUDA on Linux x86_64) is installed, so GPU users keep their GPU. Override with
# e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install --disable-pip-version-check -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flower-privacy demo

test: $(STAMP)
	$(BIN)/ruff check flower_privacy apps tests
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check flower_privacy apps tests

clean:
	rm -rf $(VENV)
