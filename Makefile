# Two entry points; each sets up everything it needs on a fresh machine.
#   make main   # install, then train the two-moons VAE (progress bar, metrics, figure)
#   make test   # install with test extras, then lint (ruff), type-check (mypy), run
#               # the whole test suite and the docstring examples, and build the
#               # documentation (strict)
# The documentation alone (HTML in docs/_build/html, built offline):
#   make docs
# And a check of the newest releases (JAX 0.12 needs Python >= 3.12):
#   make test-newest   # a second environment with the newest jax/numpyro/flax, core tests
#   make test-minimum  # a third with the lowest versions pyproject.toml allows, core tests
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= out

# python3.12 on PATH, else pyenv's 3.12 (make NEWEST_PYTHON=... to choose).
NEWEST_PYTHON ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
NEWEST_VENV   ?= .venv-newest
# The core of the suite (combinators, losses, SMC, moves, smoothing, PMCMC,
# Coix compatibility, training); the notebooks and programs run in `make test`.
NEWEST_TESTS  ?= tests/test_core.py tests/test_resample.py tests/test_smc.py \
	tests/test_move.py tests/test_losses.py tests/test_algo.py \
	tests/test_coix_compat.py tests/test_smoothing.py tests/test_pmcmc.py \
	tests/test_train.py tests/test_checkpoint_integrity.py tests/test_errors.py \
	tests/test_misuse.py tests/test_xla_guard.py tests/test_inference_data.py

# Sphinx, strict: -n reports every broken cross-reference, -W makes warnings
# errors (--keep-going lists them all first), -E rereads every source so an
# unchanged page's warnings are not skipped.
DOCS_OUT   ?= docs/_build/html
SPHINXOPTS ?= -n -W --keep-going -E

.PHONY: main test test-newest test-minimum docs install install-test install-docs

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(VENV)/bin/python
	$(PY) -m pip install -e .

install-test: $(VENV)/bin/python
	$(PY) -m pip install -e ".[test]"

install-docs: $(VENV)/bin/python
	$(PY) -m pip install -e ".[docs]"

main: install
	$(PY) -m programs vae_moons --out $(OUT)

# The docstring examples (combinators/) and the examples of the guides
# (docs/guides/*.md) run as doctests in the same pytest run as the suite.
test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	COMBINATORS_SMOKE=1 $(PY) -m pytest -n 2 --dist worksteal --doctest-modules \
		--doctest-glob="*.md" tests combinators docs/guides
	$(PY) -m sphinx -b html -q $(SPHINXOPTS) docs $(DOCS_OUT)

docs: install-docs
	$(PY) -m sphinx -b html $(SPHINXOPTS) docs $(DOCS_OUT)
	@echo "Documentation: $(DOCS_OUT)/index.html"

test-newest:
	$(NEWEST_PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager -e ".[test]"
	$(NEWEST_VENV)/bin/python -m pip list | grep -iE "^(jax|jaxlib|numpyro|flax|optax|blackjax|arviz) "
	COMBINATORS_SMOKE=1 $(NEWEST_VENV)/bin/python -m pytest -n 2 --dist worksteal $(NEWEST_TESTS)

# The lowest versions the bounds in pyproject.toml allow (keep in step).
MINIMUM_VENV ?= .venv-minimum
MINIMUM_PINS ?= jax==0.10.0 jaxlib==0.10.0 numpyro==0.22.0 flax==0.12.8 optax==0.2.3

test-minimum:
	$(PYTHON) -m venv $(MINIMUM_VENV)
	$(MINIMUM_VENV)/bin/python -m pip install --upgrade pip
	$(MINIMUM_VENV)/bin/python -m pip install -e ".[test]" $(MINIMUM_PINS)
	$(MINIMUM_VENV)/bin/python -m pip list | grep -iE "^(jax|jaxlib|numpyro|flax|optax) "
	COMBINATORS_SMOKE=1 $(MINIMUM_VENV)/bin/python -m pytest -n 2 --dist worksteal $(NEWEST_TESTS)
