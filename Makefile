# seqjax: `make demo` and `make test` each create the environment (.venv) on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= workdirs/lm_pysrc
PYTEST_ARGS ?=
# Pinned versions tested here (pip constraints); `make CONSTRAINTS= env` resolves the ranges of setup.cfg instead.
CONSTRAINTS ?= constraints.txt
CONSTRAINT_ARGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: demo test test-slow mutation bench env constraints clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "seqjax needs Python 3.11 or newer; run make PYTHON=python3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CONSTRAINT_ARGS) -e '.[test]'
	@# Build the C++ CPU kernels once up front and print which ones built (cached per machine; seqjax falls back to
	@# JAX for a kernel that does not build).
	JAX_PLATFORMS=cpu $(PY) -m seqjax.cpu_kernels
	touch $(STAMP)

env: $(STAMP)

# The main job: train the byte-level Transformer LM on the Python-source corpus, evaluate it, sample from it.
demo: $(STAMP)
	$(PY) -m seqjax.main --config=configs/lm_pysrc.py --workdir=$(WORKDIR)
	$(PY) -m seqjax.main --config=configs/lm_pysrc.py --workdir=$(WORKDIR) --mode=generate

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow $(PYTEST_ARGS)

# The deliberate bugs of tests/mutation.py, each run against the tests meant to catch it (slow).
mutation: $(STAMP)
	$(PY) -m tests.mutation

bench: $(STAMP)
	$(PY) -m seqjax.bench attention

# Re-resolve the newest versions that setup.cfg allows in a scratch venv and pin them in constraints.txt.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	.venv-constraints/bin/python -m pip install --quiet -e '.[test]'
	{ head -n 3 constraints.txt; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -iv '^seqjax'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints
	@echo "constraints.txt refreshed; run make clean test before committing it"

clean:
	rm -rf $(VENV) workdirs results
