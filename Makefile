# ltstudy: `make demo` runs the CPU demo study, `make test` the test suite.
# Both create .venv with pinned dependencies first. On Linux torch is the CPU build, from
# PyTorch's CPU index (PyPI's Linux wheel carries CUDA: gigabytes a laptop does not need); a
# local wheel of that build (pip's find-links) is used where there is one. Triton comes beside
# it: the tests run our kernels on the CPU under its interpreter. GPU users: install the build
# for your CUDA (it brings the Triton it was built with), and flash-linear-attention for the
# linear variants' kernels, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 fla-core==0.6.0 --index-url https://download.pytorch.org/whl/cu128 --extra-index-url https://pypi.org/simple"
PYTHON ?= python3
VENV ?= .venv
ifeq ($(shell uname -s),Linux)
TORCH_SPEC ?= torch==2.13.0+cpu triton==3.9.0 --extra-index-url https://download.pytorch.org/whl/cpu --retries 2
else
TORCH_SPEC ?= torch==2.13.0
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.ltstudy-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-slow test-all lint format clean-results lock

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# `ltstudy unlock` first: a rerun after Snakemake itself was killed clears the lock it left
# (only once no Snakemake works here; it names a live one and stops otherwise).
demo: setup
	$(BIN)/ltstudy unlock
	$(BIN)/snakemake --profile workflow/profiles/demo all

test: setup
	$(BIN)/pytest -m "not slow"

test-slow: setup
	$(BIN)/pytest -m slow

test-all: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-results:
	rm -rf results/runs results/data results/*.parquet results/partial reports/index.html reports/assets \
		reports/partial .snakemake

lock:
	$(PYTHON) -m venv /tmp/ltstudy-lock
	/tmp/ltstudy-lock/bin/pip install --quiet $(TORCH_SPEC) -r requirements.in
	/tmp/ltstudy-lock/bin/pip freeze --exclude torch | grep -v '^-e\|nvidia\|triton' > requirements.txt
	rm -rf /tmp/ltstudy-lock
