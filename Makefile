# Two entry points; each sets up everything it needs on a fresh machine.
#   make main   # install, then train the two-moons VAE (progress bar, metrics, figure)
#   make test   # install with test extras, then lint (ruff) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= out

.PHONY: main test install install-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(VENV)/bin/python
	$(PY) -m pip install -e .

install-test: $(VENV)/bin/python
	$(PY) -m pip install -e ".[test]"

main: install
	$(PY) -m programs vae_moons --out $(OUT)

test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	COMBINATORS_SMOKE=1 $(PY) -m pytest -n 2 --dist worksteal tests
