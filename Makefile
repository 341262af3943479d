# Quick start: `make demo` and `make test` each create the virtual environment and
# install execmem (with its test and plot extras) on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck check bench soak litmus litmus-vmsa verify clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m execmem demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check execmem arch jit_examples tests

typecheck: $(STAMP)
	$(PY) -m mypy

check: lint typecheck test

bench: $(STAMP)
	$(PY) -m execmem bench

soak: $(STAMP)
	$(PY) -m execmem.bench.soak

litmus: $(STAMP)
	$(PY) -m execmem litmus --summary --kinds tests/data/herd/aarch64-ifetch/kinds.txt tests/data/herd/aarch64-ifetch

# Exits non-zero: two known disagreements and four looping tests end 'unknown' (README).
litmus-vmsa: $(STAMP)
	$(PY) -m execmem litmus --summary --variant vmsa,fatal --max-states 20000 \
	    --kinds tests/data/herd/aarch64-vmsa/kinds.txt tests/data/herd/aarch64-vmsa/tests

verify: $(STAMP)
	$(PY) -m execmem verify

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
