# Quick start: `make demo` and `make test` each create the virtual environment and
# install execmem (with its test and plot extras) on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LINKED := $(VENV)/.linked
# The package's folders: a new or removed module changes its folder's time stamp.
PACKAGE_DIRS := $(shell find -L execmem arch jit_examples -type d -not -name __pycache__ 2>/dev/null)

.PHONY: demo test test-arm64 test-arm64-host lint typecheck check bench soak litmus litmus-vmsa verify clean

# A "strict" editable install links each module into build/: unlike the default
# import-hook install, type checkers (mypy in a user's project) find it, and only the
# execmem package is importable (no top-level `arch`).  Its links are per file, so a
# module added later needs a new link tree: $(LINKED) redoes it (seconds, no download).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]' --config-settings editable_mode=strict \
	    >$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	touch $(STAMP) $(LINKED)

$(LINKED): $(STAMP) $(PACKAGE_DIRS)
	$(PY) -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict \
	    >$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	touch $(LINKED)

demo: $(LINKED)
	$(PY) -m execmem demo

test: $(LINKED)
	$(PY) -m pytest -q

# The suite as an aarch64 process under QEMU (root on x86-64 Debian; see .ci/arm64.sh).
test-arm64:
	.ci/arm64.sh

# What CI runs under QEMU: every test of the host path. The modeled machine, litmus and
# verification tests are left out: they run Python and Unicorn, not the host recipe, and
# under two layers of emulation they would take most of CI's time (README, "The arm64
# suite under QEMU").
ARM64_HOST_TESTS = -q --ignore=tests/model --ignore=tests/litmus --ignore=tests/verify
test-arm64-host:
	.ci/arm64.sh $(ARM64_HOST_TESTS)

lint: $(LINKED)
	$(PY) -m ruff check execmem arch jit_examples tests

typecheck: $(LINKED)
	$(PY) -m mypy

check: lint typecheck test

# The table only (nothing drawn); the README's command also redraws docs/bench.png and .md.
bench: $(LINKED)
	$(PY) -m execmem bench

soak: $(LINKED)
	$(PY) -m execmem.bench.soak

litmus: $(LINKED)
	$(PY) -m execmem litmus --summary --kinds tests/data/herd/aarch64-ifetch/kinds.txt tests/data/herd/aarch64-ifetch

# Exits non-zero: two known disagreements and four looping tests end 'unknown' (README).
litmus-vmsa: $(LINKED)
	$(PY) -m execmem litmus --summary --variant vmsa,fatal --max-states 20000 \
	    --kinds tests/data/herd/aarch64-vmsa/kinds.txt tests/data/herd/aarch64-vmsa/tests

verify: $(LINKED)
	$(PY) -m execmem verify

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
