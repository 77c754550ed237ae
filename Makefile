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
# The oldest supported Flower: a venv holding only flwr 1.41.0 (no deps) that reads
# everything else from .venv through a .pth file, so nothing is installed twice.
# Both extra venvs live inside .venv (git-ignored, removed by `make clean`).
FLWR_OLD := 1.41.0
VENV_OLD := $(VENV)/flwr141
STAMP_OLD := $(VENV_OLD)/.installed
# The next Flower, by hand only: a scratch venv with flwr-nightly and the project.
FLWR_NIGHTLY ?= 1.43.0.dev20261026
VENV_NIGHTLY := $(VENV)/flwr-nightly
# The in-process tests of our Flower seams (marked `once`: Flower-free cores, whole apps
# and federation-scale runs, which the seam tests cover, run on the main version only).
IN_PROCESS := -m "not ray and not deployment and not once"

.PHONY: install demo test test-flwr141 test-flwr-nightly lint clean

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

# CI runs it after `make test` (.ci/run).
test-flwr141: $(STAMP_OLD)
	$(VENV_OLD)/bin/python -c "import flwr, importlib.metadata as m; \
		v = (flwr.__version__, m.version('flwr')); print('flwr', v); \
		assert v == ('$(FLWR_OLD)',) * 2, v"
	$(VENV_OLD)/bin/python -m pytest $(IN_PROCESS)

$(STAMP_OLD): $(STAMP)
	rm -rf $(VENV_OLD)
	$(BIN)/python -m venv --without-pip $(VENV_OLD)
	$(BIN)/pip --python $(VENV_OLD)/bin/python install --disable-pip-version-check \
		--no-deps "flwr==$(FLWR_OLD)"
	main=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	old=$$($(VENV_OLD)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	echo "import site; site.addsitedir('$$main')" > "$$old/zz_main_venv.pth"
	touch $(STAMP_OLD)

# Not part of CI: the 1.43 nightly changes APIs we use; see README.
test-flwr-nightly:
	rm -rf $(VENV_NIGHTLY)
	$(PYTHON) -m venv $(VENV_NIGHTLY)
	$(VENV_NIGHTLY)/bin/pip install --disable-pip-version-check $(TORCH_SPEC) \
		"flwr-nightly[simulation]==$(FLWR_NIGHTLY)"
	$(VENV_NIGHTLY)/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', \
		'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(r for r in \
		p['dependencies'] + [r for k, v in x.items() if k != 'all' for r in v] \
		if not r.startswith('flwr[')))" > $(VENV_NIGHTLY)/requirements.txt
	$(VENV_NIGHTLY)/bin/pip install --disable-pip-version-check -r $(VENV_NIGHTLY)/requirements.txt
	$(VENV_NIGHTLY)/bin/pip install --disable-pip-version-check --no-deps -e .
	$(VENV_NIGHTLY)/bin/python -c "import flwr; print('flwr', flwr.__version__)"
	$(VENV_NIGHTLY)/bin/python -m pytest $(IN_PROCESS)

lint: $(STAMP)
	$(BIN)/ruff check flower_privacy apps tests

clean:
	rm -rf $(VENV)
